"""The drafter protocol and the per-row decoding state every drafter reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.sampling import Sampling
from specdec.tree import DraftTree
from specdec.verify import Acceptance


@dataclass
class DecodeState:
    """One row being decoded.

    Attributes:
        row: the row's index in the caller's batch (stable while other rows finish).
        tokens: ``(1, n)`` prompt (unpadded) and output so far; the last token is the root
            of the next draft (chosen, not yet in the target's cache).
        prompt_len: length of the prompt inside ``tokens``.
        max_new_tokens: output budget of the row.
        sampling: how p and q are made from logits.
        generator: random generator for every draw (``None`` = torch's global one).
        hidden: for drafters with ``needs_hidden``: ``(m, H)`` the target's final hidden states
            (what its output head reads) of the tokens its last forward committed to the cache:
            the prompt less its last token after prefill, the root and the accepted nodes after
            a step. ``hidden[-1]`` is the state whose logits chose ``tokens[0, -1]``.
    """

    row: int
    tokens: Tensor
    prompt_len: int
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator | None = None
    hidden: Tensor | None = None

    @property
    def n_generated(self) -> int:
        """New tokens already in the output."""
        return self.tokens.shape[1] - self.prompt_len

    @property
    def budget(self) -> int:
        """Deepest draft worth verifying now: the step adds one more token of its own."""
        return max(0, self.max_new_tokens - self.n_generated - 1)


class Drafter(ABC):
    """Proposes one :class:`DraftTree` per active row each step.

    The engine calls ``prefill`` once with every row, then per step ``propose`` and
    ``commit`` with the rows still running (finished rows drop out; ``state.row``
    identifies a row throughout). ``commit`` comes after ``state.tokens`` has grown,
    so a drafter can keep its own caches in step with the target.

    Drafters built on the target's own weights (EAGLE and Medusa heads read its hidden states,
    early exit runs its first layers) set ``needs_hidden`` or use ``attach``.
    """

    needs_hidden: bool = False  # the engine fills DecodeState.hidden before prefill and commit

    def check(self, target: torch.nn.Module) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if this drafter cannot serve ``target``; drafters that borrow the
        target's weights (embedding, output head, layers) take them here."""

    def attach(self, decoder) -> None:  # noqa: B027 - optional hook
        """See the :class:`~specdec.engine.SpeculativeDecoder` before prefill (its cache, row ranges)."""

    def networks(self) -> list[torch.nn.Module]:
        """The networks this drafter runs; the engine routes their linear layers as it does the
        target's (see :mod:`specdec.skinny`)."""
        return []

    def prefill(self, states: list[DecodeState]) -> None:  # noqa: B027 - optional hook
        """See the prompts before the first step."""

    @abstractmethod
    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        """One tree per state, each at most ``state.budget`` deep, below the root ``state.tokens[0, -1]``."""

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:  # noqa: B027 - optional hook
        """Learn each row's outcome; ``state.tokens`` already holds the step's tokens."""


class BuiltOnTarget:
    """Mixin for drafters made of trained parts plus the target's own weights (its embedding, output
    head or layers): :meth:`check` enforces the checkpoint's target fingerprint, then calls
    :meth:`bind` once per target object."""

    checkpoint: dict | None = None  # a loaded checkpoint (None: untrained parts, any target)
    _bound: int | None = None

    def bind(self, target: torch.nn.Module) -> None:
        """Take what this drafter borrows from ``target``."""
        raise NotImplementedError

    def check(self, target: torch.nn.Module) -> None:
        if self._bound == id(target):
            return
        if self.checkpoint is not None:
            from specdec.training.checkpoint import check_target

            check_target(self.checkpoint, target)
        self.bind(target)
        self._bound = id(target)
