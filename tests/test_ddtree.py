"""DDTree (trees from marginals): the best-first construction equals a brute-force reference, the width
the cost curve picks equals a brute-force argmax, PARD and Medusa with DDTree trees equal model.generate
(single prompts, left-padded batches, EOS inside a block), the sampling law holds (a wrong rule fails),
and threads and interrupts change no result."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec
import specdec.engine
from specdec.control import CostModel
from specdec.drafters import Medusa, Pard, PardDraft
from specdec.drafters.pard import PardNet
from specdec.drafters.ddtree import BlockProposer, DDTree, TreeBuilder, as_ddtree, best_first, choose_width
from specdec.engine import decode
from specdec.options import Options
from specdec.text import left_pad

from concurrency import ROWS, alone, interrupted_calls, new_tokens, thread_failures
from conftest import attentive, tiny_llama
from test_generate import assert_rows_match_alone, medusa_heads
from test_lossless_sampling import N_TOKENS, PROMPT, SAMPLING, V, accept_every_draft, chi2_pvalue, exact_joint

FLAT = CostModel((1, 2, 4, 8, 16), (1.0, 1.0, 1.05, 1.1, 1.3), draft_seconds=0.0)  # drafting pays: trees are sized


# --- the construction ----------------------------------------------------------------------------------


def reference(logq: torch.Tensor, budget: int) -> list[tuple[int, ...]]:
    """Every prefix with a positive probability, sorted by the documented order, the first ``budget``:
    greater path log-probability (float64 sum, root side first), then shallower, then the ranks' tuple
    (a token's rank: how many tokens at its position are likelier, or as likely with a smaller id)."""
    K, V = logq.shape
    values = logq.clamp(max=0.0).double().tolist()
    rank = [[sum(v > values[i][t] or (v == values[i][t] and u < t) for u, v in enumerate(values[i]))
             for t in range(V)] for i in range(K)]
    keyed = []
    for d in range(1, K + 1):
        for prefix in itertools.product(range(V), repeat=d):
            score = 0.0
            for i, t in enumerate(prefix):
                score += values[i][t]
            if score > -math.inf:
                keyed.append(((-score, d, tuple(rank[i][t] for i, t in enumerate(prefix))), prefix))
    keyed.sort()
    return [prefix for _, prefix in keyed[:budget]]


def prefixes(tree) -> list[tuple[int, ...]]:
    """Each node's path of tokens, root side first, in node order."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    out = []
    for node in range(len(tree)):
        out.append((out[parents[node]] if parents[node] >= 0 else ()) + (tokens[node],))
    return out


# integer logits make ties everywhere (equal products, equal tokens); -inf rules tokens out
tied = st.integers(1, 3).flatmap(lambda K: st.integers(1, 5).flatmap(lambda V: st.lists(
    st.lists(st.sampled_from([-math.inf, -2.0, -1.0, 0.0, 0.0, 1.0, 2.0]), min_size=V, max_size=V),
    min_size=K, max_size=K)))


@settings(max_examples=150, deadline=None)
@given(logits=tied, budget=st.integers(0, 40))
def test_best_first_equals_brute_force_with_ties(logits, budget):
    logq = torch.log_softmax(torch.tensor(logits), dim=-1).nan_to_num(nan=-math.inf)  # an all -inf row: none
    tree, scores = best_first(logq, budget)
    assert prefixes(tree) == reference(logq, budget)
    assert torch.equal(scores, torch.tensor([sum(logq[i, t].double().clamp(max=0).item() for i, t in enumerate(p))
                                             for p in prefixes(tree)], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(8))
def test_best_first_equals_brute_force_random(seed):
    gen = torch.Generator().manual_seed(seed)
    K, V = 1 + seed % 4, 2 + seed % 5
    logq = torch.log_softmax(torch.randn(K, V, generator=gen) * (1 + seed), dim=-1)
    for budget in (1, 3, 7, 20, V**K):
        assert prefixes(best_first(logq, budget)[0]) == reference(logq, budget)


@settings(max_examples=60, deadline=None)
@given(K=st.integers(1, 6), V=st.integers(1, 300), budget=st.integers(1, 64), seed=st.integers(0, 2**16),
       temperature=st.floats(0.1, 5.0))
def test_tree_shape_properties(K, V, budget, seed, temperature):
    """At most ``budget`` nodes (exactly, when there are enough prefixes), at most K deep, parents first, distinct
    siblings, path probabilities never rising along the node list, and every prefix of the list a tree."""
    gen = torch.Generator().manual_seed(seed)
    logq = torch.log_softmax(torch.randn(K, V, generator=gen) / temperature, dim=-1)
    tree, scores = best_first(logq, budget)
    assert len(tree) == min(budget, sum(V**d for d in range(1, K + 1)))
    assert int(tree.depths.max()) <= K
    assert (tree.parents < torch.arange(len(tree))).all()
    assert (scores[1:] <= scores[:-1]).all()
    pairs = list(zip(tree.parents.tolist(), tree.tokens.tolist()))
    assert len(set(pairs)) == len(pairs)
    assert torch.equal(tree.tokens[tree.depths == 1][:1], logq[0].argmax()[None])  # the best first token leads
    probs = scores.exp()
    for node in range(len(tree)):  # the children's mass never exceeds their parent's
        assert probs[tree.parents == node].sum() <= probs[node] * (1 + 1e-5)  # q rows sum to 1 in float32


def test_best_first_large_vocabulary_reads_only_the_top():
    """A real vocabulary: the budget's best tokens per position, not a sort of all of them."""
    logq = torch.log_softmax(torch.randn(8, 49152, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    tree, scores = best_first(logq, 32)
    assert len(tree) == 32 and scores[0] == logq[0].max().double()


# --- the width the cost curve picks ---------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.lists(st.floats(0.0, 1.0), max_size=12), min_size=1, max_size=4),
       slope=st.floats(0.0, 0.5), draft=st.floats(0.0, 2.0), min_width=st.integers(1, 6))
def test_choose_width_is_the_brute_force_argmax(rows, slope, draft, min_width):
    costs = CostModel((1, 64), (1.0, 1.0 + 63 * slope))
    gains = [torch.tensor(sorted(r, reverse=True), dtype=torch.float64) for r in rows]
    W = choose_width(gains, costs, draft, min_width)

    def rate(w):
        columns = 1 if w == 0 else max(1 + w, min_width)
        return sum(1 + float(g[:w].sum()) for g in gains) / (costs(len(gains) * columns) + draft)

    top = max(len(g) for g in gains)
    assert 0 <= W <= top
    assert rate(W) >= max(rate(w) for w in range(top + 1)) * (1 - 1e-6)


def test_choose_width_follows_the_cost_curve():
    gains = [torch.tensor([0.9, 0.5, 0.3, 0.1, 0.05], dtype=torch.float64)]
    flat = CostModel((1, 16), (1.0, 1.0))
    steep = CostModel((1, 2), (1.0, 2.0))
    assert choose_width(gains, flat) == 5  # free columns: every node with a chance
    assert choose_width(gains, steep) == 0  # a column costs a whole forward: 0.9 < 1 token
    assert choose_width([torch.tensor([0.0, 0.0], dtype=torch.float64)], flat) == 0  # no chance: no width


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="tree='dd'.*'ddtree'"):
        as_ddtree("dd", 4)
    with pytest.raises(ValueError, match="DDTree budget=0 must be >= 1"):
        DDTree(0)
    assert as_ddtree("ddtree", None) == DDTree(16) and as_ddtree("ddtree", 5) == DDTree(5)
    assert as_ddtree([[0]], 5) is None and as_ddtree(None, 5) is None


# --- greedy equality ------------------------------------------------------------------------------------


def generate_reference(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kwargs)


def pard(target, k, budget):
    """A PARD draft of all the target's layers: its root guess is the target's own, its masks untrained."""
    draft = PardDraft.from_target(target, list(range(target.config.num_hidden_layers)))
    return Pard(draft, k=k, tree="ddtree", budget=budget, quantize=False)


def medusa(target, k, budget):
    return Medusa(medusa_heads(target.config.hidden_size, 4), vocab=torch.arange(0, 64, 2), k=k, tree="ddtree",
                  budget=budget)


DRAFTERS = {"pard": pard, "medusa": medusa}
prompts = st.lists(st.integers(3, 63), min_size=1, max_size=20).map(lambda xs: torch.tensor([xs]))
sizing = st.sampled_from([dict(goodput=False), dict(cost_model=FLAT)])  # every node, or sized by a curve


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=prompts, name=st.sampled_from(sorted(DRAFTERS)), k=st.integers(1, 4), budget=st.integers(1, 12),
       max_new=st.integers(1, 24), size=sizing)
