"""The goodput controller: its choice follows its cost model, it learns acceptance, and it never
changes an output."""

import pytest
import torch

import specdec
from specdec import DraftModel, PromptLookup
from specdec.control import Controller, CostModel, analytic_depth

from conftest import attentive, tiny_llama

CURVES = {
    "flat-then-steep": CostModel((1, 2, 4, 8, 16, 32), (1.0, 1.0, 1.1, 1.4, 2.0, 3.6)),  # this CPU's shape
    "linear": CostModel((1, 64), (1.0, 8.0)),
    "memory-bound": CostModel((1, 16, 64), (1.0, 1.05, 1.6)),  # a GPU's: wide forwards almost free
    "compute-bound": CostModel((1, 2), (1.0, 2.0)),  # each token costs a whole forward: never draft
}


def fixed(costs, alpha, max_depth):
    """A controller that believes acceptance is ``alpha`` at every depth, whatever it sees."""
    return Controller(costs, max_depth, prior=alpha, prior_weight=1e12)


@pytest.mark.parametrize("curve", list(CURVES))
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.7, 0.9, 0.98])
@pytest.mark.parametrize("rows", [1, 4, 8])
def test_choice_is_the_analytic_optimum(curve, alpha, rows):
    costs = CURVES[curve]
    controller = fixed(costs, alpha, max_depth=10)
    assert controller.choose(list(range(rows))) == analytic_depth(costs, alpha, rows, 10)


def test_the_optimum_moves_as_it_should():
    costs = CURVES["flat-then-steep"]
    depths = [analytic_depth(costs, a, 1, 10) for a in (0.2, 0.5, 0.8, 0.95)]
    assert depths == sorted(depths) and depths[0] < depths[-1]  # more acceptance, deeper drafts
    assert analytic_depth(costs, 0.8, 8, 10) < analytic_depth(costs, 0.8, 1, 10)  # a bigger batch pays more per depth
    assert analytic_depth(CURVES["compute-bound"], 0.9, 1, 10) == 0


def test_a_given_cost_model_makes_the_depths_repeat(monkeypatch):
    """With a fixed cost model (draft cost included) nothing is timed: a seeded sampled call repeats."""
    target, draft = tiny_llama(seed=0), tiny_llama(seed=1, layers=1)
    costs = CostModel((1, 2, 4, 8), (1.0, 1.0, 1.1, 1.9), draft_seconds=0.05)
    ids = torch.tensor([[5, 9, 13, 7, 5, 9]])
    outs = [specdec.generate(target, ids, DraftModel(draft, k=4, top_k=2), max_new_tokens=30, do_sample=True,
                             cost_model=costs, generator=torch.Generator().manual_seed(3), eos_token_id=None,
                             return_dict_in_generate=True) for _ in range(3)]
    assert all(torch.equal(o.sequences, outs[0].sequences) for o in outs)
    assert len({o.stats.drafted for o in outs}) == 1
    assert Controller(costs, 4).draft_cost() == 0.05


def test_draft_cost_and_row_limits_lower_the_depth():
    costs = CURVES["flat-then-steep"]
    free, dear = fixed(costs, 0.8, 10), fixed(costs, 0.8, 10)
    dear.record_draft_time(5.0, 10)  # 0.5 s per depth against a 1 s forward
    assert dear.choose([0]) < free.choose([0])
    assert free.choose([0], limits=[2]) <= 2


def test_it_learns_each_rows_acceptance_and_looks_again_after_idling():
    costs = CURVES["linear"]  # each token costs: a draft that is never accepted does not pay
    c = Controller(costs, max_depth=8)
    start = c.choose([0])
    for _ in range(30):
        c.record(0, 8, 8, nodes=8)  # row 0: every draft accepted
        c.record(1, 8, 0, nodes=8)  # row 1: nothing ever accepted
    assert c.acceptance(0)[0] > 0.9 and c.acceptance(1)[0] < 0.1
    assert c.choose([0]) >= start
    assert c.choose([1]) == 0
    assert c.choose([0]) > 0  # drafting again: the idle count starts over
    depths = [c.choose([1]) for _ in range(c.explore)]
    assert depths[-1] == 1 and set(depths[:-1]) == {0}  # one exploratory step after `explore` idle ones


def test_measured_curve_is_cached_per_model_and_monotone():
    model = tiny_llama(seed=4)
    costs = CostModel.for_model(model)
    assert CostModel.for_model(model) is costs
    assert list(costs.seconds) == sorted(costs.seconds) and all(s > 0 for s in costs.seconds)


def test_bad_cost_curves_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        CostModel((4, 2), (1.0, 1.0))
    with pytest.raises(ValueError, match="must be > 0"):
        CostModel((1, 2), (1.0, 0.0))
    with pytest.raises(ValueError, match="cost_model="):
        specdec.generate(tiny_llama(), torch.tensor([[5, 6]]), PromptLookup(), max_new_tokens=3, cost_model="fast")


def test_controller_on_changes_drafts_not_outputs():
    """A curve where every extra token costs a forward: the controller stops drafting, output unchanged."""
    target, draft = attentive(tiny_llama(seed=0)), attentive(tiny_llama(seed=1, layers=1))
    rows = [[5, 9, 13, 7, 5, 9, 13], [3, 4, 5, 3, 4]]
    ids, mask = specdec.text.left_pad([torch.tensor(r) for r in rows], pad_id=0)
    runs = {}
    for name, kwargs in {"off": {"goodput": False}, "on": {},
                         "dear": {"cost_model": CURVES["compute-bound"]}}.items():
        runs[name] = specdec.generate(target, ids, DraftModel(draft, k=4, top_k=2), attention_mask=mask,
                                      max_new_tokens=24, eos_token_id=None, pad_token_id=0,
                                      return_dict_in_generate=True, **kwargs)
    assert torch.equal(runs["on"].sequences, runs["off"].sequences)
    assert torch.equal(runs["dear"].sequences, runs["off"].sequences)
    assert runs["dear"].stats.drafted < runs["off"].stats.drafted / 4  # only the exploratory steps drafted

