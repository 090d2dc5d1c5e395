"""The CPU linear products of decoding: each ``nn.Linear`` by the faster CPU product for its shape.

Decoding multiplies a few rows of activations (one per token in the step: 1 for plain
decoding, a tree's nodes for verification) by every weight matrix of the model, so the step
is bound by reading the weights. ``F.linear`` computes ``x @ W.T`` with MKL, whose kernels for
2-8 rows are slow on this 2-core machine, and whose gemv (one row) reads the weights at a third
of the bandwidth the same product reaches with the operands swapped. So :meth:`Route.linear` takes

- ``(W @ x.T).T`` for 1-2 rows (one row computed as two: the 2-column product beats gemv), and
  for up to ``MAX_ROWS`` rows of a small weight (attention projections), where oneDNN's per-call
  cost shows;
- oneDNN on a prepacked copy of the weight (made once, reused while the weight is unchanged)
  for 3+ rows of a large weight (MLP, output head) and for prefill-sized inputs.

Measured here on SmolLM2-135M (float32, 2 threads, 200 cached tokens), one target forward
through the engine's tree attention (``python -m experiments.bench_forward``):

======  =========  ===========
tokens  F.linear   this module
======  =========  ===========
1       57 ms      33 ms
2       95 ms      32 ms
4       81 ms      38 ms
6       82 ms      40 ms
8       78 ms      46 ms
16      93 ms      58 ms
200     329 ms     291 ms (prefill)
======  =========  ===========

The result is the same product summed in a different order: it agrees with ``F.linear`` to float
rounding (about 1e-7 relative), as any change of kernel or batch shape does; the engine's greedy
equality with ``model.generate`` is tested under every backend. Where gradients flow (training)
only ``(W @ x.T).T`` and ``F.linear`` are used (oneDNN's packed op has no backward).

How it is wired, with no state shared between calls:

- :func:`install_linears` replaces the ``forward`` of every CPU ``nn.Linear`` of a module once (an
  instance attribute; the class is never touched). Outside a routed call the replacement is exactly
  ``F.linear``, so the model computes what it did before, whatever thread calls it.
- :func:`routed` makes a :class:`Route` the current one for the calling context
  (a ``contextvars.ContextVar``: per thread, and the engine runs each call in a copied context, so
  an exception or an interrupt can never leave it set).
- The packed copies live in a :class:`PackedWeights` per target model (:func:`packed_weights`):
  ask it its size, free it, or turn packing off per call (``generate(..., pack_weights=False)``).
  A copy costs the weight's memory once more: about 540 MB for the embedded default in float32.
"""

from __future__ import annotations

import threading
import time
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from specdec.backends.native import MAX_ROWS as NATIVE_ROWS
from specdec.backends.native import RowsLinear

MAX_ROWS = 64  # up to this many rows, small weights take (W @ x.T).T; past it, oneDNN (prefill)
MIN_PACKED = 1 << 19  # weights this large take oneDNN from 3 rows; on smaller ones its per-call cost shows
_ATTRIBUTE = "_specdec_packed_weights"  # where a model keeps its PackedWeights


@dataclass
class _Packed:
    """A weight in oneDNN's blocked layout, and what tells whether the weight changed since."""

    weight: weakref.ref
    fingerprint: Tensor  # (out, 2) the weight times a fixed random probe
    packed: Tensor
    nbytes: int  # the weight's own size (oneDNN's blocked layout holds the same elements; its storage is opaque)


class PackedWeights:
    """oneDNN-packed copies of large float32 weights, made on first use and kept while the weights live.

    One per target model (:func:`packed_weights`); the drafter networks used with that target share it.
    Each copy is checked against its weight once per ``generate`` call (a fingerprint: one more read of
    the weight, which catches every kind of write, through ``.data`` or on inference tensors that keep
    no version counter). A weight changed in the middle of a call is not seen. Thread-safe.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Packed] = {}
        self._probes: dict[tuple[int, torch.dtype], Tensor] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self):
        return PackedWeights, ()  # a copied or pickled model starts with no packed copies of its own

    def __deepcopy__(self, memo) -> PackedWeights:
        return PackedWeights()

    @property
    def nbytes(self) -> int:
        """Memory held by the packed copies (each the size of its weight)."""
        return sum(e.nbytes for e in list(self._entries.values()))

    def clear(self) -> None:
        """Free every packed copy (the next call packs again what it needs)."""
        with self._lock:
            self._entries.clear()

    def __contains__(self, weight: Tensor) -> bool:
        entry = self._entries.get(id(weight))
        return entry is not None and entry.weight() is weight

    def get(self, weight: Tensor, checked: set[int]) -> Tensor:
        """``weight`` in oneDNN's layout; ``checked`` holds the weights already checked in this call."""
        key = id(weight)
        entry = self._entries.get(key)
        if entry is not None and key in checked and entry.weight() is weight:
            return entry.packed
        with torch.no_grad():
            fingerprint = self._fingerprint(weight.detach())
            if entry is None or entry.weight() is not weight or not torch.equal(entry.fingerprint, fingerprint):
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 4)
                entry = _Packed(weakref.ref(weight, self._forget(key)), fingerprint, packed,
                                weight.numel() * weight.element_size())
                with self._lock:
                    self._entries[key] = entry
        checked.add(key)
        return entry.packed

    def _forget(self, key: int):
        """A weakref callback: drop the entry of a weight that died (unless its id was reused since)."""
        owner = weakref.ref(self)

        def forget(dead: weakref.ref) -> None:
            packs = owner()
            if packs is not None:
                with packs._lock:
                    entry = packs._entries.get(key)
                    if entry is not None and entry.weight is dead:
                        del packs._entries[key]

        return forget

    def _fingerprint(self, weight: Tensor) -> Tensor:
        """``(out, 2)``: the weight times two fixed random vectors; any change of a row changes its row here."""
        key = (weight.shape[1], weight.dtype)
        probe = self._probes.get(key)
        if probe is None:
            probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
            self._probes[key] = probe
        return torch.mm(weight, probe.t())  # the transposed probe: MKL's fast path, as in Route.linear