def test_greedy_equals_generate(target, ids, name, k, budget, max_new, size):
    expected = generate_reference(target, ids, max_new_tokens=max_new, eos_token_id=None)
    got = specdec.generate(target, ids, DRAFTERS[name](target, k, budget), max_new_tokens=max_new,
                           eos_token_id=None, **size)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", sorted(DRAFTERS))
@pytest.mark.parametrize("eos", [None, 30])
def test_left_padded_batch_of_two_equals_generate_alone(target, name, eos):
    rows = [[5, 9, 13, 7, 5, 9, 13, 7], [3, 4, 5]]
    assert_rows_match_alone(target, rows, DRAFTERS[name](target, 4, 8), max_new_tokens=20, eos=eos, goodput=False)
    assert_rows_match_alone(target, rows, DRAFTERS[name](target, 3, 6), max_new_tokens=20, eos=eos, cost_model=FLAT)


def test_eos_inside_a_block_ends_the_row_there(target, monkeypatch):
    """The tree holds EOS with nodes below it: the row stops at EOS, as plain decoding does. (An untrained
    PARD's masks are flat, so its trees stay shallow: its marginals get a peak at the target's own greedy
    continuation, making deep trees through the EOS.)"""
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):  # a prompt whose greedy answer writes a new token mid-way: that token is the EOS
        ids = torch.randint(3, 64, (1, 6), generator=gen)
        free = generate_reference(target, ids, max_new_tokens=40, eos_token_id=None)[0, 6:].tolist()
        fresh = [i for i in range(6, 20) if free[i] not in free[:i]]
        if fresh:
            eos = free[fresh[0]]
            break
    marginals = PardNet.marginals

    def peaked(self, states, *args):
        logits = marginals(self, states, *args)  # (A, K, V)
        for a, state in enumerate(states):
            n = state.tokens.shape[1] - 6
            logits[a, torch.arange(logits.shape[1]), torch.tensor(free[n : n + logits.shape[1]])] += 10.0
        return logits

    below_eos = []
    propose = BlockProposer.propose

    def spy(self, states, *args):
        trees = propose(self, states, *args)
        for tree in trees:
            eos_nodes = (tree.tokens == eos).nonzero().flatten()
            below_eos.append(bool(torch.isin(tree.parents, eos_nodes).any()))
        return trees

    monkeypatch.setattr(PardNet, "marginals", peaked)
    monkeypatch.setattr(BlockProposer, "propose", spy)
    expected = generate_reference(target, ids, max_new_tokens=30, eos_token_id=eos)
    out = specdec.generate(target, ids, pard(target, 4, 12), max_new_tokens=30, eos_token_id=eos, pad_token_id=0,
                           goodput=False, return_dict_in_generate=True)
    assert out.sequences.tolist() == expected.tolist()
    assert out.sequences[0, -1] == eos and out.sequences.shape[1] < 6 + 30
    assert any(below_eos)  # EOS proposed with drafts after it
    assert out.stats.tau > 2.5  # the peaks are the target's own tokens: accepted


