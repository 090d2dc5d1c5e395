"""The acceptance rules on hand-made cases, and their distributions (fixed seeds)."""

import pytest
import torch
from scipy.stats import chisquare

from specdec.tree import DraftTree
from specdec.verify import Acceptance, accept_greedy, accept_sampling


def test_greedy_accepts_the_matching_prefix_and_adds_the_bonus():
    tree = DraftTree.chain(torch.tensor([5, 6, 7]))
    # target's choice at root, node0, node1, node2
    assert accept_greedy(tree, torch.tensor([5, 6, 9, 1])) == Acceptance([0, 1], 9)
    assert accept_greedy(tree, torch.tensor([4, 6, 7, 1])) == Acceptance([], 4)
    assert accept_greedy(tree, torch.tensor([5, 6, 7, 1])) == Acceptance([0, 1, 2], 1)


def test_greedy_follows_the_matching_branch():
    tree = DraftTree(torch.tensor([3, 4, 8, 9]), torch.tensor([-1, -1, 1, 1]))
    assert accept_greedy(tree, torch.tensor([4, 0, 9, 0, 7])) == Acceptance([1, 3], 7)
    assert accept_greedy(tree, torch.tensor([3, 2, 0, 0, 0])) == Acceptance([0], 2)


def test_empty_tree_is_one_plain_step():
    assert accept_greedy(DraftTree.empty(), torch.tensor([7])) == Acceptance([], 7)


def _one_step_frequencies(rule, tree, p, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[1], dtype=torch.long)
    for _ in range(n):
        counts[rule(tree, p, gen).tokens(tree)[0]] += 1
    return counts


def _always_accept(tree, p, generator=None):
    """A deliberately wrong rule: keep every draft."""
    return Acceptance(list(range(len(tree))), int(torch.multinomial(p[-1], 1, generator=generator)))


@pytest.mark.parametrize("deterministic", [False, True])
def test_first_token_has_the_target_distribution(deterministic):
    V, n = 6, 6000
    p = torch.tensor([[0.05, 0.4, 0.1, 0.25, 0.15, 0.05], [1 / 6] * 6])
    q_row = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    wrong = torch.zeros(V)
    for _ in range(n):
        if deterministic:
            tree = DraftTree.chain(torch.tensor([0]))
        else:
            tok = torch.multinomial(q_row, 1, generator=gen)
            tree = DraftTree.chain(tok, q=q_row[None])
        counts[accept_sampling(tree, p, gen).tokens(tree)[0]] += 1
        wrong[_always_accept(tree, p, gen).tokens(tree)[0]] += 1
    assert chisquare(counts, n * p[0]).pvalue > 1e-3
    assert chisquare(wrong + 1e-9, n * p[0]).pvalue < 1e-6  # the test can fail


def test_siblings_recursive_rejection_is_exact():
    """Three i.i.d. draws from q as siblings (SpecInfer): the first token still follows p."""
    V, n = 5, 8000
    p0 = torch.tensor([0.1, 0.2, 0.3, 0.3, 0.1])
    q_row = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    p = torch.cat([p0[None], torch.full((3, V), 1 / V)])
    gen = torch.Generator().manual_seed(2)
    counts, naive = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        toks = torch.multinomial(q_row, 3, replacement=True, generator=gen)
        tree = DraftTree(toks, torch.tensor([-1, -1, -1]), q=q_row.expand(3, V))
        counts[accept_sampling(tree, p, gen).tokens(tree)[0]] += 1
        # wrong: p is not replaced by the residual after a rejection
        naive[_accept_without_residual(tree, p, gen)] += 1
    assert chisquare(counts, n * p0).pvalue > 1e-3
    assert chisquare(naive + 1e-9, n * p0).pvalue < 1e-6


def _accept_without_residual(tree, p, gen):
    for child in range(len(tree)):
        tok = int(tree.tokens[child])
        if torch.rand((), generator=gen) < min(1.0, float(p[0, tok] / tree.q[child, tok])):
            return tok
    return int(torch.multinomial(p[0], 1, generator=gen))


def test_deterministic_siblings_are_exact():
    """Point-mass siblings (top-k or lookup branches): rejection removes the token from p."""
    V, n = 4, 6000
    p0 = torch.tensor([0.4, 0.3, 0.2, 0.1])
    p = torch.cat([p0[None], torch.full((2, V), 1 / V)])
    tree = DraftTree(torch.tensor([1, 2]), torch.tensor([-1, -1]))
    counts = _one_step_frequencies(accept_sampling, tree, p, n).float()
    assert chisquare(counts, n * p0).pvalue > 1e-3


def test_identical_p_and_q_accepts_everything():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    tree = DraftTree.chain(torch.tensor([1, 2]), q=p[:2])
    for seed in range(20):
        assert accept_sampling(tree, p, torch.Generator().manual_seed(seed)) == Acceptance([0, 1], 0)


def test_two_token_joint_distribution_of_a_chain():
    """The first two tokens of a chain step have the target's joint distribution."""
    V, n = 3, 9000
    gen = torch.Generator().manual_seed(3)
    p_root = torch.tensor([0.2, 0.5, 0.3])
    p_next = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])  # p(x2 | x1)
    q_root = torch.tensor([0.6, 0.2, 0.2])
    q_next = torch.tensor([[0.2, 0.2, 0.6], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4]])
    counts = torch.zeros(V, V)
    for _ in range(n):
        d1 = int(torch.multinomial(q_root, 1, generator=gen))
        d2 = int(torch.multinomial(q_next[d1], 1, generator=gen))
        tree = DraftTree.chain(torch.tensor([d1, d2]), q=torch.stack([q_root, q_next[d1]]))
        p = torch.stack([p_root, p_next[d1], torch.full((V,), 1 / V)])
        first = accept_sampling(tree, p, gen).tokens(tree)
        x1 = first[0]
        x2 = first[1] if len(first) > 1 else int(torch.multinomial(p_next[x1], 1, generator=gen))
        counts[x1, x2] += 1
    expected = p_root[:, None] * p_next * n
    assert chisquare(counts.flatten(), expected.flatten()).pvalue > 1e-3
