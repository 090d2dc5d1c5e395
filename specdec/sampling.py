"""From logits to the distributions the acceptance rule compares: p (target) and q (draft).

The same :class:`Sampling` object turns target logits into p and draft logits into q,
so temperature, top-k and top-p act identically on both, in the order and with
the exact arithmetic of ``model.generate`` (it reuses transformers' own warpers).
``min_new_tokens`` (and ``min_length``, turned into it) is applied per position: EOS gets
probability zero at every position that would end the output too early, as transformers'
``MinNewTokensLengthLogitsProcessor`` does one token at a time. ``banned`` tokens
(``suppress_tokens``, single-token ``bad_words_ids``) get zero everywhere, ``banned_first``
(``begin_suppress_tokens``) at the first new token. Ids outside the vocabulary are ignored, as
transformers ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specdec.checks import as_int, as_number


@dataclass(frozen=True)
class Sampling:
    """How one token is chosen from logits.

    Attributes:
        do_sample: sample (True) or take the argmax (False).
        temperature, top_k, top_p: as in ``GenerationConfig``; ``None`` = off.
        eos_token_ids: tokens that end a row.
        min_new_tokens: EOS is forbidden before this many new tokens.
        banned: tokens forbidden at every position.
        banned_first: tokens forbidden at the first new token.
    """

    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    banned: tuple[int, ...] = ()
    banned_first: tuple[int, ...] = ()
    _warpers: LogitsProcessorList = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        warpers = LogitsProcessorList()
        if self.do_sample:  # greedy ignores the sampling-only settings, as transformers does
            for name in ("temperature", "top_p"):  # numpy scalars too, as transformers takes them
                object.__setattr__(self, name, as_number(name, getattr(self, name), optional=True))
            object.__setattr__(self, "top_k", as_int("top_k", self.top_k, optional=True))
            if self.temperature is not None and not self.temperature > 0:
                raise ValueError(f"temperature={self.temperature} must be > 0 when sampling "
                                 "(use do_sample=False for greedy)")
            if self.top_k is not None and self.top_k < 0:
                raise ValueError(f"top_k={self.top_k} must be >= 0 (0 or None turns it off)")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
            # the order of GenerationMixin._get_logits_processor
            if self.temperature is not None and self.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                warpers.append(TopKLogitsWarper(top_k=self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=self.top_p))
        object.__setattr__(self, "_warpers", warpers)

    def process(self, logits: Tensor, n_generated: Tensor | int) -> Tensor:
        """Apply min-new-tokens and the warpers.

        Args:
            logits: ``(T, V)`` raw logits, one row per position.
            n_generated: ``(T,)`` or scalar: new tokens already in the output before each row's token.

        Returns:
            ``(T, V)`` float32 processed logits (``-inf`` where a token is ruled out).
        """
        scores = logits.float()
        if self.min_new_tokens > 0 or self.banned or self.banned_first:  # most calls mask nothing
            scores = self._mask(scores, logits, n_generated)
        if self._warpers:
            dummy_ids = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
            scores = self._warpers(dummy_ids, scores)
        return scores

    def _mask(self, scores: Tensor, logits: Tensor, n_generated: Tensor | int) -> Tensor:
        """``-inf`` on EOS before ``min_new_tokens``, on ``banned`` everywhere and on ``banned_first`` at the
        first new token; ids outside the vocabulary never occur and are skipped."""
        n = torch.as_tensor(n_generated, device=scores.device).expand(scores.shape[0])  # (T,)
        for tokens, rows in ((self.eos_token_ids, n < self.min_new_tokens), (self.banned, n >= 0),
                             (self.banned_first, n == 0)):
            ids = [t for t in tokens if t < scores.shape[-1]]
            if ids and rows.any():
                if scores is logits:  # never write into the caller's logits
                    scores = scores.clone()
                scores[rows.nonzero()[:, :1], torch.tensor(ids, device=scores.device)] = -float("inf")
        return scores

    def probs(self, logits: Tensor, n_generated: Tensor | int) -> Tensor:
        """``(T, V)`` logits -> ``(T, V)`` probabilities after :meth:`process`."""
        return torch.softmax(self.process(logits, n_generated), dim=-1)

    def choose(self, logits: Tensor, n_generated: Tensor | int, generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
        """Pick one token per row: ``(T,)`` tokens and ``(T, V)`` probabilities (``None`` when greedy)."""
        scores = self.process(logits, n_generated)
        if not self.do_sample:
            return scores.argmax(dim=-1), None
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1), probs
