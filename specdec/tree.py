"""Draft trees: the tokens a drafter proposes in one step, and the buffers derived from their shape.

A tree hangs below the *root*, the last committed token (already chosen, not yet
in the target's KV cache). Node ``i`` holds ``tokens[i]`` and its parent index
``parents[i]``: ``-1`` for a child of the root, else an earlier node (``parents[i] < i``,
so nodes are in topological order). A chain of ``k`` drafts is the tree with
``parents = [-1, 0, 1, ..., k-2]``.

``q[i]`` is the draft distribution that ``tokens[i]`` was drawn from (a row over the
vocabulary, the same row for siblings drawn from one distribution); ``q=None``
means every node is a point mass (deterministic drafters: prompt lookup, top-k
branching). Everything derived from the shape (depths, ancestor mask, paths) is
computed once per tree with tensor ops, never per node per layer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class DraftTree:
    """The tokens proposed for one row in one step.

    Attributes:
        tokens: ``(T,)`` int64 draft tokens.
        parents: ``(T,)`` int64 parent node of each token, ``-1`` for the root.
        q: ``(T, V)`` draft distribution each token was drawn from, or ``None``
            when the drafter is deterministic (q is then a point mass on the token).
    """

    tokens: Tensor
    parents: Tensor
    q: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "parents"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dtype.is_floating_point or value.dtype.is_complex \
                    or value.dtype == torch.bool:
                kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"tree {name} of {kind}: token ids and parent indices must be integer tensors "
                                 "(torch.long), e.g. torch.tensor([...], dtype=torch.long)")
        if self.q is not None and (not isinstance(self.q, Tensor) or not self.q.dtype.is_floating_point):
            kind = self.q.dtype if isinstance(self.q, Tensor) else type(self.q).__name__
            raise ValueError(f"tree q of {kind}: q must be a float tensor of probabilities (T, V), or None")
        if self.tokens.dim() != 1 or self.parents.shape != self.tokens.shape:
            raise ValueError(
                f"tree tokens {tuple(self.tokens.shape)} and parents {tuple(self.parents.shape)} "
                "must both be 1-D of the same length"
            )
        if self.q is not None and (self.q.dim() != 2 or self.q.shape[0] != self.tokens.shape[0]):
            raise ValueError(f"tree q {tuple(self.q.shape)} must be (T, V) with T = {self.tokens.shape[0]}")
        order = torch.arange(len(self.parents), device=self.parents.device)
        bad = (self.parents < -1) | (self.parents >= order)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"tree node {i} has parent {int(self.parents[i])}: a parent must be -1 (the root) "
                "or an earlier node, so parents come before their children and there are no cycles"
            )

    @classmethod
    def chain(cls, tokens: Tensor, q: Tensor | None = None) -> DraftTree:
        """A chain: each token's parent is the previous token. ``tokens: (T,)``, ``q: (T, V)``."""
        tokens = tokens.reshape(-1).long()
        parents = torch.arange(-1, len(tokens) - 1, device=tokens.device)
        return cls(tokens, parents, q)

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> DraftTree:
        """No drafts: the step degrades to one plain decoding step."""
        return cls.chain(torch.empty(0, dtype=torch.long, device=device))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @cached_property
    def ancestors(self) -> Tensor:
        """``(T, T)`` bool: ``[i, j]`` is True when node ``j`` is node ``i`` or one of its ancestors."""
        n = len(self)
        idx = torch.arange(n, device=self.tokens.device)
        step = torch.zeros(n, n, dtype=torch.bool, device=self.tokens.device)
        has_parent = self.parents >= 0
        step[idx[has_parent], self.parents[has_parent]] = True
        reach = step | torch.eye(n, dtype=torch.bool, device=self.tokens.device)
        # transitive closure by repeated squaring: log2(depth) boolean matmuls
        while True:
            wider = (reach.float() @ reach.float()) > 0
            if torch.equal(wider, reach):
                return reach
            reach = wider

    @cached_property
    def depths(self) -> Tensor:
        """``(T,)`` depth of each node: 1 for children of the root."""
        return self.ancestors.sum(dim=1)

    def positions(self, root_position: int) -> Tensor:
        """``(T + 1,)`` position ids of the root and every node: ``root_position + depth``."""
        zero = torch.zeros(1, dtype=torch.long, device=self.tokens.device)
        return root_position + torch.cat([zero, self.depths])

    @cached_property
    def paths(self) -> list[Tensor]:
        """Every root-to-leaf path as a ``(depth,)`` tensor of node indices, root side first."""
        out = []
        for leaf in self._leaves().nonzero().flatten().tolist():
            nodes = self.ancestors[leaf].nonzero().flatten()
            out.append(nodes[self.depths[nodes].argsort()])
        return out

    def select(self, keep: Tensor) -> DraftTree:
        """The subtree of nodes ``keep`` (ascending; every kept node's parent kept too), parents remapped.

        ``keep: (T',)`` node indices; node ``i`` of the result is node ``keep[i]`` of this tree.
        """
        keep = keep.long().to(self.tokens.device)
        remap = torch.full((len(self) + 1,), -1, dtype=torch.long, device=self.tokens.device)  # [-1] stays -1
        remap[keep] = torch.arange(len(keep), device=self.tokens.device)
        parents = self.parents[keep]
        new_parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
        if ((parents >= 0) & (new_parents < 0)).any():
            raise ValueError("tree selection drops the parent of a kept node: keep whole root-side paths")
        return DraftTree(self.tokens[keep], new_parents, None if self.q is None else self.q[keep])

    @classmethod
    def concat(cls, trees: list[DraftTree]) -> tuple[DraftTree, list[int]]:
        """Trees side by side below one root, and the first node of each in the result.

        If any tree has ``q``, point-mass trees get one-hot rows (every node then has its own q).
        """
        offsets, tokens, parents, offset = [], [], [], 0
        for tree in trees:
            offsets.append(offset)
            tokens.append(tree.tokens)
            parents.append(torch.where(tree.parents >= 0, tree.parents + offset, tree.parents))
            offset += len(tree)
        vocab = next((t.q.shape[1] for t in trees if t.q is not None), None)
        q = None
        if vocab is not None:
            q = torch.cat([t.q if t.q is not None else torch.nn.functional.one_hot(t.tokens, vocab).float()
                           for t in trees])
        return cls(torch.cat(tokens), torch.cat(parents), q), offsets

    @staticmethod
    def split_path(path: list[int], offsets: list[int], total: int) -> list[list[int]]:
        """An accepted path of a :meth:`concat` result as each part's own node indices (empty for
        the parts it did not run through)."""
        bounds = [*offsets[1:], total]
        return [[node - lo for node in path if lo <= node < hi] for lo, hi in zip(offsets, bounds)]

    def _leaves(self) -> Tensor:
        has_child = torch.zeros(len(self), dtype=torch.bool, device=self.tokens.device)
        has_child[self.parents[self.parents >= 0]] = True
        return ~has_child


