"""Tree attention: input checks, the bit-packed mask, and dispatch (Triton kernel or torch reference).

Shapes: B batch, H query heads, Hk KV heads, T query nodes, Tk tree nodes with keys (the
queries are the last T of them), S cached positions, D head dim.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from specdec_kernels.tree_attention.reference import tree_attention_reference

BACKENDS = ("auto", "triton", "reference")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pack_tree_mask(tree_mask: Tensor) -> Tensor:
    """``(B, T, Tk)`` bool -> ``(B, T, ceil(Tk / 32))`` int32: bit ``j % 32`` of word ``j // 32`` is column j."""
    B, T, Tk = tree_mask.shape
    words = (Tk + 31) // 32
    padded = torch.zeros(B, T, words * 32, dtype=torch.int64, device=tree_mask.device)
    padded[..., :Tk] = tree_mask.long()
    weights = 2 ** torch.arange(32, dtype=torch.int64, device=tree_mask.device)  # (32,)
    packed = (padded.view(B, T, words, 32) * weights).sum(-1)  # (B, T, W) in [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_tree_mask(bits: Tensor, Tk: int) -> Tensor:
    """Inverse of :func:`pack_tree_mask`: ``(B, T, W)`` int32 -> ``(B, T, Tk)`` bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    unpacked = (bits[..., None] >> shifts) & 1  # (B, T, W, 32)
    return unpacked.flatten(-2)[..., :Tk].bool()


def check_prefix_ranges(prefix_start: Tensor, prefix_end: Tensor, cached: int) -> None:
    """Raise unless ``0 <= start <= end <= cached`` for every row (reads the values: a device sync on CUDA)."""
    if (prefix_start < 0).any() or (prefix_end > cached).any() or (prefix_start > prefix_end).any():
        raise ValueError(f"prefix ranges must satisfy 0 <= start <= end <= S = {cached}")


def _check(q: Tensor, k: Tensor, v: Tensor, prefix_start: Tensor, prefix_end: Tensor, tree_mask: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} must be (B, H, T, D) and k, v {tuple(k.shape)} (B, Hk, S + T, D)")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or k.shape[2] < T:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: need (B, Hk, S + Tk, D), Tk >= T")
    if H % k.shape[1]:
        raise ValueError(f"query heads {H} must be a multiple of KV heads {k.shape[1]}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: all must be one of float32/float16/bfloat16")
    if tree_mask.dim() != 3 or tree_mask.shape[:2] != (B, T) or tree_mask.dtype != torch.bool:
        raise ValueError(f"tree_mask {tuple(tree_mask.shape)} {tree_mask.dtype} must be bool (B, T, Tk) with B={B}, T={T}")
    Tk = tree_mask.shape[2]
    if Tk < T or k.shape[2] < Tk:
        raise ValueError(f"tree_mask has Tk={Tk} key nodes: need T={T} <= Tk <= keys {k.shape[2]}")
    if prefix_start.shape != (B,) or prefix_end.shape != (B,):
        raise ValueError(f"prefix_start/prefix_end must be (B,) = ({B},)")


def _launch(q, k, v, prefix_start, prefix_end, tree_mask, scale):
    import triton

    from specdec_kernels.tree_attention.kernel import _tree_attention_fwd

    B, H, T, D = q.shape
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {D} is not supported by the Triton kernel: use 16, 32, 64, 128 or 256")
    Tk = tree_mask.shape[2]
    S = k.shape[2] - Tk
    bits = pack_tree_mask(tree_mask).to(q.device)
    out = torch.empty_like(q)
    block_m = 16 if T <= 16 else 32
    block_n = 32 if D <= 64 else 16
    grid = (triton.cdiv(T, block_m), B * H)
    _tree_attention_fwd[grid](
        q, k, v, out, prefix_start.to(torch.int32), prefix_end.to(torch.int32), bits,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bits.stride(),
        H, T, Tk, S, scale,
        GROUP=H // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, IEEE=_float32_products(q),
    )
    return out


def _float32_products(q: Tensor) -> bool:
    """float32 inputs always; bfloat16 too under the interpreter, whose bf16 ``tl.dot`` is wrong (triton 3.9)."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)


def kernel_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on ``device`` (CUDA, or anything under TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def tree_attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_start: Tensor, prefix_end: Tensor, tree_mask: Tensor,
    scale: float | None = None, backend: str = "auto", dense_mask: Tensor | None = None, check_ranges: bool = True,
) -> Tensor:
    """Batched tree attention.

    Args:
        q: ``(B, H, T, D)`` queries of the tree nodes.
        k, v: ``(B, Hk, S + Tk, D)``: S cached positions, then the Tk tree nodes'.
        prefix_start, prefix_end: ``(B,)`` int, cached keys ``[start_b, end_b)`` of row b are visible.
        tree_mask: ``(B, T, Tk)`` bool, True where tree node j is query i or an ancestor of it.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"triton"``, ``"reference"`` (torch SDPA with a dense mask), or ``"auto"``:
            the kernel on CUDA, the reference elsewhere.
        dense_mask: for the reference, the dense mask if already built (see ``dense_tree_mask``).
        check_ranges: validate the prefix ranges (callers that validated them once, e.g. for all
            layers of a model, pass False to avoid a device sync per call).

    Returns:
        ``(B, H, T, D)`` in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"tree attention backend {backend!r} is not one of {BACKENDS}")
    _check(q, k, v, prefix_start, prefix_end, tree_mask)
    if check_ranges:
        check_prefix_ranges(prefix_start, prefix_end, k.shape[2] - tree_mask.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "triton":
        if not kernel_available(q.device):
            raise ValueError(
                f"the Triton tree-attention kernel needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1: "
                "use backend='reference' on this device"
            )
        return _launch(q, k, v, prefix_start, prefix_end, tree_mask, scale)
    return tree_attention_reference(q, k, v, prefix_start, prefix_end, tree_mask, scale, dense_mask)
