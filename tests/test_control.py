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
    four = CostModel.for_model(model, rows=3)  # batch sizes share a curve per power of two
    assert four is CostModel.for_model(model, rows=4) and four is not costs
    assert all(t % 4 == 0 for t in four.tokens) and four.tokens[0] == 4
    assert CostModel.for_model(model, rows=2, measure=False) is four  # mid-call: the nearest larger one
    assert CostModel.for_model(model, rows=2) is not four  # a call of 2 rows measures its own


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



def chains(lengths, vocab=50):
    return [specdec.DraftTree.chain(torch.arange(1, n + 1) % vocab) if n else specdec.DraftTree.empty()
            for n in lengths]


def brute_force_cut(costs, alpha, lengths):
    """Every common depth W over chains of these lengths: expected tokens 1 + sum_{d<=min(W,L)} alpha^d per
    row, cost c(rows * (1 + max min(W, L))); the best W (ties: the deeper)."""
    def rate(W):
        tokens = sum(1 + sum(alpha**d for d in range(1, min(W, n) + 1)) for n in lengths)
        return tokens / costs(len(lengths) * (1 + max(min(W, n) for n in lengths)))

    W = max(range(max(lengths) + 1), key=lambda w: (rate(w), w))
    return [min(W, n) for n in lengths]


@pytest.mark.parametrize("curve", list(CURVES))
@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("lengths", [[5], [2], [5, 0, 0, 0], [5, 5, 5, 5], [3, 1, 0, 6], [8, 0, 2, 0, 0, 0, 0, 1]])
def test_cut_after_drafting_is_the_brute_force_optimum(curve, alpha, lengths):
    costs = CURVES[curve]
    trees = chains(lengths)
    cut = fixed(costs, alpha, max_depth=10).trim(list(range(len(trees))), trees)
    assert [len(t) for t in cut] == brute_force_cut(costs, alpha, lengths)
    for before, after in zip(trees, cut):  # a prefix: node i is still node i
        assert torch.equal(after.tokens, before.tokens[: len(after)])


def test_a_lone_match_in_a_batch_is_cut_and_a_tree_out_of_depth_order_is_kept_whole_or_dropped():
    costs = CURVES["flat-then-steep"]
    cut = fixed(costs, 0.7, 10).trim([0, 1], chains([6, 0]))
    assert len(cut[0]) == 2  # 2 x 7 columns for one row's gain do not pay, 2 x 3 do (2.55 tokens/s against 2.19)
    assert fixed(costs, 0.7, 10).trim([0, 1, 2, 3], chains([6, 0, 0, 0]))[0].tokens.numel() == 0  # 4 rows: nothing
    # nodes [depth 1, depth 2, depth 1]: no prefix is a depth cut, so the tree stays whole or goes
    odd = specdec.DraftTree(torch.tensor([4, 5, 6]), torch.tensor([-1, 0, -1]))
    for alpha in (0.05, 0.99):
        (kept,) = fixed(costs, alpha, 10).trim([0], [odd])
        assert len(kept) in (0, 3)
    assert len(fixed(costs, 0.99, 10).trim([0], [odd])[0]) == 3
    assert len(fixed(CURVES["compute-bound"], 0.3, 10).trim([0], [odd])[0]) == 0


def test_the_engine_cuts_greedy_drafts_only(monkeypatch):
    """The cut depends on the drafted tree, so it would bias sampled nodes: sampling never calls it;
    greedy output is unchanged by it."""
    target = attentive(tiny_llama(seed=0))
    calls = []
    original = Controller.trim

    def spy(self, rows, trees, min_width=1):
        calls.append(len(trees))
        return original(self, rows, trees, min_width)

    monkeypatch.setattr(Controller, "trim", spy)
    ids = torch.tensor([[5, 9, 13, 7, 5, 9, 13, 7, 5]])
    specdec.generate(target, ids, PromptLookup(k=5), max_new_tokens=12, do_sample=True, eos_token_id=None,
                     generator=torch.Generator().manual_seed(0), cost_model=CURVES["flat-then-steep"])
    assert calls == []
    out = specdec.generate(target, ids, PromptLookup(k=5), max_new_tokens=12, eos_token_id=None,
                           cost_model=CURVES["compute-bound"], return_dict_in_generate=True)
    assert calls and torch.equal(out.sequences, target.generate(ids, attention_mask=torch.ones_like(ids),
                                                                 max_new_tokens=12, do_sample=False,
                                                                 eos_token_id=None, pad_token_id=0))


def test_cut_model_drafter_trees_keep_the_batch_exact(monkeypatch):
    """A draft model's trees (top-2 children, several nodes per depth) in a left-padded batch, on a curve
    where wide verifications cost: the cut shortens trees, and every row still equals model.generate."""
    target, draft = attentive(tiny_llama(seed=0)), attentive(tiny_llama(seed=1, layers=1))
    cuts = []
    original = Controller.trim

    def spy(self, rows, trees, min_width=1):
        out = original(self, rows, trees, min_width)
        cuts.extend(len(a) < len(b) for a, b in zip(out, trees))
        return out

    monkeypatch.setattr(Controller, "trim", spy)
    rows = [[5, 9, 13, 7, 5, 9, 13], [3, 4, 5, 3, 4]]
    ids, mask = specdec.text.left_pad([torch.tensor(r) for r in rows], pad_id=0)
    got = specdec.generate(target, ids, DraftModel(draft, k=4, top_k=2), attention_mask=mask, max_new_tokens=24,
                           eos_token_id=None, pad_token_id=0, cost_model=CURVES["linear"])
    assert any(cuts)
    for i, row in enumerate(rows):
        alone = target.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got[i, -24:].tolist() == alone[0, len(row):].tolist()
