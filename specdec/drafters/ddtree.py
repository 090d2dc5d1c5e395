"""DDTree: a draft tree built best-first from a block drafter's per-position distributions
(arXiv 2604.12989, "Diffusion Draft Trees").

A block drafter (PARD, Medusa's heads, a DFlash-style drafter on the target's features) gives, from one
forward, a distribution ``q_i`` over the vocabulary for each position ``i = 1 .. K`` after the root, each
conditioned on the committed prefix only, not on the drafted tokens before it: independent *marginals*.
Under the factorised draft ``q(t_1 .. t_d) = prod_i q_i(t_i)`` the chance that the target's continuation
passes through the node of prefix ``(t_1 .. t_d)`` (that the node is accepted) is that product, and the
tree's expected accepted length is the sum of it over the tree's nodes. The tree of ``budget`` nodes of
greatest expected accepted length is therefore the ``budget`` prefixes of greatest product; a prefix's
product never exceeds its parent's, so they form a tree. :func:`best_first` enumerates them with a heap,
never looking at the ``V ** K`` prefixes: popping a node pushes its next sibling (its parent's next-ranked
token at its position) and its first child (the best token at the next position), so the heap holds at
most ``2 * budget`` prefixes and only the ``budget`` best tokens of each position are ever read.

Order and ties (what :func:`best_first` returns, and what the brute-force reference in the tests sorts by):
nodes by greater path log-probability (the sum, in float64, of the float32 log-probabilities along the
path, root side first), then shallower, then by the tuple of the path's *ranks*, where a token's rank at
a position orders the tokens by greater probability, then by smaller token id. Prefixes of probability 0
are never nodes. The nodes come out in that order, so every prefix of the node list is itself a tree (the
cut :func:`choose_width` and the engine's greedy trim make).

Sizing (:func:`choose_width`): the verification cost of ``1 + W`` columns per row comes from the goodput
controller's measured curve (:class:`~specdec.control.CostModel`); each row's expected tokens with its
first ``W`` nodes is ``1 + sum`` of their path probabilities (the acceptance estimate of the factorised
draft); the common width ``W <= budget`` of greatest expected tokens per second of the step (its draft
forward included) is kept. The rows of a batch are padded to the widest tree, hence one width for all.

Sampling keeps the target's law exactly: the nodes are *deterministic candidates* (``q=None``, point
masses, as prompt lookup's trees), not draws. Under the recursive rule of :mod:`specdec.verify`, a node's
children ``c_1, c_2, ...`` (distinct tokens) are tried in order, ``c_j`` accepted with probability
``p'(c_j)`` where ``p'`` is the target's p with the rejected ``c_1 .. c_{j-1}`` removed and renormalised,
and the recovered token is drawn from what is left: the token emitted below the node is distributed as p
whatever the candidates are, provided they are chosen without looking at the target's draws. The tree here
is a function of the draft's marginals (and of the cost curve) only, so the output law is the target's.
Attaching the marginals as q would instead require the tokens to be *drawn* from them (i.i.d. siblings),
which is not the best-first tree; with point masses a node is accepted with the target's probability
mass of its candidates, which for a given number of candidates is at least what i.i.d. draws from q give.

p is the target distribution and q the draft's, everywhere.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.checks import as_int
from specdec.control import CostModel
from specdec.drafters.base import DecodeState, Proposer, TargetView
from specdec.tree import DraftTree, TreeSpec
from specdec.verify import Acceptance


def ranked(logq: Tensor, R: int) -> tuple[list[list[float]], list[list[int]]]:
    """The ``R`` best tokens of each position, by greater log-probability then smaller id (finite only).

    ``logq: (K, V)`` log-probabilities; returns per position the log-probabilities and the token ids, in rank
    order (a position with fewer than ``R`` possible tokens lists fewer).
    """
    values, tokens = [], []
    if R == 0:
        return [[] for _ in range(logq.shape[0])], [[] for _ in range(logq.shape[0])]
    R = min(R, logq.shape[1])
    threshold = logq.topk(R, dim=-1).values[:, -1]  # (K,) the R-th best value: ties past it may rank before R
    for i in range(logq.shape[0]):
        ids = ((logq[i] >= threshold[i]) & torch.isfinite(logq[i])).nonzero().flatten()  # ascending ids
        order = logq[i, ids].argsort(descending=True, stable=True)[:R]  # equal values keep the smaller id first
        values.append(logq[i, ids[order]].clamp(max=0.0).double().tolist())
        tokens.append(ids[order].tolist())
    return values, tokens


def best_first(logq: Tensor, budget: int) -> tuple[DraftTree, Tensor]:
    """The ``budget`` likeliest prefixes under independent per-position marginals, as a tree.

    Args:
        logq: ``(K, V)`` log-probabilities of the draft's marginals at positions 1..K after the root
            (``-inf`` where a token is ruled out); the tree is at most ``K`` deep.
        budget: the most nodes.

    Returns:
        The tree (``q=None``: deterministic candidates) with its nodes in best-first order (see the module
        docstring for the order and its ties), and ``(T,)`` float64 each node's path log-probability.
    """
    budget = as_int("DDTree budget", budget, 0)
    device = logq.device
    values, tokens = ranked(logq.detach().float().cpu(), budget)
    K = len(values)
    node_tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    # heap entries (-score, depth, ranks, parent node): a node's key is greater than that of the node that
    # pushed it (its previous sibling or its parent), so pops come in the global order of the keys
    heap = [(-values[0][0], 1, (0,), -1)] if K and values[0] else []
    while heap and len(node_tokens) < budget:
        neg, depth, ranks, parent = heapq.heappop(heap)
        node = len(node_tokens)
        node_tokens.append(tokens[depth - 1][ranks[-1]])
        parents.append(parent)
        scores.append(-neg)
        sibling = ranks[-1] + 1
        if sibling < len(values[depth - 1]):
            base = scores[parent] if parent >= 0 else 0.0
            heapq.heappush(heap, (-(base + values[depth - 1][sibling]), depth, ranks[:-1] + (sibling,), parent))
        if depth < K and values[depth]:
            heapq.heappush(heap, (-(scores[node] + values[depth][0]), depth + 1, ranks + (0,), node))
    tree = DraftTree(torch.tensor(node_tokens, dtype=torch.long, device=device),
                     torch.tensor(parents, dtype=torch.long, device=device))
    return tree, torch.tensor(scores, dtype=torch.float64)


def choose_width(gains: list[Tensor], costs: CostModel, draft_seconds: float = 0.0, min_width: int = 1) -> int:
    """The common node count ``W`` of greatest expected tokens per second for a batch of rows.

    Args:
        gains: per row ``(T_a,)`` its nodes' path probabilities in best-first order (the acceptance estimate).
        costs: the verification cost by total tokens (all rows together).
        draft_seconds: the step's drafting time, paid whatever ``W`` is.
        min_width: verification forwards carrying drafts are padded to this many columns per row.

    Returns:
        ``W`` in ``[0, max T_a]`` maximising ``sum_a (1 + sum(gains[a][:W])) / (c(A * columns(W)) + draft)``,
        the smallest on ties; each row then keeps its first ``min(W, T_a)`` nodes.
    """
    A = len(gains)
    if A == 0:
        return 0
    top = max(len(g) for g in gains)
    cumulative = [torch.cat([torch.zeros(1, dtype=torch.float64), g.double().cumsum(0)]).tolist() for g in gains]

    def rate(W: int) -> float:
        tokens = sum(1.0 + c[min(W, len(c) - 1)] for c in cumulative)
        columns = 1 if W == 0 else max(1 + W, min_width)
        return tokens / (costs(A * columns) + draft_seconds)

    best, best_rate = 0, rate(0)
    for W in range(1, top + 1):
        if rate(W) > best_rate * (1 + 1e-9):  # wider only when strictly better
            best, best_rate = W, rate(W)
    return best


@dataclass(frozen=True)
class DDTree:
    """A drafter's tree setting: best-first trees over its per-position marginals (see the module docstring).

    Attributes:
        budget: the most nodes per row and step.
        goodput: size each step's trees by the cost curve (:func:`choose_width`; only when the call's
            ``goodput`` option is on too); ``False``: always ``budget`` nodes.
    """

    budget: int = 16
    goodput: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", as_int("DDTree budget", self.budget, 1))
        if not isinstance(self.goodput, bool):
            raise ValueError(f"DDTree goodput={self.goodput!r} must be True or False")

    def builder(self, view: TargetView) -> TreeBuilder:
        """The per-call piece that turns marginals into trees (holds the call's drafting time)."""
        return TreeBuilder(self, view)


def as_ddtree(tree, budget: int | None, default_budget: int = 16) -> DDTree | None:
    """A drafter's ``tree`` argument as a :class:`DDTree` (``"ddtree"`` takes the drafter's ``budget``), or
    ``None`` when it is a shape (a ``TreeSpec``, paths of ranks or ``None``)."""
    if isinstance(tree, DDTree):
        return tree
    if isinstance(tree, str):
        if tree != "ddtree":
            raise ValueError(f"tree={tree!r} is not a tree: give 'ddtree' (best-first over the draft's marginals), "
                             "a TreeSpec, or a list of paths of child ranks such as [[0], [1], [0, 0]]")
        return DDTree(default_budget if budget is None else budget)
    if tree is not None and not isinstance(tree, (TreeSpec, list)):
        raise ValueError(f"tree of type {type(tree).__name__}: give 'ddtree', a DDTree, a TreeSpec or paths of ranks")
    return None


class TreeBuilder:
    """One call's trees from marginals: each row's best-first tree, cut to the width that pays."""

    def __init__(self, ddtree: DDTree, view: TargetView) -> None:
        self.ddtree, self.view = ddtree, view
        self.draft_seconds: float | None = None  # the drafting time per step, a running mean

    def costs(self, rows: int) -> CostModel | None:
        """The verification cost curve for ``rows`` rows, or ``None`` when trees are not sized."""
        options = self.view.options
        if not (self.ddtree.goodput and options.goodput):
            return None
        return options.cost_model or CostModel.for_model(self.view.model, rows, measure=False)

    def trees(self, marginals: list[Tensor | None], states: list[DecodeState], depths: list[int] | None = None,
              seconds: float | None = None) -> list[DraftTree]:
        """One tree per row.

        Args:
            marginals: per row ``(K, V)`` the draft's raw logits at positions 1..K after the root
                (``None``: no draft for the row); processed like the target's (temperature, top-k, top-p,
                masks) before ranking.
            states: the rows.
            depths: each row's depth cap this step (``None``: ``state.budget``, the output's room).
            seconds: how long the drafting of this step took (for the width choice).
        """
        if seconds is not None:
            self.draft_seconds = seconds if self.draft_seconds is None else 0.8 * self.draft_seconds + 0.2 * seconds
        trees, gains = [], []
        caps = [s.budget for s in states] if depths is None else depths
        for logits, state, cap in zip(marginals, states, caps):
            depth = 0 if logits is None else max(0, min(logits.shape[0], cap, state.budget))
            if depth == 0:
                trees.append(DraftTree.empty(state.tokens.device))
                gains.append(torch.zeros(0, dtype=torch.float64))
                continue
            n_before = state.n_generated + torch.arange(depth, device=logits.device)  # (K,)
            logq = torch.log_softmax(state.sampling.process(logits[:depth], n_before), dim=-1)  # (K, V)
            tree, scores = best_first(logq, self.ddtree.budget)
            trees.append(DraftTree(tree.tokens.to(state.tokens.device), tree.parents.to(state.tokens.device)))
            gains.append(scores.exp())
        costs = self.costs(len(states))
        if costs is None:
            return trees
        draft = costs.draft_seconds if costs.draft_seconds is not None else (self.draft_seconds or 0.0)
        W = choose_width(gains, costs, draft, self.view.options.min_verify_tokens)
        return [tree if len(tree) <= W else tree.select(torch.arange(W)) for tree in trees]


class BlockProposer(Proposer):
    """A block drafter's proposer with DDTree trees: the network's one forward gives every row's marginals.

    The network gives ``rows`` (a :class:`~specdec.drafters.network.RowTable`), ``prefill(states, verified)``,
    ``marginals(states, depths) -> (A, K, V)`` logits at positions 1..K for every held row, and
    ``commit(states, fed, verified)`` (nothing of the tree is fed to it: ``fed`` is empty).
    """

    def __init__(self, net, ddtree: DDTree, view: TargetView) -> None:
        self.net, self.builder = net, ddtree.builder(view)
        self.needs = net.needs

    def prefill(self, states: list[DecodeState], verified) -> None:
        self.net.prefill(states, verified)

    @torch.no_grad()
    def propose(self, states: list[DecodeState], depths: list[int] | None = None) -> list[DraftTree]:
        depths = [s.budget for s in states] if depths is None else depths
        full, where, full_depths = self.net.rows.full(states, depths)
        t0 = time.perf_counter()
        logits = self.net.marginals(full, full_depths)  # (A, K, V)
        seconds = time.perf_counter() - t0
        return self.builder.trees([logits[a] for a in where], states, depths, seconds)

    def commit(self, states: list[DecodeState], results: list[Acceptance], verified) -> None:
        self.net.commit(states, {}, verified)