def test_depth_caps_and_budget_hold_for_every_row(target):
    """Each row's tree is at most its cap deep and ``budget`` nodes, whatever the marginals."""
    builder = DDTree(5).builder(specdec.drafters.TargetView(target, Options(goodput=False)))
    assert isinstance(builder, TreeBuilder)
    states = [specdec.drafters.DecodeState(a, torch.tensor([[3, 4, 5]]), 1, 40, Options().sampling) for a in range(3)]
    marginals = [torch.randn(4, 64), None, torch.randn(4, 64)]
    trees = builder.trees(marginals, states, depths=[2, 4, 0])
    assert [len(t) for t in trees] == [5, 0, 0]
    assert int(trees[0].depths.max()) <= 2 and trees[0].q is None


# --- sampling ------------------------------------------------------------------------------------------


def stream_counts(rule, q_rows: bool, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One verification step over a DDTree below a random target, then plain sampling to 3 tokens: the counts
    of the first 3 tokens, and their exact law. The target is a table ``p(. | prefix)`` of random rows; the
    draft's marginals are other random rows. ``q_rows``: attach the marginals as q (the tokens are then not
    draws from it: the wrong option)."""
    gen = torch.Generator().manual_seed(seed)
    V, K = 4, 2
    table = {}

    def p(prefix):
        if prefix not in table:
            table[prefix] = torch.softmax(2 * torch.randn(V, generator=gen), dim=-1)
        return table[prefix]

    logq = torch.log_softmax(2 * torch.randn(K, V, generator=gen), dim=-1)
    tree, _ = best_first(logq, 5)
    paths = prefixes(tree)
    rows = torch.stack([p(())] + [p(path) for path in paths])  # (T + 1, V): p at the root and at every node
    if q_rows:
        tree = specdec.DraftTree(tree.tokens, tree.parents, logq.exp()[tree.depths - 1])
    counts = torch.zeros(V**3)
    for _ in range(samples):
        out = rule(tree, rows, gen)
        tokens = tuple(tree.tokens[out.path].tolist()) + (out.next_token,)
        while len(tokens) < 3:  # plain decoding after the step
            tokens += (int(torch.multinomial(p(tokens), 1, generator=gen)),)
        counts[tokens[0] * V * V + tokens[1] * V + tokens[2]] += 1
    exact = torch.tensor([float(p(())[a] * p((a,))[b] * p((a, b))[c])
                          for a, b, c in itertools.product(range(V), repeat=3)])
    return counts, exact


def test_one_step_over_a_ddtree_keeps_the_law():
    """Deterministic candidates (q=None) under the recursive rule: the stream's law is the target's, and a
    wrong rule, or the marginals attached as q to tokens not drawn from them, fails the same test."""
    from specdec.verify import accept_sampling

    for seed in range(3):
        assert chi2_pvalue(*stream_counts(accept_sampling, False, 4000, seed)) > 1e-3
    assert chi2_pvalue(*stream_counts(accept_every_draft, False, 4000)) < 1e-6
    assert chi2_pvalue(*stream_counts(accept_sampling, True, 4000)) < 1e-6



@pytest.fixture(scope="module")
def small_target():
    return tiny_llama(vocab=V, seed=10, scale=4.0)


def sampled(small_target, name):
    torch.manual_seed(5)
    if name == "pard":  # a reduced vocabulary: the drafts never propose 1 or 5
        return Pard(PardDraft.from_target(small_target, [0], torch.tensor([0, 2, 3, 4])), k=3, tree="ddtree", budget=6)
    heads = specdec.drafters.MedusaHeads(small_target.config.hidden_size, 2)
    for block in heads.blocks:
        torch.nn.init.normal_(block.weight, std=0.5)
    return Medusa(heads, tree=DDTree(5))


ENGINE_SAMPLES = 400  # the engine end to end (kept short for CI); the rule's power is shown on 4000 draws above


def sample_counts(model, drafter, options):
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V**N_TOKENS)
    for _ in range(ENGINE_SAMPLES):
        (tokens,), _ = decode(model, PROMPT, drafter, options, gen)
        counts[(torch.tensor(tokens) * torch.tensor([V * V, V, 1])).sum()] += 1
    return counts


SAMPLED = Options(max_new_tokens=N_TOKENS, sampling=SAMPLING, goodput=False)  # a tree at every step


@pytest.mark.parametrize("name, options", [("pard", SAMPLED), ("medusa", dataclasses.replace(SAMPLED, goodput=True,
                                                                                               cost_model=FLAT))])
def test_sampling_matches_target(small_target, name, options):
    counts = sample_counts(small_target, sampled(small_target, name), options)
    assert chi2_pvalue(counts, exact_joint(small_target)) > 1e-3


def test_wrong_rule_is_caught(small_target, monkeypatch):
    monkeypatch.setattr(specdec.engine, "accept_sampling", accept_every_draft)
    counts = sample_counts(small_target, sampled(small_target, "medusa"), SAMPLED)
    assert chi2_pvalue(counts, exact_joint(small_target)) < 1e-6


# --- threads and interrupts ----------------------------------------------------------------------------


def test_threads_share_one_drafter_and_give_the_single_threaded_outputs():
    target = attentive(tiny_llama(seed=0, layers=2))
    drafters = {"pard": pard(target, 4, 8), "medusa": medusa(target, 3, 6)}
    assert thread_failures(target, drafters, calls_per_thread=5) == []


def test_interrupts_at_random_moments_change_no_later_result():
    """Calls cut short by a timer signal (KeyboardInterrupt) at random moments: the same drafter objects give
    the reference outputs afterwards."""
    target = attentive(tiny_llama(seed=0, layers=2))
    drafters = {"pard": pard(target, 4, 8), "medusa": medusa(target, 3, 6)}
    expected = {tuple(r): alone(target, r) for r in ROWS}
    assert interrupted_calls(target, drafters, calls=60) >= 15
    for name, drafter in drafters.items():
        assert new_tokens(target, ROWS[:3], drafter) == [expected[tuple(r)] for r in ROWS[:3]], name
    assert [alone(target, r) for r in ROWS] == [expected[tuple(r)] for r in ROWS]
    assert torch.is_grad_enabled()
