"""Tree growth for model drafters, for all rows at once: dynamic top-k with rerank, or a static shape.

One piece that every model drafter (:class:`~specdec.drafters.DraftModel`, EAGLE, early exit, the
distilled draft) composes with its own network. The network is anything with two methods
(:class:`DraftNet`): ``root(states)`` gives the logits of the root's children (after catching up on
the committed tokens), ``expand(level)`` runs the network on one level of frontier nodes of every
row in one forward (through tree attention, each node seeing its row's prefix and its ancestors) and
gives the logits of their children.

Growth (SpecInfer, Miao et al. 2024; EAGLE-2's dynamic trees, Li et al. 2024): at each depth the
``width`` most probable frontier nodes of each row (by cumulative draft log-probability) are fed,
each gets ``top_k`` children; greedy trees are reranked to a node ``budget`` at the end (a child is
never likelier than its parent, so the kept set is a tree). With a :class:`~specdec.tree.TreeSpec`
the shape is static instead (Medusa, EAGLE-1, Sequoia): node ``[0, 1]`` is the second candidate
below the first. Greedy trees take the top-ranked tokens (point masses, ``q=None``). Sampled trees
draw each node's children i.i.d. from q (after the target's temperature / top-k / top-p), which
recursive rejection needs to stay lossless; they are never pruned by value.

Everything per level is a tensor op over ``(A rows, F frontier nodes)``; Python runs per level, not
per node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from specdec.checks import as_int
from specdec.drafters.base import DecodeState
from specdec.tree import DraftTree, TreeSpec


@dataclass(frozen=True)
class Level:
    """One level of frontier nodes to feed, for every row (padded to F; ``valid`` marks real ones).

    Attributes:
        tokens: ``(A, F)`` the nodes' tokens.
        nodes: ``(A, F)`` their node ids (global over the step's nodes of the row).
        parents: ``(A, F)`` their parents' node ids (-1: the root).
        depth: the nodes' depth (1 = children of the root).
        ancestors: ``(A, F, N)`` over the N nodes fed this step so far, these last, in feed order:
            True where fed node j is the node or its ancestor.
        valid: ``(A, F)`` bool.
        key_depths: ``(A, N)`` the depth of every node fed this step so far, in feed order (their
            positions are the root's plus these).
    """

    tokens: Tensor
    nodes: Tensor
    parents: Tensor
    depth: int
    ancestors: Tensor
    valid: Tensor
    key_depths: Tensor


class DraftNet(Protocol):
    """A model drafter's network, as tree growth drives it (one per proposer)."""

    def root(self, states: list[DecodeState], depths: list[int]) -> Tensor:
        """``(A, V)`` logits of each row's root's children (after feeding what it has not seen); row ``a``
        drafts at most ``depths[a]`` deep this step."""

    def expand(self, level: Level) -> Tensor:
        """``(A, F, V)`` logits of the children of ``level``'s nodes, in one forward."""


@dataclass(frozen=True)
class Growth:
    """A grown step: each row's tree, and where its nodes came from.

    Attributes:
        trees: one :class:`DraftTree` per row.
        nodes: per row ``(T_a,)`` the global node id of each tree node.
        fed: ``(A, N)`` the node ids fed to the network, in feed order (column j: the j-th fed node).
    """

    trees: list[DraftTree]
    nodes: list[Tensor]
    fed: Tensor

    def fed_index(self, a: int, path: list[int]) -> list[int]:
        """Feed indices of the fed nodes on row ``a``'s accepted ``path`` (a prefix of the path)."""
        if not path or self.fed.shape[1] == 0:
            return []
        ids = self.nodes[a][torch.tensor(path)]
        hits = (self.fed[a][None, :] == ids[:, None])  # (len(path), N)
        out = []
        for row in hits:
            where = row.nonzero()
            if not len(where):
                break
            out.append(int(where[0]))
        return out


@dataclass(frozen=True)
class TreeShape:
    """How a model drafter grows its tree each step.

    Attributes:
        k: draft depth.
        top_k: children per expanded node (1 = a chain).
        width: frontier nodes expanded per depth (default ``top_k``).
        budget: greedy trees keep their ``budget`` most probable nodes (``None``: all).
        spec: a static shape (overrides ``top_k``/``width``/``budget``; ``k`` caps its depth).
    """

    k: int = 4
    top_k: int = 1
    width: int | None = None
    budget: int | None = None
    spec: TreeSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", as_int("draft depth k", self.k, 1))
        object.__setattr__(self, "top_k", as_int("top_k", self.top_k, 1))
        object.__setattr__(self, "width", as_int("width", self.width, 1, optional=True))
        object.__setattr__(self, "budget", as_int("budget", self.budget, 1, optional=True))

    @classmethod
    def make(cls, k: int = 4, top_k: int = 1, width: int | None = None, budget: int | None = None,
             tree: TreeSpec | list[list[int]] | None = None) -> TreeShape:
        """From a drafter's arguments (``tree`` may be a list of paths of child ranks)."""
        spec = TreeSpec.from_paths(tree) if isinstance(tree, list) else tree
        return cls(k, top_k, width, budget, spec)


def grow(shape: TreeShape, net: DraftNet, states: list[DecodeState], depths: list[int]) -> Growth:
    """Grow one tree per row with ``net``, row ``a``'s at most ``depths[a]`` deep (see the module docstring)."""
    A = len(states)
    device = states[0].tokens.device
    limits = torch.tensor([min(shape.k, d) for d in depths])  # (A,)
    depth_cap = int(limits.max()) if A else 0
    if shape.spec is not None:
        depth_cap = min(depth_cap, shape.spec.depth)
    if depth_cap == 0:
        return Growth([DraftTree.empty(device) for _ in states], [torch.empty(0, dtype=torch.long)] * A,
                      torch.empty(A, 0, dtype=torch.long))
    sampling, generator = states[0].sampling, states[0].generator
    n_generated = torch.tensor([s.n_generated for s in states])  # (A,)
    plan = _Plan(shape, depth_cap)
    nodes = _Nodes(A, plan.total, sampling.do_sample)
    fed = torch.empty(A, 0, dtype=torch.long)
    logits = net.root(states, limits.tolist())[:, None, :]  # (A, 1, V): the root is the one frontier node of depth 0
    frontier = torch.full((A, 1), -1, dtype=torch.long)
    frontier_valid = limits[:, None] > 0
    for d in range(1, depth_cap + 1):
        # 1. children of the frontier, from the network's logits
        nodes.add_children(logits, frontier, frontier_valid & (limits[:, None] >= d), plan.children(d), d,
                           n_generated + d - 1, sampling, generator)
        if d == depth_cap:
            break
        # 2. the next frontier: the likeliest nodes of this level (or the static shape's)
        frontier, frontier_valid = plan.frontier(d, nodes)
        frontier_valid &= limits[:, None] > d
        if not frontier_valid.any():
            break
        # 3. feed it, one forward for every row
        fed = torch.cat([fed, frontier], dim=1)
        ancestors = nodes.ancestors.gather(1, frontier[:, :, None].expand(-1, -1, nodes.ancestors.shape[2]))
        ancestors = ancestors.gather(2, fed[:, None, :].expand(-1, frontier.shape[1], -1))  # (A, F, N_fed)
        parents = nodes.parents.gather(1, frontier)
        level = Level(nodes.tokens.gather(1, frontier).to(device), frontier, parents, d, ancestors.to(device),
                      frontier_valid, nodes.depth.gather(1, fed))
        logits = net.expand(level)  # (A, F, V)
    keep = nodes.valid.clone()
    if shape.spec is None and shape.budget is not None and not sampling.do_sample:
        keep &= _rerank(nodes, shape.budget)
    trees, ids = [], []
    for a in range(A):
        kept = keep[a].nonzero().flatten()
        trees.append(nodes.tree(a, kept, device))
        ids.append(kept)
    return Growth(trees, ids, fed)


class _Plan:
    """Which children each level has: ``(frontier slot, rank)`` pairs, and how the frontier is picked."""

    def __init__(self, shape: TreeShape, depth: int) -> None:
        self.shape, self.depth = shape, depth
        width = shape.width or shape.top_k
        if shape.spec is None:
            self.sizes = [shape.top_k]  # level 1: the root's children
            for _ in range(2, depth + 1):
                self.sizes.append(min(width, self.sizes[-1]) * shape.top_k)
            self.total = sum(self.sizes)
            return
        spec = shape.spec
        spec_depths = DraftTree(torch.zeros(len(spec), dtype=torch.long), torch.tensor(spec.parents)).depths.tolist()
        self.levels = [[i for i, dd in enumerate(spec_depths) if dd == d] for d in range(1, depth + 1)]  # spec ids
        has_kids = {p for p in spec.parents}
        self.spec_frontier = [[i for i in level if i in has_kids] for level in self.levels]
        self.sizes = [len(level) for level in self.levels]
        self.total = sum(self.sizes)

    def children(self, d: int) -> tuple[Tensor, Tensor]:
        """``(C,)`` frontier slot and ``(C,)`` rank of each child at depth ``d``."""
        if self.shape.spec is None:
            F = 1 if d == 1 else min(self.shape.width or self.shape.top_k, self.sizes[d - 2])
            slots = torch.arange(F).repeat_interleave(self.shape.top_k)
            ranks = torch.arange(self.shape.top_k).repeat(F)
            return slots, ranks
        frontier = [-1] if d == 1 else self.spec_frontier[d - 2]
        slot = {spec_id: f for f, spec_id in enumerate(frontier)}
        spec = self.shape.spec
        level = self.levels[d - 1]
        return (torch.tensor([slot[spec.parents[i]] for i in level]), torch.tensor([spec.ranks[i] for i in level]))

    def frontier(self, d: int, nodes: _Nodes) -> tuple[Tensor, Tensor]:
        """``(A, F)`` node ids to expand after level ``d``, and which are real."""
        lo, hi = sum(self.sizes[: d - 1]), sum(self.sizes[:d])
        if self.shape.spec is None:
            width = min(self.shape.width or self.shape.top_k, hi - lo)
            scores = nodes.logp[:, lo:hi].masked_fill(~nodes.valid[:, lo:hi], float("-inf"))
            best = scores.topk(width, dim=1)
            ids = best.indices + lo
            return ids, best.values > float("-inf")
        level = self.levels[d - 1]
        ids = torch.tensor([lo + level.index(i) for i in self.spec_frontier[d - 1]], dtype=torch.long)
        ids = ids[None].repeat(nodes.valid.shape[0], 1)
        return ids, nodes.valid.gather(1, ids)


class _Nodes:
    """Every row's nodes of one step: ``(A, N)`` tokens, parents, log-probs, depths, validity, q, ancestors."""

    def __init__(self, A: int, total: int, sampled: bool) -> None:
        self.tokens = torch.zeros(A, total, dtype=torch.long)
        self.parents = torch.full((A, total), -1, dtype=torch.long)
        self.logp = torch.full((A, total), float("-inf"))
        self.depth = torch.zeros(A, total, dtype=torch.long)
        self.valid = torch.zeros(A, total, dtype=torch.bool)
        self.ancestors = torch.zeros(A, total, total, dtype=torch.bool)
        self.q: Tensor | None = None
        self.sampled, self.count = sampled, 0

    def add_children(self, logits: Tensor, frontier: Tensor, frontier_valid: Tensor, plan: tuple[Tensor, Tensor],
                     d: int, n_before: Tensor, sampling, generator) -> None:
        """Children at depth ``d`` of the frontier nodes ``(A, F)`` whose logits are ``(A, F, V)``."""
        slots, ranks = plan  # (C,), (C,)
        A, F, V = logits.shape
        scores = sampling.process(logits.reshape(A * F, V), n_before.repeat_interleave(F).to(logits.device))
        logq = torch.log_softmax(scores, dim=-1).float().cpu()  # (A*F, V)
        C = len(slots)
        if self.sampled:
            q = logq.exp()
            draws = torch.multinomial(q, int(ranks.max()) + 1, replacement=True, generator=generator)  # (A*F, R)
            draws = draws.reshape(A, F, -1)
            tokens = draws[:, slots, ranks]  # (A, C)
            child_logq = logq.reshape(A, F, V)[torch.arange(A)[:, None], slots[None, :], tokens]
            q_rows = q.reshape(A, F, V)[:, slots]  # (A, C, V): each child's distribution is its parent's q
            self.q = q_rows if self.q is None else torch.cat([self.q, q_rows], dim=1)
        else:
            top = logq.topk(int(ranks.max()) + 1, dim=-1)
            tokens = top.indices.reshape(A, F, -1)[:, slots, ranks]  # (A, C)
            child_logq = top.values.reshape(A, F, -1)[:, slots, ranks]
        parent = frontier[:, slots]  # (A, C)
        parent_logp = torch.where(parent >= 0, self.logp.gather(1, parent.clamp(min=0)), torch.zeros(()))
        lo, hi = self.count, self.count + C
        self.tokens[:, lo:hi] = tokens
        self.parents[:, lo:hi] = parent
        self.logp[:, lo:hi] = parent_logp + child_logq
        self.depth[:, lo:hi] = d
        self.valid[:, lo:hi] = frontier_valid[:, slots] & (child_logq > float("-inf"))
        idx = torch.arange(lo, hi)
        if d > 1:
            self.ancestors[:, lo:hi] = self.ancestors.gather(
                1, parent.clamp(min=0)[:, :, None].expand(-1, -1, self.ancestors.shape[2]))
        self.ancestors[:, idx, idx] = True
        self.count = hi

    def tree(self, a: int, kept: Tensor, device: torch.device) -> DraftTree:
        """Row ``a``'s nodes ``kept`` (ascending) as a :class:`DraftTree` on ``device``."""
        remap = torch.full((self.tokens.shape[1] + 1,), -1, dtype=torch.long)
        remap[kept] = torch.arange(len(kept))
        parents = self.parents[a, kept]
        parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
        q = None if self.q is None else self.q[a, kept].to(device)
        tree = DraftTree(self.tokens[a, kept].to(device), parents.to(device), q)
        tree.__dict__["ancestors"] = self.ancestors[a][kept][:, kept].to(device)  # known already: skip the closure
        tree.__dict__["depths"] = self.depth[a, kept].to(device)
        return tree


def _rerank(nodes: _Nodes, budget: int) -> Tensor:
    """``(A, N)`` the ``budget`` most probable valid nodes of each row (ties: shallower first)."""
    A, N = nodes.logp.shape
    if N <= budget:
        return torch.ones(A, N, dtype=torch.bool)
    scores = nodes.logp.masked_fill(~nodes.valid, float("-inf"))
    by_depth = nodes.depth.argsort(dim=1, stable=True)
    order = scores.gather(1, by_depth).argsort(dim=1, descending=True, stable=True)
    ranked = by_depth.gather(1, order)[:, :budget]  # (A, budget) node ids
    keep = torch.zeros(A, N, dtype=torch.bool)
    keep.scatter_(1, ranked, True)
    return keep
