"""The drafter seam: a :class:`Drafter` is a configuration; each decode call makes a :class:`Proposer`.

A drafter object holds only settings and trained weights, so one object serves several threads,
several targets and dtypes, two places inside a :class:`~specdec.drafters.Combined`, and any call
after a failed one. Each ``generate`` call asks it for a fresh proposer (as transformers builds a
candidate generator per call, and vLLM a proposer per engine), which holds every piece of
per-call state: draft caches, row tables, adaptive counters. The engine drives the proposer:

1. ``prefill(states, verified)`` once, after the target's prefill;
2. per step ``propose(states, depths) -> list[DraftTree]`` (one tree per row, row ``i``'s at most
   ``depths[i]`` deep) and ``commit(states, results, verified)`` once the step's tokens are appended.

What crosses the seam travels as arguments, never as fields the engine writes into shared objects
(as HF's ``update_candidate_strategy(input_ids, scores, num_matches)`` and vLLM's
``propose(target_hidden_states, ...)``): each step's depth cap (``depths``: the row's output room, cut
by the goodput controller or a wrapper such as :class:`~specdec.drafters.Adaptive`), and what the
target's last forward saw of each row (:class:`Verified`: hidden states and logits, filled only as the
proposer's :class:`Needs` ask). A wrapper forwards its parts' needs as one value, :meth:`Needs.combine`.
Besides these a proposer reads the :class:`DecodeState` of each row (committed tokens) and the
call's :class:`TargetView` (the target's weights and config to build from, the call's options, and
the target's cache only through :meth:`TargetView.prefix_cache`).

The simple path stays what it was: a drafter that implements only ``propose(states)`` (and,
optionally, ``prefill(states)``/``commit(states, results)``/``check``) gets a proposer that forwards to
it; a ``propose(states, depths)`` gets the caps, a ``propose(states)`` reads ``state.budget`` and its
trees are cut to the caps.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

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
        finished: set before the last ``commit`` of a row that ends this step.
    """

    row: int
    tokens: Tensor
    prompt_len: int
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator | None = None
    finished: bool = False

    @property
    def n_generated(self) -> int:
        """New tokens already in the output."""
        return self.tokens.shape[1] - self.prompt_len

    @property
    def budget(self) -> int:
        """Deepest draft the output has room for: the step adds one more token of its own (the step's
        cap, ``depths`` in :meth:`Proposer.propose`, is at most this)."""
        return max(0, self.max_new_tokens - self.n_generated - 1)


@dataclass(frozen=True)
class Needs:
    """What a proposer needs from the target's forwards, as one value; wrappers :meth:`combine` their parts'.

    Attributes:
        hidden: hand over hidden states (:attr:`Verified.hidden`) before prefill and each commit.
        logits: hand over the last verification's logits and tokens (:attr:`Verified.logits`).
        layers: which hidden states, side by side (indices into the model's ``output_hidden_states``:
            0 the embeddings, -1 the final one, what the output head reads).
    """

    hidden: bool = False
    logits: bool = False
    layers: tuple[int, ...] = (-1,)

    @staticmethod
    def combine(needs: Iterable[Needs]) -> Needs:
        """What a wrapper of proposers with ``needs`` asks for: everything any part asks for (parts that
        read hidden states must read the same layers)."""
        needs = list(needs)
        layers = {n.layers for n in needs if n.hidden}
        if len(layers) > 1:
            raise ValueError(f"combined drafters read different target layers {sorted(layers)}: combine drafters "
                             "that read the same hidden states (e.g. EAGLE-3 heads fused from the same layers)")
        return Needs(any(n.hidden for n in needs), any(n.logits for n in needs), next(iter(layers), (-1,)))


@dataclass(frozen=True)
class Verified:
    """What the target's last forward saw of one row, for a proposer whose :class:`Needs` ask for it.

    Attributes:
        hidden: with ``Needs.hidden``: ``(m, H * L)`` the target's hidden states (the ``Needs.layers``
            side by side) of the tokens its last forward committed to the cache: the prompt less its last
            token after prefill, the root and the accepted nodes after a step. ``hidden[-1]`` is the
            state whose logits chose ``tokens[0, -1]``.
        logits: with ``Needs.logits``: ``(T + 1, V)`` the target's logits at the root and every node of
            the row's last verified tree, whose tokens are ``tokens`` ``(T + 1,)``.
    """

    hidden: Tensor | None = None
    logits: Tensor | None = None
    tokens: Tensor | None = None


