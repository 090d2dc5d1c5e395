"""The drafter seam: a :class:`Drafter` is a configuration; each decode call makes a :class:`Proposer`.

A drafter object holds only settings and trained weights, so one object serves several threads,
several targets and dtypes, two places inside a :class:`~specdec.drafters.Combined`, and any call
after a failed one. Each ``generate`` call asks it for a fresh proposer (as transformers builds a
candidate generator per call, and vLLM a proposer per engine), which holds every piece of
per-call state: draft caches, row tables, adaptive counters. The engine drives the proposer:

1. ``prefill(states)`` once, after the target's prefill;
2. per step ``propose(states) -> list[DraftTree]`` (one tree per row, at most ``state.budget`` deep)
   and ``commit(states, results)`` once the step's tokens are appended.

What a proposer may read is explicit: the :class:`DecodeState` of each row (committed tokens, and
the target's hidden states and last verification logits when the proposer asks for them), and
the call's :class:`TargetView` (the target's weights and config to build from, the call's options,
and the target's cache only through :meth:`TargetView.prefix_cache`).

The simple path stays what it was: a drafter that implements only ``propose(states)`` (and,
optionally, ``prefill``/``commit``/``check``/``needs_hidden``) gets a proposer that forwards to it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from specdec.sampling import Sampling
from specdec.tree import DraftTree
from specdec.verify import Acceptance

if TYPE_CHECKING:
    from specdec.options import Options


@dataclass
class DecodeState:
    """One row being decoded, as proposers see it (the engine writes it, proposers only read).

    Attributes:
        row: the row's index in the caller's batch (stable while other rows finish).
        tokens: ``(1, n)`` prompt (unpadded) and output so far; the last token is the root
            of the next draft (chosen, not yet in the target's cache).
        prompt_len: length of the prompt inside ``tokens``.
        max_new_tokens: output budget of the row.
        sampling: how p and q are made from logits.
        generator: random generator for every draw (``None`` = torch's global one).
        hidden: for proposers with ``needs_hidden``: ``(m, H)`` the target's final hidden states
            (what its output head reads; with ``Proposer.hidden_layers``, those layers' states side by
            side, ``(m, H * L)``) of the tokens its last forward committed to the cache:
            the prompt less its last token after prefill, the root and the accepted nodes after
            a step. ``hidden[-1]`` is the state whose logits chose ``tokens[0, -1]``.
        logits: for proposers with ``needs_logits``: ``(T + 1, V)`` the target's logits at the root and
            every node of the row's last verified tree, whose tokens are ``verified`` ``(T + 1,)``.
        max_depth: a cap on the next draft's depth set by a wrapper (:class:`~specdec.drafters.Adaptive`)
            or the engine; ``None``: none.
        finished: set before the last ``commit`` of a row that ends this step.
    """

    row: int
    tokens: Tensor
    prompt_len: int
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator | None = None
    hidden: Tensor | None = None
    logits: Tensor | None = None
    verified: Tensor | None = None
    max_depth: int | None = None
    finished: bool = False

    @property
    def n_generated(self) -> int:
        """New tokens already in the output."""
        return self.tokens.shape[1] - self.prompt_len

    @property
    def budget(self) -> int:
        """Deepest draft worth verifying now: the step adds one more token of its own."""
        room = max(0, self.max_new_tokens - self.n_generated - 1)
        return room if self.max_depth is None else min(room, max(0, self.max_depth))


class TargetView:
    """What a proposer may know of the target in one call (read-only).

    Attributes:
        model: the target, to read weights and config from when building (never to run it: the
            engine runs the target).
        options: the call's :class:`~specdec.options.Options` (attention backend, sampling, ...).
    """

    def __init__(self, model: torch.nn.Module, options: Options, cache_rows: Callable[[], Any] | None = None) -> None:
        self.model, self.options = model, options
        self._cache_rows = cache_rows

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def prefix_cache(self, layers: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor, list[int]]:
        """The target's committed keys and values of its first ``layers`` layers, for self-speculation.

        Returns ``(kv, start, end, rows)``: ``kv[l] = (keys, values)``, each ``(A, Hk, S, D)``, views
        of the target's cache that must not be written; row ``a``'s committed entries are
        ``[start[a], end[a])``; ``rows[a]`` is the :attr:`DecodeState.row` of cache row ``a``.
        """
        if self._cache_rows is None:
            raise ValueError("this view has no target cache: prefix_cache works inside specdec.generate only")
        cache, start, end, rows = self._cache_rows()
        kv = [(layer.keys, layer.values) for layer in cache.layers[:layers]]
        return kv, start, end, rows


class Proposer:
    """Per-call drafting state; see the module docstring for the calling order."""

    needs_hidden: bool = False  # the engine fills DecodeState.hidden before prefill and each commit
    hidden_layers: tuple[int, ...] | None = None  # which hidden states (indices into the model's
    # output_hidden_states: 0 the embeddings, -1 the final one) side by side in DecodeState.hidden; None: (-1,)
    needs_logits: bool = False  # the engine fills DecodeState.logits/verified before each commit

    def prefill(self, states: list[DecodeState]) -> None:  # noqa: B027 - optional hook
        """See the prompts before the first step."""

    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        """One tree per state, each at most ``state.budget`` deep, below the root ``state.tokens[0, -1]``."""
        raise NotImplementedError

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:  # noqa: B027 - optional hook
        """Learn each row's outcome; ``state.tokens`` already holds the step's tokens."""


class Drafter:
    """A drafter's configuration (and trained weights); :meth:`proposer` makes the per-call state.

    Subclasses either implement :meth:`proposer` (the library's drafters), or only :meth:`propose`
    (a stateless drafter: the default proposer calls it each step, and ``prefill``/``commit`` if
    defined). ``check(target)`` may raise ``ValueError`` when the drafter cannot serve a target.
    """

    needs_hidden: bool = False  # for drafters on the simple path: ask the engine for hidden states

    @property
    def draft_depth(self) -> int | None:
        """The deepest draft this drafter makes (its ``k``), which the goodput controller may lower per
        step; ``None``: unknown, and the controller leaves the drafter alone."""
        k = getattr(self, "k", None)
        return k if isinstance(k, int) and k > 0 else None

    def check(self, target: torch.nn.Module) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if this drafter cannot serve ``target``."""

    def proposer(self, view: TargetView) -> Proposer:
        """A fresh proposer for one call (default: forward to :meth:`propose` and the hooks)."""
        if type(self).propose is Drafter.propose:
            raise ValueError(f"drafter {type(self).__name__} implements neither proposer(view) nor propose(states): "
                             "implement propose(states) -> list[DraftTree]")
        self.check(view.model)
        return _Forwarding(self)

    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        """One tree per state, each at most ``state.budget`` deep (the simple path)."""
        raise NotImplementedError

    def prefill(self, states: list[DecodeState]) -> None:  # noqa: B027 - optional hook
        """The simple path's optional hook: see the prompts."""

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:  # noqa: B027 - optional hook
        """The simple path's optional hook: learn each row's outcome."""


class _Forwarding(Proposer):
    """The proposer of a drafter on the simple path."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.needs_hidden = bool(getattr(drafter, "needs_hidden", False))

    def prefill(self, states: list[DecodeState]) -> None:
        self.drafter.prefill(states)

    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        return self.drafter.propose(states)

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        self.drafter.commit(states, results)


class DuckDrafter(Drafter):
    """Any object with a ``propose(states)`` method, on the simple path."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.needs_hidden = bool(getattr(obj, "needs_hidden", False))

    def check(self, target: torch.nn.Module) -> None:
        if callable(getattr(self.obj, "check", None)):
            self.obj.check(target)

    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        return self.obj.propose(states)

    def prefill(self, states: list[DecodeState]) -> None:
        if callable(getattr(self.obj, "prefill", None)):
            self.obj.prefill(states)

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        if callable(getattr(self.obj, "commit", None)):
            self.obj.commit(states, results)


def as_drafter(drafter: Any) -> Drafter:
    """``drafter`` as a :class:`Drafter`, or a ``ValueError`` naming what was given and the fix."""
    if drafter is None or isinstance(drafter, Drafter):
        return drafter
    if isinstance(drafter, type):
        raise ValueError(f"drafter={drafter.__name__} is a class: pass an instance, e.g. drafter={drafter.__name__}()")
    if isinstance(drafter, str):
        raise ValueError(f"drafter={drafter!r} is a string: pass a drafter object, e.g. specdec.PromptLookup() or "
                         "specdec.Medusa.from_checkpoint(...); configs name drafters with drafter=<name>")
    if isinstance(drafter, torch.nn.Module):
        raise ValueError(f"drafter is a bare {type(drafter).__name__}: wrap a draft model as "
                         "specdec.DraftModel(model) (it must share the target's tokenizer)")
    if callable(getattr(drafter, "propose", None)):
        return DuckDrafter(drafter)
    raise ValueError(f"drafter of type {type(drafter).__name__} has no propose(states) method: pass a "
                     "specdec.Drafter (e.g. specdec.PromptLookup()) or an object with propose(states)")


class PerTarget:
    """What a drafter builds from a target (converted heads, a reduced output head, a bound draft), kept
    per target object and per its device and dtype, so a cast or a move of the target is seen and
    one drafter serves several targets at once. Thread-safe; holds targets weakly."""

    def __init__(self) -> None:
        self._built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, target: torch.nn.Module, build: Callable[[], Any]) -> Any:
        key = (str(target.device), target.dtype)
        with self._lock:
            built = self._built.setdefault(target, {})
            if key not in built:
                built[key] = build()
            return built[key]


def module_for(module: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """``module`` on the target's device and dtype: itself if it is there already, else a copy (the
    drafter's own module is never moved, so other calls keep theirs)."""
    param = next(module.parameters(), None)
    if param is None or (param.device == target.device and param.dtype == target.dtype):
        return module
    import copy

    return copy.deepcopy(module).to(device=target.device, dtype=target.dtype)
