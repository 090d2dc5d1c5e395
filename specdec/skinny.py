"""Skinny matrix products: the linear layers of decoding, by the faster CPU product for their shape.

Decoding multiplies a few rows of activations (one per token in the step: 1 for plain
decoding, a tree's nodes for verification) by every weight matrix of the model, so the step
is bound by reading the weights. ``F.linear`` computes ``x @ W.T`` with MKL, whose kernels for
2-8 rows are slow on this 2-core machine, and whose gemv (one row) reads the weights at a third
of the bandwidth the same product reaches with the operands swapped. So :func:`linear` takes

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
rounding (about 1e-7 relative), as any change of kernel or batch shape does. Where gradients
flow (training) only ``(W @ x.T).T`` and ``F.linear`` are used. Packed products are used only
inside a :func:`skinny_linears` block, and each packed copy is checked against its weight once
per block (see :func:`_packed`). The copies cost memory: the weights once more (about 540 MB for
the embedded default), kept while the weights live.

:func:`skinny_linears` routes every ``nn.Linear`` of some modules through :func:`linear` for
the duration of a ``with`` block, leaving the modules as they were afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BACKENDS = ("auto", "skinny", "torch")
MAX_ROWS = 64  # up to this many rows, small weights take (W @ x.T).T; past it, oneDNN (prefill)
MIN_PACKED = 1 << 19  # weights this large take oneDNN from 3 rows; on smaller ones its per-call cost shows


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, by the faster product on CPU: ``(W @ x.T).T`` for 1-2 rows (and
    for up to ``MAX_ROWS`` rows of a weight under ``MIN_PACKED`` elements, or when gradients flow,
    or outside a :func:`skinny_linears` block), oneDNN on a prepacked float32 weight for the rest."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not rows or x.device.type != "cpu" or x.dtype != weight.dtype:
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows > 2 and (rows > MAX_ROWS or weight.numel() >= MIN_PACKED) and _packable(x, weight, bias):
        bias = None if bias is None else bias.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, _packed(weight), bias, "none", [], "")
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


def _packable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """oneDNN takes it: inside a routing block, float32, a build with oneDNN, and no gradient to
    record (its op has no backward: gradients would silently stop there)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    return _open > 0 and weight.dtype == torch.float32 and not grad and torch.backends.mkldnn.is_available()


@dataclass
class _Packed:
    """A weight in oneDNN's blocked layout, and what tells whether the weight changed since."""

    weight: weakref.ref
    fingerprint: Tensor  # (out, 2) the weight times a fixed random probe
    packed: Tensor
    block: int  # the skinny_linears block that last checked it against its weight


_PACKED: dict[int, _Packed] = {}  # id(weight) -> its packed copy
_PROBES: dict[tuple[int, torch.dtype], Tensor] = {}
_blocks = 0  # routing skinny_linears blocks entered so far
_open = 0  # routing blocks open now: packed products are used only inside one


def _fingerprint(weight: Tensor) -> Tensor:
    """``(out, 2)``: the weight times two fixed random vectors; any change of a row changes its row here."""
    key = (weight.shape[1], weight.dtype)
    if key not in _PROBES:
        _PROBES[key] = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    return torch.mm(weight, _PROBES[key].t())  # the transposed probe: MKL's fast path, as in linear()


def _packed(weight: Tensor) -> Tensor:
    """``weight`` in oneDNN's blocked layout, made once and reused while the weight is unchanged.

    An entry is checked against its weight once per block (a ``generate`` call): its fingerprint,
    one more read of the weight, catches every kind of write (through ``.data``, on inference
    tensors, which keep no version counter). A weight changed in the middle of a block is not seen.
    """
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is not None and entry.weight() is weight and entry.block == _blocks:
        return entry.packed
    with torch.no_grad():
        fingerprint = _fingerprint(weight.detach())
        if entry is None or entry.weight() is not weight or not torch.equal(entry.fingerprint, fingerprint):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 4)
            entry = _Packed(weakref.ref(weight, lambda _: _PACKED.pop(key, None)), fingerprint, packed, _blocks)
            _PACKED[key] = entry
    entry.block = _blocks
    return entry.packed


def _skinny_forward(module: nn.Linear):
    def forward(x: Tensor) -> Tensor:
        return linear(x, module.weight, module.bias)

    return forward


@contextmanager
def skinny_linears(modules: Iterable[nn.Module], backend: str = "auto") -> Iterator[None]:
    """Within the block, every CPU ``nn.Linear`` of ``modules`` computes through :func:`linear`, which
    may use packed weights (checked against their weights once per block).

    Args:
        modules: the models (target, drafter networks) whose linear layers to route.
        backend: ``"auto"`` and ``"skinny"`` route CPU layers; ``"torch"`` leaves every layer as it is.
            Layers on an accelerator, and layers whose ``forward`` was already replaced on the
            instance (e.g. by accelerate's offloading hooks), are never touched.
    """
    if backend not in BACKENDS:
        raise ValueError(f"linear backend {backend!r} is not one of {BACKENDS}")
    global _blocks, _open
    patched: list[nn.Linear] = []
    if backend != "torch":
        seen: set[int] = set()
        for model in modules:
            for module in model.modules():
                if (type(module) is nn.Linear and id(module) not in seen and "forward" not in vars(module)
                        and module.weight.device.type == "cpu"):
                    seen.add(id(module))
                    module.forward = _skinny_forward(module)
                    patched.append(module)
        _blocks, _open = _blocks + 1, _open + 1
    try:
        yield
    finally:
        for module in patched:
            del module.forward
        if backend != "torch":
            _open -= 1