def cut_to(tree: DraftTree, depth: int) -> tuple[DraftTree, list[int]]:
    """``tree``'s nodes no deeper than ``depth`` (parents come first, so they stay), and each kept node's
    index in ``tree`` (what :func:`uncut` maps an accepted path back through)."""
    if not len(tree) or int(tree.depths.max()) <= depth:
        return tree, list(range(len(tree)))
    keep = (tree.depths <= depth).nonzero().flatten()
    return tree.select(keep), keep.tolist()


def uncut(result: Acceptance, kept: list[int]) -> Acceptance:
    """An acceptance of a tree cut by :func:`cut_to`, in the full tree's node indices."""
    return Acceptance([kept[node] for node in result.path], result.next_token)


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

    needs: Needs = Needs()  # what the engine hands over in Verified (read once, when the call starts)

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:  # noqa: B027 - optional hook
        """See the prompts before the first step (``verified[i]``: the prefill's view of row ``i``)."""

    def propose(self, states: list[DecodeState], depths: list[int]) -> list[DraftTree]:
        """One tree per state below the root ``state.tokens[0, -1]``, row ``i``'s at most ``depths[i]`` deep."""
        raise NotImplementedError

    def commit(self, states: list[DecodeState], results: list[Acceptance],  # noqa: B027 - optional hook
               verified: list[Verified]) -> None:
        """Learn each row's outcome; ``state.tokens`` already holds the step's tokens."""


class Drafter:
    """A drafter's configuration (and trained weights); :meth:`proposer` makes the per-call state.

    Subclasses either implement :meth:`proposer` (the library's drafters), or only :meth:`propose`
    (a stateless drafter: the default proposer calls it each step, and ``prefill``/``commit`` if
    defined). ``check(target)`` may raise ``ValueError`` when the drafter cannot serve a target.
    """

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
        """One tree per state, each at most ``state.budget`` deep (the simple path; a ``propose(states,
        depths)`` gets each row's cap for the step, see :meth:`Proposer.propose`)."""
        raise NotImplementedError

    def prefill(self, states: list[DecodeState]) -> None:  # noqa: B027 - optional hook
        """The simple path's optional hook: see the prompts."""

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:  # noqa: B027 - optional hook
        """The simple path's optional hook: learn each row's outcome."""


class _Forwarding(Proposer):
    """The proposer of a drafter on the simple path: a ``propose(states)`` that cannot see the step's caps
    has its trees cut to them (a tree past a row's budget is left for the engine to refuse)."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.takes_depths = len(inspect.signature(drafter.propose).parameters) >= 2
        self.kept: dict[int, list[int]] = {}  # row -> index in the drafter's tree of each node kept

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        self.drafter.prefill(states)

    def propose(self, states: list[DecodeState], depths: list[int]) -> list[DraftTree]:
        if self.takes_depths:
            return self.drafter.propose(states, depths)
        trees = self.drafter.propose(states)
        if not isinstance(trees, (list, tuple)) or len(trees) != len(states):
            return trees  # the engine names what is wrong
        out = []
        for state, tree, depth in zip(states, trees, depths):
            if isinstance(tree, DraftTree) and len(tree) and int(tree.depths.max()) <= state.budget:
                tree, self.kept[state.row] = cut_to(tree, depth)
            else:
                self.kept.pop(state.row, None)
            out.append(tree)
        return out

    def commit(self, states: list[DecodeState], results: list[Acceptance], verified: list[Verified]) -> None:
        results = [uncut(r, self.kept[s.row]) if s.row in self.kept else r for s, r in zip(states, results)]
        self.drafter.commit(states, results)


class DuckDrafter(Drafter):
    """Any object with a ``propose(states)`` method, on the simple path."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def check(self, target: torch.nn.Module) -> None:
        if callable(getattr(self.obj, "check", None)):
            self.obj.check(target)

    def propose(self, states: list[DecodeState]) -> list[DraftTree]:
        return self.obj.propose(states)  # the object's own signature: states only

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
