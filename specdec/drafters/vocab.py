"""Reduced-vocabulary draft heads (FR-Spec, Zhao et al. 2025): score only the N tokens the
target writes most often.

The output head is much of a small drafter's cost (SmolLM2-135M: 28M of its 135M weights). A
drafter that scores only a frequent subset pays N/V of it; it simply never proposes the other
tokens. The target still verifies over its full vocabulary, so losslessness is untouched: greedy
acceptance compares tokens, and in sampling a draft q that is zero off the subset is still a
valid proposal for recursive rejection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from specdec.backends.cpu_linear import linear


def frequent_tokens(labels: list[Tensor], n: int, vocab_size: int) -> Tensor:
    """The ``n`` most frequent tokens among ``labels`` (ties to the lower id), sorted by id."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for row in labels:
        counts += torch.bincount(row.flatten().long(), minlength=vocab_size)
    top = torch.topk(counts.double() - torch.arange(vocab_size) * 1e-9, min(n, vocab_size)).indices
    return top.sort().values


class ReducedHead(nn.Module):
    """The target's output head restricted to ``token_ids`` (``None``: the full head).

    ``reduced(h)`` gives ``(..., N)`` scores of the subset (training); ``forward(h)`` gives
    ``(..., V)`` logits over the full vocabulary, ``-inf`` off the subset (drafting), so every
    downstream step (warpers, top-k, q) is unchanged. The weights are frozen copies.
    """

    def __init__(self, head: nn.Linear, token_ids: Tensor | None = None) -> None:
        super().__init__()
        weight = head.weight.detach()
        self.vocab_size = weight.shape[0]
        bias = None if getattr(head, "bias", None) is None else head.bias.detach()
        if token_ids is not None:
            token_ids = token_ids.long().to(weight.device)
            if token_ids.numel() == 0 or int(token_ids.max()) >= self.vocab_size or int(token_ids.min()) < 0:
                raise ValueError(f"reduced vocabulary ids must lie in [0, {self.vocab_size}): check the checkpoint "
                                 "was built for this target")
            weight = weight[token_ids]
            bias = None if bias is None else bias[token_ids]
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("token_ids", token_ids, persistent=False)

    def reduced(self, hidden: Tensor) -> Tensor:
        """``(..., N)`` scores of the subset."""
        return linear(hidden, self.weight, self.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """``(..., V)`` logits, ``-inf`` off the subset."""
        scores = self.reduced(hidden)
        if self.token_ids is None:
            return scores
        full = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.token_ids, scores)

    def label_index(self, labels: Tensor) -> Tensor:
        """Target tokens as indices into the subset (``-100``, ignored by cross-entropy, off it)."""
        if self.token_ids is None:
            return labels
        index = torch.full((self.vocab_size,), -100, dtype=torch.long, device=labels.device)
        index[self.token_ids.to(labels.device)] = torch.arange(len(self.token_ids), device=labels.device)
        return index[labels]
