"""Issue 12: exact on every Hugging Face causal-LM architecture, or refused before decoding.

One test per entry of transformers' causal-LM mapping (the models and checks are in
``tests/architectures.py``, shared with ``experiments/arch_sweep.py``): each case must be exact or a
specdec ``ValueError`` before any token; an architecture with no tiny model is skipped with the reason.
The harness itself is tested first, on the tiny Llama, so a sweep that cannot fail does not pass.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import specdec
from architectures import (
    ARCHITECTURES,
    SWEEP,
    VARIANTS,
    PROMPT,
    HidingDrafter,
    Outcome,
    _logits,
    build,
    check,
    compare_logits,
    draft_for,
    reference,
    run_case,
)


def test_sweep_is_the_causal_lm_mapping():
    """Derived from transformers' mapping, not a hand-kept list; and most of it builds."""
    assert len(ARCHITECTURES) > 100
    assert ARCHITECTURES == tuple(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert build("llama").model is not None, build("llama").reason
    unbuilt = {name: build(name).reason for name in ARCHITECTURES if build(name).model is None}
    assert len(unbuilt) <= len(ARCHITECTURES) // 4, unbuilt


def test_short_window_variants_are_built_with_their_window():
    """The learned-position variants really have 64 positions (a cost curve over 128 + 32 would crash them)."""
    for name, (base, extra) in VARIANTS.items():
        model = build(name).model
        assert model is not None and type(model) is type(build(base).model), build(name).reason
        (key, value), = extra.items()
        assert getattr(model.config, key) == value == 64


def test_tiny_models_keep_each_layer_type_and_short_windows():
    gemma = build("gemma3_text")
    assert {"sliding_attention", "full_attention"} <= set(gemma.layer_types)
    assert gemma.model.config.sliding_window < len(PROMPT)
    assert {"linear_attention", "full_attention"} <= set(build("jamba").layer_types)


def test_hiding_drafter_puts_the_truth_last_and_only_on_its_path():
    truth = list(range(3, 40))
    state = SimpleNamespace(tokens=torch.tensor([truth[:15]]), budget=4, row=0)
    tree = HidingDrafter([truth], 96)._tree(state)
    assert len(tree) == 4 * 13
    for level in range(4):
        nodes = range(13 * level, 13 * level + 13)
        assert [int(tree.parents[i]) for i in nodes] == [13 * level - 1] * 13  # -1: the root
        tokens = [int(tree.tokens[i]) for i in nodes]
        assert tokens[-1] == truth[15 + level] and truth[15 + level] not in tokens[:-1]
    ragged = [HidingDrafter([truth], 96, ragged=True)._tree(SimpleNamespace(tokens=torch.tensor([truth[:n]]),
                                                                           budget=4, row=0)) for n in (15, 16, 17)]
    revealed = [sum(int(t.tokens[13 * i + 12]) == truth[n + i] for i in range(4)) for t, n in zip(ragged, (15, 16, 17))]
    assert len(set(revealed)) == 3  # accepted lengths vary by step


def test_harness_catches_wrong_tokens_and_logits():
    model = build("llama").model
    truth = reference(model, PROMPT)
    assert run_case(model, [PROMPT], [truth], HidingDrafter([truth], 96), check_logits=True) == Outcome("exact")
    liar = truth[:-1] + [(truth[-1] + 1) % 96]
    assert run_case(model, [PROMPT], [liar], specdec.PromptLookup(k=4)).kind == "WRONG"
    x = torch.tensor([truth])
    exact = [(x, torch.arange(len(truth))[None], _logits(model, truth)[None])]
    assert compare_logits(model, truth, exact) is None
    off = [(x, exact[0][1], exact[0][2] + 1e-2)]
    assert compare_logits(model, truth, off).kind == "WRONG"


class _RaisesHere(specdec.Drafter):
    def propose(self, states):
        raise ValueError("raised by the test, not by specdec")


class _BadTreeLater(specdec.Drafter):
    """Streams some tokens, then hands specdec a malformed tree (a ValueError inside specdec)."""

    def __init__(self):
        self.calls = 0

    def propose(self, states):
        self.calls += 1
        if self.calls < 3:
            return [specdec.DraftTree.empty() for _ in states]
        return [specdec.DraftTree(torch.tensor([5, 6]), torch.tensor([1, -1])) for _ in states]


def test_harness_tells_refusals_from_other_errors():
    model = build("llama").model
    truth = reference(model, PROMPT)
    refused = run_case(model, [PROMPT], [truth], specdec.DraftModel(draft_for(64), k=2))  # target: 96 tokens
    assert refused.kind == "refused" and "vocab" in refused.detail
    outside = run_case(model, [PROMPT], [truth], _RaisesHere())
    assert outside.kind == "ERROR" and "not by specdec" in outside.detail
    late = run_case(model, [PROMPT], [truth], _BadTreeLater())
    assert late.kind == "ERROR" and "streamed" in late.detail


SMOKE = ("llama", "gpt2", "opt", "qwen3", "gemma2", "mistral")  # what `make smoke-latest` runs against new releases


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.smoke) if n in SMOKE else n for n in SWEEP])
def test_exact_or_refused_before_decoding(name):
    report = check(name)
    if report.not_buildable is not None:
        pytest.skip(f"not buildable: {report.not_buildable}")
    failures = [f"{case}: {outcome}" for case, outcome in report.cases.items() if not outcome.ok]
    if failures:
        pytest.fail(f"{name}: " + "; ".join(failures), pytrace=False)
