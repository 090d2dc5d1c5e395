"""The PARD drafter: greedy equality with model.generate (single prompts, left-padded batches, EOS inside a
proposed block), the sampling law with a wrong rule failing, its draft cache holding exactly the committed
tokens after every step (the mask positions dropped), and the mask blocks it is trained on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import specdec
import specdec.engine
from specdec.drafters.pard import Pard, PardDraft, PardNet, mask_blocks
from specdec.drafters.network import GrowingProposer
from specdec.engine import decode
from specdec.options import Options
from specdec.text import left_pad

from conftest import tiny_llama
from test_generate import assert_rows_match_alone
from test_lossless_sampling import N_SAMPLES, N_TOKENS, PROMPT, SAMPLING, V, accept_every_draft, chi2_pvalue, exact_joint

OPTIONS = Options(max_new_tokens=N_TOKENS, sampling=SAMPLING, goodput=False)  # always draft: the rule is what is tested
TOP2 = [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]]  # the top-2 at each depth


def reference(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kwargs)


def pard(target, shape, k, quantize=True, vocab=None):
    """A PARD draft of all the target's layers: its root guess is the target's own, its masks untrained."""
    draft = PardDraft.from_target(target, list(range(target.config.num_hidden_layers)), vocab)
    shapes = {"chain": dict(k=k), "tree": dict(k=k, top_k=2, width=2, budget=2 * k), "static": dict(k=k, tree=TOP2)}
    return Pard(draft, quantize=quantize, **shapes[shape])


prompts = st.lists(st.integers(3, 63), min_size=1, max_size=24).map(lambda xs: torch.tensor([xs]))
shapes = st.sampled_from(["chain", "tree", "static"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, shape=shapes, k=st.integers(1, 6), max_new=st.integers(1, 32), quantize=st.booleans(),
       reduced=st.booleans())
def test_greedy_equals_generate(target, ids, shape, k, max_new, quantize, reduced):
    vocab = torch.arange(0, target.config.vocab_size, 2) if reduced else None
    expected = reference(target, ids, max_new_tokens=max_new, eos_token_id=None)
    got = specdec.generate(target, ids, pard(target, shape, k, quantize, vocab), max_new_tokens=max_new,
                           eos_token_id=None, goodput=False)
    assert torch.equal(got, expected)


batches = st.lists(st.lists(st.integers(3, 63), min_size=1, max_size=16), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=batches, shape=shapes, k=st.integers(1, 5), eos=st.sampled_from([None, 7, 30]))
def test_batch_rows_equal_generate_alone(target, rows, shape, k, eos):
    """Left-padded rows of different lengths, drafted in one forward and verified together."""
    assert_rows_match_alone(target, rows, pard(target, shape, k), max_new_tokens=20, eos=eos, goodput=False)


def test_eos_inside_a_block_ends_the_row_there(target, monkeypatch):
    """The draft proposes EOS with more tokens after it in the same block: the row stops at EOS."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):  # a prompt whose greedy answer writes a new token mid-way: that token is the EOS
        ids = torch.randint(3, 64, (1, 6), generator=gen)
        free = reference(target, ids, max_new_tokens=30, eos_token_id=None)[0, 6:].tolist()
        fresh = [i for i in range(6, 20) if free[i] not in free[:i]]
        if fresh:
            eos = free[fresh[0]]
            break
    blocks = []
    original = GrowingProposer.propose

    def spy(self, states, depths):
        trees = original(self, states, depths)
        blocks.extend(tree.tokens.tolist() for tree in trees)
        return trees

    monkeypatch.setattr(GrowingProposer, "propose", spy)
    expected = reference(target, ids, max_new_tokens=30, eos_token_id=eos)
    out = specdec.generate(target, ids, pard(target, "chain", 4, quantize=False), max_new_tokens=30,
                           eos_token_id=eos, pad_token_id=0, goodput=False, return_dict_in_generate=True)
    assert out.sequences.tolist() == expected.tolist()
    assert out.sequences[0, -1] == eos and out.sequences.shape[1] < 6 + 30
    assert any(eos in block[:-1] for block in blocks)  # EOS proposed with drafts after it
    assert out.stats.tau > 1.5  # the root's guesses are the target's own: accepted


def test_cache_holds_exactly_the_committed_tokens(target, monkeypatch):
    """After every step, each row's draft cache equals a fresh forward of the draft over the tokens it has
    fed (no mask position left, nothing stale), for ragged rows, some finishing early."""
    checked = []
    original = PardNet.commit

    def check(self, states, fed, verified):
        original(self, states, fed, verified)
        if self.cache is None:
            return
        for a, row in enumerate(self.rows.order):
            n = int(self.cache.lengths[a])
            appended = self.rows.latest[row].tokens.shape[1] - n  # the step's accepted drafts and bonus token
            assert 1 <= appended <= 4  # everything up to the root fed, nothing of the block (k = 3) kept
            tokens = self.rows.latest[row].tokens[:, :n]
            fresh = DynamicCache(config=self.draft.body.config)
            self.draft.hidden(self.draft.embed(tokens, torch.zeros_like(tokens, dtype=torch.bool)),
                              torch.arange(n)[None], fresh)
            lo, hi = int(self.cache.start[a]), int(self.cache.end[a])
            for mine, theirs in zip(self.cache.cache.layers, fresh.layers):
                assert torch.allclose(mine.keys[a, :, lo:hi], theirs.keys[0], atol=1e-5)
                assert torch.allclose(mine.values[a, :, lo:hi], theirs.values[0], atol=1e-5)
            checked.append(n)

    monkeypatch.setattr(PardNet, "commit", check)
    rows = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11], [3, 4]]
    ids, mask = left_pad([torch.tensor(r) for r in rows], pad_id=0)
    with torch.inference_mode():
        specdec.generate(target, ids, pard(target, "static", 3, quantize=False), attention_mask=mask,
                         max_new_tokens=16, eos_token_id=30, pad_token_id=0, goodput=False)
    assert len(checked) > 10


