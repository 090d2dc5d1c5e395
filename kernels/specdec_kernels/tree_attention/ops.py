"""Tree attention: input checks, the bit-packed mask, and dispatch (Triton kernel or torch reference).

Shapes: B batch, H query heads, Hk KV heads, T query nodes, Tk tree nodes with keys (the
queries are the last T of them), S cached positions, Dk query/key head dim, Dv value head dim.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from specdec_kernels.tree_attention.reference import check_overlay, tree_attention_reference

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
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)} must be (B, H, T, Dk), k {tuple(k.shape)} (B, Hk, S + Tk, Dk) "
                         f"and v {tuple(v.shape)} (B, Hk, S + Tk, Dv)")
    B, H, T, Dk = q.shape
    if k.shape[0] != B or k.shape[3] != Dk or k.shape[2] < T:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: need (B, Hk, S + Tk, Dk) with "
                         f"B={B}, Dk={Dk} (q's head dim), Tk >= T={T}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not fit k {tuple(k.shape)}: need (B, Hk, S + Tk, Dv) = "
                         f"{tuple(k.shape[:3]) + ('Dv',)}; only the head dim may differ (Dv={v.shape[3]}, Dk={Dk})")
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


def _check_scores(H: int, softcap: float | None, sinks: Tensor | None) -> None:
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"softcap={softcap!r} must be a positive float (Gemma-2's attn_logit_softcapping) or None "
                         "for no capping")
    if sinks is not None and (not isinstance(sinks, Tensor) or sinks.shape != (H,) or not sinks.is_floating_point()):
        shape = tuple(sinks.shape) if isinstance(sinks, Tensor) else type(sinks).__name__
        raise ValueError(f"sinks {shape} must be a float tensor (H,) = ({H},): one logit per query head "
                         "(gpt-oss's s_aux)")


def check_positions_agree(q_positions: Tensor, k_positions: Tensor) -> None:
    """Raise unless each query's position is its own key's (the last T keys; reads values: a device sync on CUDA)."""
    T = q_positions.shape[1]
    if not torch.equal(q_positions.long(), k_positions[:, k_positions.shape[1] - T:].long()):
        raise ValueError("q_positions differ from the last T of k_positions, the queries' own keys: pass the same "
                         "position ids for both (or leave q_positions None)")


def _launch(q, k, v, prefix_start, prefix_end, tree_mask, scale, q_positions, k_positions, sliding_window,
            chunk_size, softcap, sinks):
    import triton

    from specdec_kernels.tree_attention.kernel import _tree_attention_fwd

    B, H, T, Dk = q.shape
    Dv = v.shape[3]
    if max(Dk, Dv) > 256:
        raise ValueError(f"head dims Dk={Dk}, Dv={Dv}: the Triton kernel takes head dims up to 256; "
                         "use backend='reference' for larger ones")
    Tk = tree_mask.shape[2]
    S = k.shape[2] - Tk
    bits = pack_tree_mask(tree_mask).to(q.device)
    # the interpreter rounds float32 -> bfloat16 toward zero (triton 3.9): there the kernel stores float32
    out = q.new_empty(B, H, T, Dv, dtype=torch.float32 if _interpreted_bf16(q) else q.dtype)
    block_dk, block_dv = (max(16, triton.next_power_of_2(d)) for d in (Dk, Dv))  # tl.dot needs >= 16
    block_m = 16 if T <= 16 else 32
    block_n = 32 if max(block_dk, block_dv) <= 64 else 16
    has_pos = sliding_window is not None or chunk_size is not None
    if has_pos:
        q_positions, k_positions = (p.to(device=q.device, dtype=torch.int64) for p in (q_positions, k_positions))
        pos_strides = (*q_positions.stride(), *k_positions.stride())
    else:
        q_positions = k_positions = bits  # never read
        pos_strides = (0, 0, 0, 0)
    has_sinks = sinks is not None
    sinks = sinks.to(device=q.device, dtype=torch.float32) if has_sinks else bits  # bits: never read
    grid = (triton.cdiv(T, block_m), B * H)
    _tree_attention_fwd[grid](
        q, k, v, out, prefix_start.to(torch.int32), prefix_end.to(torch.int32), bits, q_positions, k_positions, sinks,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bits.stride(), *pos_strides,
        H, T, Tk, S, scale, sliding_window or 0, chunk_size or 0, float(softcap or 0.0),
        GROUP=H // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DK=Dk, HEAD_DV=Dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv, IEEE=_float32_products(q),
        HAS_WINDOW=sliding_window is not None, HAS_CHUNK=chunk_size is not None, HAS_SOFTCAP=softcap is not None,
        HAS_SINKS=has_sinks,
    )
    return out.to(q.dtype)


def _interpreted_bf16(q: Tensor) -> bool:
    return q.dtype == torch.bfloat16 and not q.is_cuda


def _float32_products(q: Tensor) -> bool:
    """float32 inputs always; bfloat16 too under the interpreter, whose bf16 ``tl.dot`` is wrong (triton 3.9)."""
    return q.dtype == torch.float32 or _interpreted_bf16(q)


def kernel_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on ``device`` (CUDA, or anything under TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def tree_attention(
    q: Tensor, k: Tensor, v: Tensor, prefix_start: Tensor, prefix_end: Tensor, tree_mask: Tensor,
    scale: float | None = None, backend: str = "auto", dense_mask: Tensor | None = None, check_ranges: bool = True,
    *, q_positions: Tensor | None = None, k_positions: Tensor | None = None, sliding_window: int | None = None,
    chunk_size: int | None = None, softcap: float | None = None, sinks: Tensor | None = None,
) -> Tensor:
    """Batched tree attention.

    A key is visible to a query when it is in the row's cached range ``[start, end)`` or is
    the query's ancestor-or-self in the tree, and, with a window or chunks, when the overlays
    of transformers 5.24 (``masking_utils.py``) keep it, counted in position ids rather than
    cache indices:

    - ``sliding_window=W`` (``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``):
      key position ``p_k`` is kept when ``p_k > p_q - W``: a query sees W positions, itself
      included; the key W-1 back is visible, the key W back is not. This is the
      ``sliding_window`` that Mistral, Gemma-2 and gpt-oss pass to their attention function.
    - ``chunk_size=C`` (``chunked_overlay``: ``(kv_idx - left_padding) // chunk_size ==
      (q_idx - left_padding) // chunk_size``, Llama-4's ``attention_chunk_size``): kept when
      ``p_k // C == p_q // C`` (floor division; positions count from the row's first real
      token, as ``idx - left_padding`` does).

    Args:
        q: ``(B, H, T, Dk)`` queries of the tree nodes.
        k: ``(B, Hk, S + Tk, Dk)``, v: ``(B, Hk, S + Tk, Dv)``: S cached positions, then the Tk
            tree nodes'. Dv may differ from Dk (multi-head latent attention).
        prefix_start, prefix_end: ``(B,)`` int, cached keys ``[start_b, end_b)`` of row b are visible.
        tree_mask: ``(B, T, Tk)`` bool, True where tree node j is query i or an ancestor of it.
        scale: softmax scale, default ``Dk ** -0.5``.
        backend: ``"triton"``, ``"reference"`` (torch SDPA with a dense mask, or an eager softmax
            with softcap/sinks), or ``"auto"``: the kernel on CUDA, the reference elsewhere.
        dense_mask: for the reference, the dense mask if already built (see ``dense_tree_mask``,
            which takes the same positions, window and chunk); used as is.
        check_ranges: validate the prefix ranges, and that q_positions are the last T of
            k_positions (callers that validated them once, e.g. for all layers of a model,
            pass False to avoid a device sync per call).
        q_positions: ``(B, T)`` int64 position id of each query; default the last T of k_positions.
        k_positions: ``(B, S + Tk)`` int64 position id of every key (cached and tree); needed
            with a window or chunks, ignored without.
        sliding_window: W, the window of this layer (None: no window).
        chunk_size: C, the attention chunk of this layer (None: no chunks).
        softcap: Gemma-2's logit softcapping: scores become ``softcap * tanh(scores / softcap)``
            after scaling and before masking (``models/gemma2/modeling_gemma2.py``
            ``eager_attention_forward``).
        sinks: ``(H,)`` gpt-oss's ``s_aux``: one logit per query head that joins the softmax
            (its denominator and its max) and contributes no value
            (``models/gpt_oss/modeling_gpt_oss.py`` ``eager_attention_forward``).

    Returns:
        ``(B, H, T, Dv)`` in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"tree attention backend {backend!r} is not one of {BACKENDS}")
    _check(q, k, v, prefix_start, prefix_end, tree_mask)
    B, H, T, _ = q.shape
    q_positions = check_overlay(q_positions, k_positions, sliding_window, chunk_size, B, T, k.shape[2])
    _check_scores(H, softcap, sinks)
    if check_ranges:
        check_prefix_ranges(prefix_start, prefix_end, k.shape[2] - tree_mask.shape[2])
        if sliding_window is not None or chunk_size is not None:
            check_positions_agree(q_positions, k_positions)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "triton":
        if not kernel_available(q.device):
            raise ValueError(
                f"the Triton tree-attention kernel needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1: "
                "use backend='reference' on this device"
            )
        return _launch(q, k, v, prefix_start, prefix_end, tree_mask, scale, q_positions, k_positions,
                       sliding_window, chunk_size, softcap, sinks)
    return tree_attention_reference(q, k, v, prefix_start, prefix_end, tree_mask, scale, dense_mask,
                                    q_positions=q_positions, k_positions=k_positions, sliding_window=sliding_window,
                                    chunk_size=chunk_size, softcap=softcap, sinks=sinks)
