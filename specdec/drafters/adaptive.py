"""Adaptive speculation: each row's draft depth follows the acceptance it has seen so far.

The rule is transformers' ``num_assistant_tokens_schedule="heuristic"``, per row and for trees:
when a step accepts a path as deep as the tree, the next depth grows by ``grow``; otherwise it
shrinks by ``shrink`` (never below ``min_depth`` nor above ``max_depth``). Easy text (copying,
formulaic answers) gets long drafts; hard text stops paying for drafts that get rejected. Any
drafter can be wrapped: its proposer is asked for no deeper drafts than each row's depth (the
``depths`` argument of :meth:`~specdec.drafters.base.Proposer.propose`, which every library drafter
honours; the wrapped drafter is never changed), and its trees are cut to that depth in case it does not.
"""

from __future__ import annotations

import torch

from specdec.checks import as_int
from specdec.drafters.base import DecodeState, Drafter, Proposer, TargetView, Verified, as_drafter, cut_to, uncut
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
        drafter = as_drafter(drafter)
        start = as_int("Adaptive start", start, 1, optional=True)
        min_depth, max_depth = as_int("Adaptive min_depth", min_depth, 1), as_int("Adaptive max_depth", max_depth, 1,
                                                                                  optional=True)
        grow, shrink = as_int("Adaptive grow", grow, 0), as_int("Adaptive shrink", shrink, 0)
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

    @property
    def draft_depth(self) -> int | None:
        return self.max_depth

    def check(self, target: torch.nn.Module) -> None:
        self.drafter.check(target)

    def proposer(self, view: TargetView) -> Proposer:
        return _AdaptiveProposer(self, self.drafter.proposer(view))


class _AdaptiveProposer(Proposer):
    """Each row's depth, and the inner proposer asked for drafts no deeper."""

    def __init__(self, config: Adaptive, inner: Proposer) -> None:
        self.config, self.inner = config, inner
        self.needs = inner.needs
        self.depth: dict[int, int] = {}
        self.kept: dict[int, list[int]] = {}  # row -> inner node of each kept node
        self.drafted: dict[int, int] = {}

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        self.depth = {s.row: self.config.start for s in states}
        self.inner.prefill(states, verified)

    def propose(self, states: list[DecodeState], depths: list[int]) -> list[DraftTree]:
        capped = [min(self.depth[s.row], depth) for s, depth in zip(states, depths)]
        return [self._cut(s.row, tree) for s, tree in zip(states, self.inner.propose(states, capped))]

    def _cut(self, row: int, tree: DraftTree) -> DraftTree:
        """The nodes no deeper than the row's depth."""
        tree, self.kept[row] = cut_to(tree, self.depth[row])
        self.drafted[row] = int(tree.depths.max()) if len(tree) else 0
        return tree

    def commit(self, states: list[DecodeState], results: list[Acceptance], verified: list[Verified]) -> None:
        c, inner = self.config, []
        for state, result in zip(states, results):
            drafted = self.drafted.get(state.row, 0)
            if drafted:
                full = len(result.path) >= drafted
                depth = self.depth[state.row] + c.grow if full else self.depth[state.row] - c.shrink
                self.depth[state.row] = max(c.min_depth, min(c.max_depth, depth))
            inner.append(uncut(result, self.kept.get(state.row, [])))
        self.inner.commit(states, inner, verified)