# --- sampling ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_target():
    return tiny_llama(vocab=V, seed=10, scale=4.0)


def sample_counts(model, drafter):
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V**N_TOKENS)
    for _ in range(N_SAMPLES):
        (tokens,), _ = decode(model, PROMPT, drafter, OPTIONS, gen)
        counts[(torch.tensor(tokens) * torch.tensor([V * V, V, 1])).sum()] += 1
    return counts


def sampled_pard(small_target, shape):
    torch.manual_seed(5)
    draft = PardDraft.from_target(small_target, [0], torch.tensor([0, 2, 3, 4]))  # never proposes 1 or 5
    return Pard(draft, k=3, tree=[[0], [1], [0, 0], [1, 0], [0, 1]] if shape == "tree" else None,
                quantize=shape == "tree")  # q from the int8 draft, and from the float one


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_sampling_matches_target(small_target, shape):
    counts = sample_counts(small_target, sampled_pard(small_target, shape))
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3


def test_wrong_rule_is_caught(small_target, monkeypatch):
    monkeypatch.setattr(specdec.engine, "accept_sampling", accept_every_draft)
    counts = sample_counts(small_target, sampled_pard(small_target, "tree"))
    assert chi2_pvalue(counts, exact_joint(small_target)) < 1e-6


# --- training input -------------------------------------------------------------------------------------


def test_mask_blocks_follow_the_anchor_prefix_and_their_own_block():
    tokens = torch.tensor([[11, 12, 13, 14, 15, 16]])
    labels = tokens + 100
    positions = torch.arange(6)[None] + 40
    out = mask_blocks(tokens, labels, positions, torch.ones(1, 6, dtype=torch.bool), torch.tensor([2]), 3, 1.0)
    masks = [(2, 1), (2, 2), (3, 1), (3, 2), (4, 1)]  # anchors 2..4 (a token after each), depth < 3, t + j < 6
    assert out["ids"].shape == (1, 6 + len(masks))
    assert out["is_mask"][0].tolist() == [False] * 6 + [True] * len(masks)
    assert out["positions"][0, 6:].tolist() == [40 + t + j for t, j in masks]
    assert out["labels"][0, 6:].tolist() == [labels[0, t + j].item() for t, j in masks]
    assert out["depth"][0].tolist() == [0] * 6 + [j for _, j in masks]
    visible = out["visible"][0, 0]
    for q in range(6):  # tokens: their causal prefix
        assert visible[q].nonzero().flatten().tolist() == list(range(q + 1))
    for m, (t, j) in enumerate(masks):  # masks: the true prefix up to the anchor, their block up to themselves
        want = list(range(t + 1)) + [6 + i for i, (t2, j2) in enumerate(masks) if t2 == t and j2 <= j]
        assert visible[6 + m].nonzero().flatten().tolist() == want
    none = mask_blocks(tokens, labels, positions, torch.ones(1, 6, dtype=torch.bool), torch.tensor([0]), 3, 0.0)
    assert none["ids"].shape == (1, 6)  # retain 0: no masks
    prompt = mask_blocks(tokens, labels, positions, torch.ones(1, 6, dtype=torch.bool), torch.tensor([9]), 3, 1.0)
    assert prompt["ids"].shape == (1, 6)  # a chunk inside the prompt: no anchors


def test_mask_blocks_drop_deeper_masks_only_with_their_block():
    """Conditional drop-token: a block keeps depth j only if it keeps every shallower depth."""
    gen = torch.Generator().manual_seed(0)
    n = 200
    out = mask_blocks(torch.arange(n)[None] % 60 + 3, torch.zeros(1, n, dtype=torch.long), torch.arange(n)[None],
                      torch.ones(1, n, dtype=torch.bool), torch.tensor([0]), 4, 0.5, gen)
    anchors = {}
    mask = out["is_mask"][0]
    for p, d in zip((out["positions"][0] - out["depth"][0])[mask].tolist(), out["depth"][0][mask].tolist()):
        anchors.setdefault(p, []).append(d)
    assert all(depths == list(range(1, len(depths) + 1)) for depths in anchors.values())
    counts = [sum(len(d) >= j for d in anchors.values()) for j in (1, 2, 3)]
    assert 0.35 * n < counts[0] < 0.65 * n and counts[1] < 0.7 * counts[0] and counts[2] < 0.7 * counts[1]


def test_bad_settings_are_refused(target):
    with pytest.raises(ValueError, match="exactly one of draft"):
        Pard()
    with pytest.raises(ValueError, match="needs a PardDraft"):
        Pard(target)
    ckpt = {"settings": {"block": 4, "init_layers": [0]}, "path": "p.pt"}
    with pytest.raises(ValueError, match=r"trained for blocks of 4 tokens: k=6"):
        Pard(checkpoint=ckpt, k=6)
