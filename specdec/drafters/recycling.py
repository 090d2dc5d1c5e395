"""Token Recycling: draft from the target's own earlier candidates (Luo et al. 2024, "Turning Trash into
Treasure: Accelerating Inference of Large Language Models with Token Recycling").

Every verification scores the root and every node of a tree, and most of those scores are thrown
away with the rejected nodes. Token Recycling keeps them: an adjacency table maps a token to the
target's top-k next tokens the last time it was verified (at any position, accepted or not; the
latest verification overwrites). Each step a tree is retrieved from the table by a breadth-first
walk from the root token along a static tree shape (a :class:`~specdec.tree.TreeSpec`: the paper's
tree template): the node of rank r below a node holding token t holds ``table[t][r]``. A token the
table has never seen gets no children. Retrieval is a few dictionary reads; no draft model runs.

The proposer asks for ``Needs(logits=True)``: the engine hands it the last verification's logits ``(T + 1, V)``
and tokens ``(T + 1,)`` (root and every node) before each commit. By default the table lives for
one call (one table for all rows of the call); with ``shared=True`` it lives on the drafter, one per
target, across calls and threads (the paper keeps it across requests: later calls start warm).
Deterministic: ``q`` is ``None``.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from specdec.checks import as_int
from specdec.drafters.base import DecodeState, Drafter, Needs, PerTarget, Proposer, TargetView, Verified
from specdec.tree import DraftTree, TreeSpec
from specdec.verify import Acceptance

# 8 nodes, 4 deep: a forward of 9 tokens costs about 1.4x one of 1 on this CPU (experiments.bench_forward)
DEFAULT_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]


class RecyclingTable:
    """The adjacency table: token -> the target's top-``k`` next tokens at its latest verification.

    Thread-safe (one lock for reads and writes); every row is replaced whole, so a write cut short
    by an interrupt leaves only whole rows.
    """

    def __init__(self, k: int) -> None:
        self.k = as_int("RecyclingTable k", k, 1)
        self.rows: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def update(self, verified: Tensor, logits: Tensor) -> None:
        """Write the candidates of every verified position, in order (a later position overwrites).

        Args:
            verified: ``(T + 1,)`` the token at the root and at every node.
            logits: ``(T + 1, V)`` the target's logits there.
        """
        top = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices.tolist()  # (T + 1, k)
        tokens = verified.tolist()
        with self._lock:
            for tok, row in zip(tokens, top):
                self.rows[tok] = row

    def retrieve(self, root: int, parents: list[int], ranks: list[int], depths: list[int],
                 max_depth: int) -> tuple[list[int], list[int]]:
        """The template's nodes that the table can fill, below ``root``.

        Args:
            root: the token the tree hangs below.
            parents, ranks, depths: the template in breadth-first order (parent index, child rank, depth).
            max_depth: deepest node to keep.

        Returns:
            ``(tokens, parents)`` of the filled nodes (in template order), parents renumbered.
        """
        node_token: list[int | None] = [None] * len(parents)
        index: list[int] = [-1] * len(parents)
        tokens: list[int] = []
        out_parents: list[int] = []
        with self._lock:
            rows = self.rows
            for i, (parent, rank, depth) in enumerate(zip(parents, ranks, depths)):
                if depth > max_depth:
                    break  # breadth-first: every later node is as deep or deeper
                above = root if parent < 0 else node_token[parent]
                if above is None:
                    continue
                row = rows.get(above)
                if row is None or rank >= len(row):
                    continue
                node_token[i] = row[rank]
                index[i] = len(tokens)
                tokens.append(row[rank])
                out_parents.append(-1 if parent < 0 else index[parent])
        return tokens, out_parents


class TokenRecycling(Drafter):
    """Token Recycling: a tree retrieved from the target's recycled top-k candidates.

    Args:
        tree: the static tree shape, as paths of child ranks (``[[0], [1], [0, 0]]``: the root's two
            best candidates, and the best after the best); default :data:`DEFAULT_TREE` (8 nodes).
        top_k: candidates kept per token (default: the largest rank in ``tree`` + 1).
        shared: keep one table per target on the drafter across calls and threads (warm starts),
            instead of a fresh table per call.
    """

    def __init__(self, tree: list[list[int]] | None = None, top_k: int | None = None, shared: bool = False) -> None:
        spec = TreeSpec.from_paths([list(p) for p in (DEFAULT_TREE if tree is None else tree)])
        need = max(spec.ranks) + 1
        top_k = need if top_k is None else as_int("TokenRecycling top_k", top_k, 1)
        if top_k < need:
            raise ValueError(f"TokenRecycling top_k={top_k} is smaller than the tree's widest rank + 1 ({need}): "
                             f"keep at least {need} candidates per token")
        self.spec, self.top_k, self.shared = spec, top_k, shared
        paths = _paths(spec)
        order = sorted(range(len(spec)), key=lambda i: (len(paths[i]), paths[i]))  # breadth-first, ranks in order
        where = {node: i for i, node in enumerate(order)}
        self.parents = [where[spec.parents[i]] if spec.parents[i] >= 0 else -1 for i in order]
        self.ranks = [spec.ranks[i] for i in order]
        self.depths = [len(paths[i]) for i in order]
        self._tables = PerTarget()

    @property
    def k(self) -> int:
        """The tree's depth (what :class:`~specdec.drafters.Adaptive` caps)."""
        return max(self.depths)

    def table(self, target: torch.nn.Module) -> RecyclingTable:
        """The shared table of ``target`` (``shared=True``)."""
        return self._tables.get(target, lambda: RecyclingTable(self.top_k))

    def proposer(self, view: TargetView) -> Proposer:
        return _RecyclingProposer(self, self.table(view.model) if self.shared else RecyclingTable(self.top_k))


def _paths(spec: TreeSpec) -> list[tuple[int, ...]]:
    """Each node's path of ranks from the root."""
    paths: list[tuple[int, ...]] = []
    for parent, rank in zip(spec.parents, spec.ranks):
        paths.append((paths[parent] if parent >= 0 else ()) + (rank,))
    return paths


class _RecyclingProposer(Proposer):
    """Per call: the table (this call's own, or the drafter's shared one)."""

    needs = Needs(logits=True)

    def __init__(self, config: TokenRecycling, table: RecyclingTable) -> None:
        self.config, self.table = config, table

    def propose(self, states: list[DecodeState], depths: list[int]) -> list[DraftTree]:
        c, trees = self.config, []
        for state, depth in zip(states, depths):
            device = state.tokens.device
            tokens, parents = self.table.retrieve(int(state.tokens[0, -1]), c.parents, c.ranks, c.depths, depth)
            trees.append(DraftTree(torch.tensor(tokens, dtype=torch.long, device=device),
                                   torch.tensor(parents, dtype=torch.long, device=device)))
        return trees

    def commit(self, states: list[DecodeState], results: list[Acceptance], verified: list[Verified]) -> None:
        for seen in verified:
            if seen.logits is not None and seen.tokens is not None:
                self.table.update(seen.tokens, seen.logits)
