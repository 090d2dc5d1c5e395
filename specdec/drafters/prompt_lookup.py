"""Prompt lookup: draft the tokens that followed earlier occurrences of the last n tokens
(Saxena 2023, "prompt lookup decoding"; transformers' PromptLookupCandidateGenerator).

Deterministic: q is a point mass, so drafting costs no model forward. With
``branches > 1`` the continuations of several matches (latest first) are merged into
one tree (a trie), so the target verifies them all in one forward.
"""

from __future__ import annotations

import torch

from specdec.checks import as_int
from specdec.drafters.base import DecodeState, Drafter
from specdec.tree import DraftTree


def trie(continuations: list[list[int]], device: torch.device | str = "cpu") -> DraftTree:
    """Merge token sequences sharing prefixes into one tree (nodes in insertion order)."""
    tokens, parents, index = [], [], {}
    for seq in continuations:
        parent = -1
        for tok in seq:
            key = (parent, tok)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
            parent = index[key]
    return DraftTree(torch.tensor(tokens, dtype=torch.long, device=device),
                     torch.tensor(parents, dtype=torch.long, device=device))


def lookup_hits(tokens: torch.Tensor, max_ngram: int = 3, min_ngram: int = 2) -> torch.Tensor:
    """``(n,)`` bool: whether :class:`PromptLookup` over ``tokens[:i]`` (n-grams ``max_ngram`` down to
    ``min_ngram``, the latest match first) drafts ``tokens[i]`` as its first token, for every ``i``.

    One pass with a table per n-gram length (the latest continuation of each n-gram seen so far), so a
    whole training set is cheap: where this is true, lookup already finds the token, and a model
    drafter beside it (``Combined``) is only asked where it is false.
    """
    ids = tokens.tolist()
    latest: dict[int, dict[tuple, int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
    hits = []
    for i in range(len(ids)):
        drafted = None
        for n in range(min(max_ngram, i - 1), min_ngram - 1, -1):  # the suffix of tokens[:i], longest first
            drafted = latest[n].get(tuple(ids[i - n : i]))
            if drafted is not None:
                break
        hits.append(drafted == ids[i])
        for n in latest:  # the n-gram ending at i - 1 is now followed by tokens[i]
            if i >= n:
                latest[n][tuple(ids[i - n : i])] = ids[i]
    return torch.tensor(hits, dtype=torch.bool)


class PromptLookup(Drafter):
    """n-gram lookup over prompt + output so far.

    Args:
        k: longest continuation drafted from one match (the tree's depth).
        max_ngram: longest suffix to match; shorter ones are tried down to ``min_ngram``.
        min_ngram: shortest suffix to match.
        branches: most distinct matches merged into the tree (1 = a chain).
    """

    def __init__(self, k: int = 10, max_ngram: int = 3, min_ngram: int = 1, branches: int = 1) -> None:
        k = as_int("PromptLookup k", k, 1)
        max_ngram, min_ngram = as_int("PromptLookup max_ngram", max_ngram, 1), as_int("PromptLookup min_ngram", min_ngram, 1)
        branches = as_int("PromptLookup branches", branches, 1)
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"PromptLookup needs 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        self.k, self.max_ngram, self.min_ngram, self.branches = k, max_ngram, min_ngram, branches

    def propose(self, states: list[DecodeState], depths: list[int] | None = None) -> list[DraftTree]:
        depths = depths if depths is not None else [s.budget for s in states]
        return [self._propose_row(s, depth) for s, depth in zip(states, depths)]

    def _propose_row(self, state: DecodeState, depth: int) -> DraftTree:
        k = min(self.k, depth)
        tokens = state.tokens[0]  # (n,)
        found: list[list[int]] = []
        if k == 0:
            return DraftTree.empty(tokens.device)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            windows = tokens.unfold(0, n, 1)[:-1]  # (n_windows, n), the suffix itself excluded
            hits = (windows == tokens[-n:]).all(dim=1).nonzero().flatten().tolist()
            for start in reversed(hits):  # the latest first: output loops repeat recent text
                cont = tokens[start + n : start + n + k].tolist()
                if cont not in found:
                    found.append(cont)
                if len(found) == self.branches:
                    return trie(found, tokens.device)
        return trie(found, tokens.device)
