"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the
last n tokens (Saxena 2023, "prompt lookup decoding"; transformers' PromptLookupCandidateGenerator).

Deterministic: q is a point mass, so the draft costs no model forward at all.
"""

from __future__ import annotations

import torch

from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import DraftTree


class PromptLookup(Drafter):
    """n-gram lookup over prompt + output so far.

    Args:
        k: most tokens drafted per step.
        max_ngram: longest suffix to match; shorter ones are tried down to ``min_ngram``.
        min_ngram: shortest suffix to match.
    """

    def __init__(self, k: int = 10, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if k < 1:
            raise ValueError(f"PromptLookup k={k} must be >= 1")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"PromptLookup needs 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram

    def propose(self, state: DecodeState) -> DraftTree:
        k = min(self.k, state.budget)
        tokens = state.tokens[0]  # (n,)
        if k == 0:
            return DraftTree.empty(tokens.device)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            windows = tokens.unfold(0, n, 1)[:-1]  # (n_windows, n), the suffix itself excluded
            hits = (windows == tokens[-n:]).all(dim=1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n  # the latest match: output loops repeat recent text
                return DraftTree.chain(tokens[start : start + k])
        return DraftTree.empty(tokens.device)
