"""Adaptive speculation: each row's draft depth follows the acceptance it has seen so far.

The rule is transformers' ``num_assistant_tokens_schedule="heuristic"``, per row and for trees:
when a step accepts a path as deep as the tree, the next depth grows by ``grow``; otherwise it
shrinks by ``shrink`` (never below ``min_depth`` nor above ``max_depth``). Easy text (copying,
formulaic answers) gets long drafts; hard text stops paying for drafts that get rejected. Any
drafter can be wrapped: its trees are cut to each row's depth, and a drafter with a ``k``
attribute (draft models, EAGLE, early exit, prompt lookup) is asked for no deeper drafts than the
deepest row needs, which saves its drafting time too.
"""

from __future__ import annotations

import torch

from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import DraftTree
from specdec.verify import Acceptance


class Adaptive(Drafter):
    """Wraps ``drafter`` and sets each row's depth from its acceptance.

    Args:
        drafter: the drafter whose trees are cut.
        start: first depth of every row (default: ``max_depth``).
        min_depth, max_depth: bounds (``max_depth`` default: the drafter's ``k``).
        grow, shrink: depth change after a fully accepted / a cut-short step.
    """

    def __init__(self, drafter: Drafter, start: int | None = None, min_depth: int = 1, max_depth: int | None = None,
                 grow: int = 2, shrink: int = 1) -> None:
        max_depth = max_depth if max_depth is not None else getattr(drafter, "k", None)
        if max_depth is None:
            raise ValueError("Adaptive needs max_depth= for a drafter without a `k` (draft depth) attribute")
        if not 1 <= min_depth <= max_depth:
            raise ValueError(f"Adaptive needs 1 <= min_depth ({min_depth}) <= max_depth ({max_depth})")
        if grow < 0 or shrink < 0:
            raise ValueError(f"Adaptive grow={grow} and shrink={shrink} must be >= 0")
        self.drafter, self.min_depth, self.max_depth = drafter, min_depth, max_depth
        self.start = max_depth if start is None else max(min_depth, min(start, max_depth))
        self.grow, self.shrink = grow, shrink
        self.depth: dict[int, int] = {}
        self._kept: dict[int, list[int]] = {}  # row -> original node of each kept node
        self._drafted: dict[int, int] = {}

    @property
    def needs_hidden(self) -> bool:
        return self.drafter.needs_hidden

    def check(self, target: torch.nn.Module) -> None:
        self.drafter.check(target)

    def networks(self) -> list[torch.nn.Module]:
        return self.drafter.networks()

    def attach(self, decoder) -> None:
        self.drafter.attach(decoder)

    def prefill(self, states: list[DecodeState]) -> None:
        self.depth = {s.row: self.start for s in states}
        self.drafter.prefill(states)

    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        has_k = hasattr(self.drafter, "k")
        if has_k:
            self.drafter.k = max(self.depth[s.row] for s in states)
        try:
            trees = self.drafter.propose(states)
        finally:
            if has_k:
                self.drafter.k = self.max_depth
        return [self._cut(s.row, tree) for s, tree in zip(states, trees)]

    def _cut(self, row: int, tree: DraftTree) -> DraftTree:
        """The nodes no deeper than the row's depth (parents come first, so they stay)."""
        if not len(tree):
            self._kept[row], self._drafted[row] = [], 0
            return tree
        keep = (tree.depths <= self.depth[row]).nonzero().flatten()
        remap = torch.full((len(tree) + 1,), -1, dtype=torch.long, device=tree.tokens.device)
        remap[keep] = torch.arange(len(keep), device=tree.tokens.device)
        parents = tree.parents[keep]
        parents = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
        self._kept[row] = keep.tolist()
        self._drafted[row] = int(tree.depths[keep].max()) if len(keep) else 0
        return DraftTree(tree.tokens[keep], parents, None if tree.q is None else tree.q[keep])

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        inner = []
        for state, result in zip(states, results):
            drafted = self._drafted[state.row]
            if drafted:
                full = len(result.path) >= drafted
                depth = self.depth[state.row] + self.grow if full else self.depth[state.row] - self.shrink
                self.depth[state.row] = max(self.min_depth, min(self.max_depth, depth))
            kept = self._kept[state.row]
            inner.append(Acceptance([kept[node] for node in result.path], result.next_token))
        self.drafter.commit(states, inner)