@dataclass(frozen=True)
class TreeSpec:
    """A static tree shape (Medusa / EAGLE-1 / Sequoia style), as a list of paths of child ranks.

    ``[[0], [1], [0, 0]]``: the root's best and second-best children, and the best child
    of the best. Every prefix of a path must be listed before the path itself.

    Attributes:
        parents: ``(N,)`` parent of each node (``-1`` = root), nodes in the listed order.
        ranks: ``(N,)`` which candidate (0 = most probable) each node takes among its parent's.
    """

    parents: tuple[int, ...]
    ranks: tuple[int, ...]

    @classmethod
    def from_paths(cls, paths: list[list[int]]) -> TreeSpec:
        """Build the spec; raises ``ValueError`` naming the bad path."""
        if not paths:
            raise ValueError("tree spec has no paths: give at least one, e.g. [[0]] for a single draft")
        index: dict[tuple[int, ...], int] = {}
        parents, ranks = [], []
        for path in paths:
            key = tuple(path)
            if not key or any((not isinstance(r, int)) or r < 0 for r in key):
                raise ValueError(f"tree path {path!r} must be a non-empty list of child ranks >= 0")
            if key in index:
                raise ValueError(f"tree path {path!r} is listed twice")
            if len(key) > 1 and key[:-1] not in index:
                raise ValueError(f"tree path {path!r} comes before its parent {list(key[:-1])!r}: list parents first")
            index[key] = len(parents)
            parents.append(index[key[:-1]] if len(key) > 1 else -1)
            ranks.append(key[-1])
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def from_parents(cls, parents: list[int], ranks: list[int] | None = None) -> TreeSpec:
        """Build the spec from parent indices; a cycle or a parent after its child raises ``ValueError``."""
        if not parents:
            raise ValueError("tree spec is empty: give at least one node")
        DraftTree(torch.zeros(len(parents), dtype=torch.long), torch.tensor(parents))  # validates the order
        if ranks is None:
            seen: dict[int, int] = {}
            ranks = []
            for p in parents:
                ranks.append(seen.get(p, 0))
                seen[p] = ranks[-1] + 1
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def from_accuracies(cls, accuracy: Tensor, budget: int) -> TreeSpec:
        """The ``budget``-node tree of greatest expected accepted length (Medusa's sparse trees, Sequoia).

        ``accuracy[d, r]`` is how often the candidate of rank r at depth d + 1 is the target's token
        (measured on held-out data). Taking depths as independent, a node's chance to be accepted is
        the product along its path; best-first growth keeps the ``budget`` likeliest nodes, and since a
        child is never likelier than its parent, parents come first.
        """
        if budget < 1:
            raise ValueError(f"tree budget={budget} must be >= 1")
        depth, ranks = accuracy.shape
        acc = accuracy.tolist()
        frontier = [(-acc[0][r], r, (r,)) for r in range(ranks)]
        heapq.heapify(frontier)
        paths = []
        while frontier and len(paths) < budget:
            neg_p, _, path = heapq.heappop(frontier)
            paths.append(list(path))
            if len(path) < depth:
                for r in range(ranks):
                    heapq.heappush(frontier, (neg_p * acc[len(path)][r], r, path + (r,)))
        return cls.from_paths(paths)

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        """Depth of the deepest node."""
        return int(DraftTree(torch.zeros(len(self), dtype=torch.long), torch.tensor(self.parents)).depths.max())


