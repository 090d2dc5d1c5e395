"""End-to-end on the embedded default (SmolLM2-135M-Instruct, float32): greedy output equals
``model.generate(do_sample=False)`` for real prompts, both drafters, EOS inside an accepted
block and ``max_new_tokens`` reached mid-block."""

import copy

import pytest
import torch

import specdec
from specdec import DraftModel, PromptLookup
from specdec.text import left_pad

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a short poem about the sea.",
    "Summarize in one sentence: The committee met on Tuesday to discuss the budget. After a long debate, "
    "the members agreed to increase funding for the library and to cut spending on road repairs.",
    "What is 17 * 23? Explain step by step.",
    "Translate to French: The weather is nice today and I would like to go for a walk.",
    "List three uses of Python in science.",
]


@pytest.fixture(scope="module")
def chat_ids(smollm):
    _, tokenizer = smollm
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        for p in PROMPTS
    ]


@pytest.fixture(scope="module")
def references(smollm, chat_ids):
    model, _ = smollm
    return [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
            for ids in chat_ids]


@pytest.fixture(scope="module")
def truncated_draft(smollm):
    """The target's first 6 layers: shares the vocabulary; a real second model with its own cache."""
    model, _ = smollm
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:6]
    draft.config.num_hidden_layers = 6
    return draft


@pytest.mark.parametrize("i", [pytest.param(0, marks=pytest.mark.smoke), *range(1, len(PROMPTS))])
def test_prompt_lookup_greedy_equals_generate(smollm, chat_ids, references, i):
    model, _ = smollm
    out = specdec.generate(model, chat_ids[i], PromptLookup(k=8), max_new_tokens=64, do_sample=False)
    assert torch.equal(out, references[i])


@pytest.mark.parametrize("i", [0, 2])
def test_draft_model_greedy_equals_generate(smollm, chat_ids, references, truncated_draft, i):
    model, _ = smollm
    out = specdec.generate(model, chat_ids[i], DraftModel(truncated_draft, k=3), max_new_tokens=64)
    assert torch.equal(out, references[i])


def test_eos_inside_accepted_block_and_max_new_mid_block(smollm, chat_ids):
    model, _ = smollm
    ids = chat_ids[0]
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    eos = int(plain[0, ids.shape[1] + 21])  # a token the model emits mid-output acts as EOS
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, eos_token_id=eos,
                              do_sample=False)
    # the target as its own draft: every block of 8 is accepted, so EOS lands inside one (fixed blocks:
    # the goodput controller off, since a self-draft costs as much as the target and would not pay)
    out = specdec.generate(model, ids, DraftModel(model, k=8), max_new_tokens=40, eos_token_id=eos,
                           return_dict_in_generate=True, goodput=False)
    assert torch.equal(out.sequences, expected)
    assert out.sequences[0, -1] == eos and out.stats.acceptance_rate == 1.0
    assert out.stats.new_tokens % 9 != 0  # the last block was cut at EOS
    # max_new_tokens=31 = 3 full blocks of 9 + 4: the budget caps the last draft
    out = specdec.generate(model, ids, DraftModel(model, k=8), max_new_tokens=31, eos_token_id=None,
                           return_dict_in_generate=True, goodput=False)
    assert torch.equal(out.sequences, plain[:, : ids.shape[1] + 31])
    assert out.stats.steps == 4


def test_batch_of_trees_equals_generate_per_row(smollm, chat_ids, references):
    """Three real prompts, left-padded into one batch, lookup trees: each row equals generate on it alone."""
    model, tokenizer = smollm
    ids, mask = left_pad([chat_ids[i][0] for i in (0, 1, 3)], tokenizer.pad_token_id)
    width = ids.shape[1]
    out = specdec.generate(model, ids, PromptLookup(k=4, branches=3), attention_mask=mask, max_new_tokens=64,
                           return_dict_in_generate=True)
    for row, i in enumerate((0, 1, 3)):
        expected = references[i][0, chat_ids[i].shape[1]:].tolist()
        got = out.sequences[row, width:].tolist()
        assert got[: len(expected)] == expected
        assert all(t == tokenizer.pad_token_id for t in got[len(expected):])
    assert out.stats.tau > 1.0


SHIPPED = {
    "eagle": lambda: specdec.drafters.Eagle.from_checkpoint("eagle-smollm2-135m", k=5, top_k=4, width=2, budget=12),
    "medusa": lambda: specdec.drafters.Medusa.from_checkpoint("medusa-smollm2-135m", budget=12),
    "early_exit": lambda: specdec.drafters.EarlyExit.from_checkpoint("early_exit-smollm2-135m", k=3),
    "draft_model": lambda: specdec.drafters.Distilled.from_checkpoint("draft_model-smollm2-135m", k=4),
    "pard": lambda: specdec.drafters.Pard.from_checkpoint("pard-smollm2-135m", k=4),
}


def untrained(kind, model, shipped):
    """The same drafter before training: EAGLE started from the target's last layer, zero Medusa heads
    (the same tree), the plain exit after 6 layers, the 2-layer draft copied from layers 0 and 29 (PARD: with
    its mask embedding untrained)."""
    from specdec.drafters import EagleHead, MedusaHeads
    from specdec.drafters.distilled import build_draft
    from specdec.drafters.pard import PardDraft

    if kind == "eagle":
        return specdec.Eagle(EagleHead.from_target(model), k=5, top_k=4, width=2, budget=12)
    if kind == "medusa":
        return specdec.Medusa(MedusaHeads(model.config.hidden_size, len(shipped.heads)), tree=shipped.spec)
    if kind == "early_exit":
        return specdec.EarlyExit(layers=6, k=3)
    if kind == "pard":
        return specdec.drafters.Pard(PardDraft.from_target(model, [0, 29]), k=4)
    return DraftModel(build_draft(model, [0, 29]), k=4)


def mean_tau(model, drafter, chat_ids, references):
    """Tau pooled over every step of every prompt (Spec-Bench's)."""
    new_tokens = steps = 0
    for ids, expected in zip(chat_ids, references):
        out = specdec.generate(model, ids, drafter, max_new_tokens=64, do_sample=False, return_dict_in_generate=True,
                               goodput=False)  # the drafter's own depth every step: tau measures the drafts
        assert torch.equal(out.sequences, expected)
        new_tokens += out.stats.new_tokens
        steps += out.stats.steps
    return new_tokens / steps


@pytest.mark.parametrize("kind", list(SHIPPED))
def test_shipped_drafters_are_lossless_and_beat_their_untrained_start(smollm, chat_ids, references, kind):
    """Each shipped checkpoint loads against the embedded target and decodes the real prompts exactly as
    model.generate does; training made its drafts accepted more often than before training."""
    model, _ = smollm
    shipped = SHIPPED[kind]()
    trained = mean_tau(model, shipped, chat_ids, references)
    before = mean_tau(model, untrained(kind, model, shipped), chat_ids, references)
    assert trained > before + 0.05, (trained, before)


def test_shipped_checkpoint_refuses_another_target(smollm, truncated_draft):
    """The truncated model has other weights (and layers): the shipped EAGLE head will not run on it."""
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="was trained for target 'smollm2-135m'"):
        specdec.generate(truncated_draft, ids, SHIPPED["eagle"](), max_new_tokens=4)