def packed_weights(model: nn.Module) -> PackedWeights:
    """The :class:`PackedWeights` of ``model`` (made empty on first use): query ``.nbytes``, ``.clear()`` it."""
    packs = model.__dict__.get(_ATTRIBUTE)
    if packs is None:
        packs = model.__dict__.setdefault(_ATTRIBUTE, PackedWeights())
    return packs


@dataclass
class Route:
    """The products of one call: ``packs`` is ``None`` when packing is off, ``native`` when the native
    product (:mod:`specdec.backends.native`) is not used; ``fused``: the installed norms and rotary
    embeddings take the native library's ops (:mod:`specdec.backends.fused`) when ``native`` holds it."""

    packs: PackedWeights | None
    native: RowsLinear | None = None
    checked: set[int] = field(default_factory=set)
    timer: object | None = None  # when set (a profiled call), its ``linear`` seconds grow by every product's
    fused: bool = True

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``F.linear(x, weight, bias)`` by the faster CPU product for its shape (see the module docstring)."""
        if self.timer is None:
            return self._linear(x, weight, bias)
        t0 = time.perf_counter()
        out = self._linear(x, weight, bias)
        self.timer.linear += time.perf_counter() - t0
        return out

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not rows or x.device.type != "cpu" or x.dtype != weight.dtype:
            return nn.functional.linear(x, weight, bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows <= NATIVE_ROWS and self._native(x, weight, bias):
            return self.native(flat.contiguous(), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
        if rows > 2 and (rows > MAX_ROWS or weight.numel() >= MIN_PACKED) and self._packable(x, weight, bias):
            bias = None if bias is None else bias.contiguous()
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packs.get(weight, self.checked), bias, "none", [], "")
            return out.reshape(*x.shape[:-1], weight.shape[0])
        if rows > MAX_ROWS:
            return nn.functional.linear(x, weight, bias)
        if rows == 1:
            out = torch.mm(weight, torch.cat([flat, flat]).t())[:, :1].t()
        else:
            out = torch.mm(weight, flat.t()).t()
        out = out.contiguous()  # row-major like F.linear's: later ops are slow on the transposed layout
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def _native(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
        """The native product takes it: built, float32, contiguous weight and bias, no gradient to record."""
        if self.native is None or weight.dtype != torch.float32 or not weight.is_contiguous():
            return False
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                 or (bias is not None and bias.requires_grad)))

    def _packable(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
        """oneDNN takes it: packing on, float32, a build with oneDNN, and no gradient to record."""
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
        return (self.packs is not None and weight.dtype == torch.float32 and not grad
                and torch.backends.mkldnn.is_available())


_ROUTE: ContextVar[Route | None] = ContextVar("specdec_linear_route", default=None)


def current_route() -> Route | None:
    """The calling context's :class:`Route` (``None`` outside a routed call)."""
    return _ROUTE.get()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, or the current call's :class:`Route` inside a routed call."""
    route = _ROUTE.get()
    if route is None:
        return nn.functional.linear(x, weight, bias)
    return route.linear(x, weight, bias)


class _RoutedForward:
    """The ``forward`` of an installed ``nn.Linear``: ``F.linear`` unless a call routes it."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Linear) -> None:
        self.module = module

    def __call__(self, x: Tensor) -> Tensor:
        route = _ROUTE.get()
        if route is None:
            return nn.functional.linear(x, self.module.weight, self.module.bias)
        return route.linear(x, self.module.weight, self.module.bias)


def install_linears(module: nn.Module) -> None:
    """Give every CPU ``nn.Linear`` of ``module`` the routed ``forward``, once (idempotent, and safe to
    repeat after an interrupted install). Layers whose ``forward`` is already replaced on the instance
    (e.g. by accelerate's offloading hooks) and subclasses of ``nn.Linear`` are left alone. The model's
    Llama RMSNorms and rotary embeddings get theirs too (:func:`specdec.backends.fused.install_fused`):
    the native ones, inside a routed call whose route holds the native library."""
    from specdec.backends.fused import install_fused  # it reads this module's route

    for layer in module.modules():
        if type(layer) is nn.Linear and "forward" not in vars(layer) and layer.weight.device.type == "cpu":
            layer.forward = _RoutedForward(layer)
    install_fused(module)


def is_installed(module: nn.Module) -> bool:
    """Whether ``module`` has a linear layer routed by :func:`install_linears`."""
    return any(isinstance(vars(layer).get("forward"), _RoutedForward) for layer in module.modules())


def uninstall_linears(module: nn.Module) -> None:
    """Undo :func:`install_linears` (the layers' own ``forward`` again, the norms' and rotary embeddings' too)."""
    from specdec.backends.fused import uninstall_fused

    for layer in module.modules():
        if isinstance(vars(layer).get("forward"), _RoutedForward):
            del layer.forward
    uninstall_fused(module)


@contextmanager
def routed(route: Route | None):
    """Within the block, this context's installed layers and :func:`linear` compute through ``route``
    (``None``: ``F.linear``)."""
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)
