"""Every family of the architecture sweep as its own draft model: the draft network gives its tree to the
draft through the one channel the engine gives the target its tree (``specdec.compat.tree_inputs`` inside
``checked_forward``), so a family served through its own 4-D masks drafts as exactly as one served
through tree attention. Each case: a left-padded batch of two, greedy, equal to ``model.generate``, or
the target refused before decoding."""

import copy

import pytest

import specdec
from architectures import PROMPT, SHORT_PROMPT, SWEEP, build, cached_reference, run_case


@pytest.mark.parametrize("name", SWEEP)
def test_family_drafts_for_itself_in_a_left_padded_batch(name):
    built = build(name)
    if built.model is None:
        pytest.skip(f"not buildable: {built.reason}")
    model = built.model
    try:
        truths = [cached_reference(model, PROMPT), cached_reference(model, SHORT_PROMPT)]  # shared with the sweep
    except Exception as e:  # noqa: BLE001 - the family's own generate, not specdec
        pytest.skip(f"model.generate failed: {e}")
    twin = copy.deepcopy(model)  # its own object: the draft is set up apart from the target
    drafter = specdec.DraftModel(twin, k=3, top_k=2, width=2, budget=6)
    outcome = run_case(model, [PROMPT, SHORT_PROMPT], truths, drafter)
    assert outcome.kind in ("exact", "refused"), f"{name}: {outcome}"
