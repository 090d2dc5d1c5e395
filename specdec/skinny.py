"""Skinny matrix products: the linear layers of decoding, computed as ``(W @ x.T).T`` on CPU.

Decoding multiplies a few rows of activations (one per token in the step: 1 for plain
decoding, a tree's nodes for verification) by every weight matrix of the model, so the step
is bound by reading the weights. ``F.linear`` computes ``x @ W.T``; with few rows in ``x``
MKL's sgemm is slow on this 2-core machine, and its gemv (one row) reads the weights at a
third of the bandwidth the same product reaches with the operands swapped. Measured here on
SmolLM2-135M (float32, 2 threads, a 200-token cache), one target forward:

======  =========  ==================
tokens  F.linear   ``(W @ x.T).T``
======  =========  ==================
1       34 ms      22 ms
2       57 ms      31 ms
4       56 ms      33 ms
8       59 ms      47 ms
16      73 ms      57 ms
64      150 ms     129 ms
======  =========  ==================

A single row is computed as two (the row twice), since the 2-column product beats gemv. The
result is the same product summed in a different order: it agrees with ``F.linear`` to float
rounding (about 1e-7 relative), as any change of kernel or batch shape does.

:func:`skinny_linears` routes every ``nn.Linear`` of some modules through :func:`linear` for
the duration of a ``with`` block, leaving the modules as they were afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

BACKENDS = ("auto", "skinny", "torch")
MAX_ROWS = 64  # past this many rows the usual product is as fast (prefill, training)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, as ``(W @ x.T).T`` when ``x`` has 1 to ``MAX_ROWS`` rows on CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= MAX_ROWS or x.device.type != "cpu" or x.dtype != weight.dtype:
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        out = torch.mm(weight, torch.cat([flat, flat]).t())[:, :1].t()
    else:
        out = torch.mm(weight, flat.t()).t()
    out = out.contiguous()  # row-major like F.linear's: later ops are slow on the transposed layout
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _skinny_forward(module: nn.Linear):
    def forward(x: Tensor) -> Tensor:
        return linear(x, module.weight, module.bias)

    return forward


@contextmanager
def skinny_linears(modules: Iterable[nn.Module], backend: str = "auto") -> Iterator[None]:
    """Within the block, every CPU ``nn.Linear`` of ``modules`` computes through :func:`linear`.

    Args:
        modules: the models (target, drafter networks) whose linear layers to route.
        backend: ``"auto"`` and ``"skinny"`` route CPU layers; ``"torch"`` leaves every layer as it is.
            Layers on an accelerator, and layers whose ``forward`` was already replaced on the
            instance (e.g. by accelerate's offloading hooks), are never touched.
    """
    if backend not in BACKENDS:
        raise ValueError(f"linear backend {backend!r} is not one of {BACKENDS}")
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
    try:
        yield
    finally:
        for module in patched:
            del module.forward
