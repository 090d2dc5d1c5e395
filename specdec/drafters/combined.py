"""Several drafters in one tree: e.g. prompt lookup (wins on summarization and retrieval, where
output copies the prompt) beside a draft model (wins where it does not).

Each drafter proposes its own tree below the shared root; the trees are placed side by side as
siblings, and each drafter later sees only the part of the accepted path that ran through its
own nodes. With sampling the siblings come from different proposals (point masses for lookup,
q for the model); recursive rejection stays exact for independently drawn siblings with their
own q (SpecInfer's multi-draft verification, Miao et al. 2024), so point-mass nodes get one-hot
q rows when any drafter sampled.

With ``fallback=True`` a row takes only the first drafter with a non-empty tree, and later
drafters do not run for it that step (lookup first, a model only where lookup finds no match):
the forward stays as small as one drafter's tree, and the model's cost is paid only where it
drafts. Drafters keep their state in step through ``commit`` either way.
"""

from __future__ import annotations

import torch

from specdec.drafters.base import DecodeState, Drafter, Needs, Proposer, TargetView, Verified, as_drafter
from specdec.tree import DraftTree
from specdec.verify import Acceptance


class Combined(Drafter):
    """The union of several drafters' trees, verified in one forward.

    Args:
        drafters: proposed in this order; the acceptance rule tries their root children in
            the same order. The same drafter object may appear more than once.
        fallback: each row takes only the first non-empty tree, in this order.
    """

    def __init__(self, *drafters: Drafter, fallback: bool = False) -> None:
        if len(drafters) < 2:
            raise ValueError(f"Combined needs at least 2 drafters, got {len(drafters)}")
        self.drafters, self.fallback = tuple(as_drafter(d) for d in drafters), fallback

    @property
    def draft_depth(self) -> int | None:
        depths = [d.draft_depth for d in self.drafters]
        return None if any(d is None for d in depths) else max(depths)

    def check(self, target: torch.nn.Module) -> None:
        for drafter in self.drafters:
            drafter.check(target)

    def proposer(self, view: TargetView) -> Proposer:
        return _CombinedProposer([d.proposer(view) for d in self.drafters], self.fallback)


class _CombinedProposer(Proposer):
    """One proposer per drafter; each row's trees side by side, and where each begins."""

    def __init__(self, parts: list[Proposer], fallback: bool) -> None:
        self.parts, self.fallback = parts, fallback
        self.needs = Needs.combine(p.needs for p in parts)
        self.offsets: dict[int, tuple[list[int], int]] = {}  # row -> (first node of each part's tree, total)

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        for part in self.parts:
            part.prefill(states, verified)

    def propose(self, states: list[DecodeState], depths: list[int]) -> list[DraftTree]:
        if not self.fallback:
            per_part = [part.propose(states, depths) for part in self.parts]  # [part][row]
        else:
            per_part, waiting = [], list(range(len(states)))  # rows with no tree yet
            for part in self.parts:
                trees = [DraftTree.empty(states[0].tokens.device) for _ in states]
                if waiting:
                    for r, tree in zip(waiting, part.propose([states[r] for r in waiting], [depths[r] for r in waiting])):
                        trees[r] = tree
                    waiting = [r for r in waiting if not len(trees[r])]
                per_part.append(trees)
        merged = []
        for r, state in enumerate(states):
            tree, offsets = DraftTree.concat([trees[r] for trees in per_part])
            self.offsets[state.row] = (offsets, len(tree))
            merged.append(tree)
        return merged

    def commit(self, states: list[DecodeState], results: list[Acceptance], verified: list[Verified]) -> None:
        split = [DraftTree.split_path(result.path, *self.offsets.get(state.row, ([0] * len(self.parts), 0)))
                 for state, result in zip(states, results)]
        for p, part in enumerate(self.parts):
            part.commit(states, [Acceptance(paths[p], result.next_token) for paths, result in zip(split, results)],
                        verified)