def batch_trees(trees: list[DraftTree], roots: Tensor, root_positions: Tensor,
                min_width: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Pack the roots and trees of A rows into one verification input.

    Args:
        trees: one tree per row (``T_a`` nodes).
        roots: ``(A,)`` each row's root token.
        root_positions: ``(A,)`` each root's position id.
        min_width: pad a forward of 2 or more columns to at least this many (a plain step stays 1).

    Returns:
        ids ``(A, T)``, position ids ``(A, T)`` and the ancestor mask ``(A, T, T)``, where
        ``T = 1 + max T_a``: column 0 is the root, column ``1 + i`` node i; padding columns
        attend to themselves only.
    """
    A, width = len(trees), 1 + max(len(t) for t in trees)
    if width > 1:
        width = max(width, min_width)
    device = roots.device
    ids = torch.zeros(A, width, dtype=torch.long, device=device)
    positions = root_positions[:, None].repeat(1, width).to(device)  # (A, T)
    mask = torch.eye(width, dtype=torch.bool, device=device).repeat(A, 1, 1)  # (A, T, T); padding: itself only
    ids[:, 0] = roots
    for a, tree in enumerate(trees):
        n = len(tree)
        if n:
            ids[a, 1 : n + 1] = tree.tokens.to(device)
            positions[a, : n + 1] = tree.positions(int(root_positions[a])).to(device)
            mask[a, 1 : n + 1, 0] = True  # every node sees the root
            mask[a, 1 : n + 1, 1 : n + 1] = tree.ancestors.to(device)
    return ids, positions, mask
