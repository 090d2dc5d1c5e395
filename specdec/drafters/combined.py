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

from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import DraftTree
from specdec.verify import Acceptance


class Combined(Drafter):
    """The union of several drafters' trees, verified in one forward.

    Args:
        drafters: proposed in this order; the acceptance rule tries their root children in
            the same order.
        fallback: each row takes only the first non-empty tree, in this order.
    """

    def __init__(self, *drafters: Drafter, fallback: bool = False) -> None:
        if len(drafters) < 2:
            raise ValueError(f"Combined needs at least 2 drafters, got {len(drafters)}")
        self.drafters, self.fallback = drafters, fallback
        self._offsets: dict[int, list[int]] = {}  # row -> first node of each drafter's subtree

    def check(self, target: torch.nn.Module) -> None:
        for drafter in self.drafters:
            drafter.check(target)

    @property
    def needs_hidden(self) -> bool:
        return any(drafter.needs_hidden for drafter in self.drafters)

    def networks(self) -> list[torch.nn.Module]:
        return [net for drafter in self.drafters for net in drafter.networks()]

    def attach(self, decoder) -> None:
        for drafter in self.drafters:
            drafter.attach(decoder)

    def prefill(self, states: list[DecodeState]) -> None:
        for drafter in self.drafters:
            drafter.prefill(states)

    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        if not self.fallback:
            per_drafter = [drafter.propose(states) for drafter in self.drafters]  # [drafter][row]
        else:
            per_drafter, waiting = [], list(range(len(states)))  # rows with no tree yet
            for drafter in self.drafters:
                trees = [DraftTree.empty(states[0].tokens.device) for _ in states]
                if waiting:
                    for r, tree in zip(waiting, drafter.propose([states[r] for r in waiting])):
                        trees[r] = tree
                    waiting = [r for r in waiting if not len(trees[r])]
                per_drafter.append(trees)
        return [self._merge(state, [trees[r] for trees in per_drafter]) for r, state in enumerate(states)]

    def _merge(self, state: DecodeState, trees: list[DraftTree]) -> DraftTree:
        offsets, tokens, parents = [], [], []
        for tree in trees:
            offset = sum(map(len, trees[: len(offsets)]))
            offsets.append(offset)
            tokens.append(tree.tokens)
            parents.append(torch.where(tree.parents >= 0, tree.parents + offset, tree.parents))
        self._offsets[state.row] = offsets
        vocab = next((t.q.shape[1] for t in trees if t.q is not None), None)
        q = None
        if vocab is not None:  # someone sampled: every node needs its own q row
            q = torch.cat([t.q if t.q is not None else torch.nn.functional.one_hot(t.tokens, vocab).float()
                           for t in trees])
        return DraftTree(torch.cat(tokens), torch.cat(parents), q)

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        for d, drafter in enumerate(self.drafters):
            mine = []
            for state, result in zip(states, results):
                offsets = self._offsets[state.row]
                lo = offsets[d]
                hi = offsets[d + 1] if d + 1 < len(offsets) else float("inf")
                path = [node - lo for node in result.path if lo <= node < hi]
                mine.append(Acceptance(path, result.next_token))
            drafter.commit(states, mine)
