"""The torch reference of tree attention: a dense boolean mask and SDPA (an eager softmax
where SDPA cannot express the model's attention: logit softcapping, attention sinks).

Shapes: B batch, H query heads, Hk KV heads, T query nodes, Tk tree nodes with keys
(Tk >= T: the queries are the last T of them; Tk = T when the whole tree is verified
at once), S cached positions before the tree, Dk query/key head dim, Dv value head dim
(Dv = Dk except in multi-head latent attention). Keys/values hold the S cached positions
followed by the Tk tree nodes, as transformers' cache returns them after ``update``.

The optional overlays follow transformers 5.24 (``masking_utils.py``), with position ids in
place of cache indices (a tree node's cache index is not its position; a sliding-window
cache's index is not either):

- sliding window W (``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``): key
  position ``p_k`` is visible to query position ``p_q`` when ``p_k > p_q - W``, i.e. the
  query sees W positions, itself included: the key W-1 back is visible, the key W back is not.
- chunks of C (``chunked_overlay``: ``(kv_idx - left_padding) // chunk_size == (q_idx -
  left_padding) // chunk_size``): visible when ``p_k // C == p_q // C`` (floor division;
  positions count from the row's first real token, which is ``idx - left_padding``).

Both only remove keys from what the prefix range and the tree mask allow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_overlay(
    q_positions: Tensor | None, k_positions: Tensor | None, sliding_window: int | None, chunk_size: int | None,
    B: int, T: int, keys: int,
) -> Tensor | None:
    """Validate window/chunk settings and positions; return q_positions (default: the last T key positions)."""
    for name, value in (("sliding_window", sliding_window), ("chunk_size", chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive int (a number of positions) or None for none")
    if sliding_window is None and chunk_size is None:
        return q_positions
    setting = f"sliding_window={sliding_window}" if sliding_window is not None else f"chunk_size={chunk_size}"
    if k_positions is None:
        raise ValueError(f"{setting} needs k_positions (B, S + Tk) = ({B}, {keys}): pass the position id of every "
                         "key, cached and tree (windows and chunks count positions, not cache indices)")
    if k_positions.shape != (B, keys) or k_positions.dtype.is_floating_point or k_positions.dtype == torch.bool:
        raise ValueError(f"k_positions {tuple(k_positions.shape)} {k_positions.dtype} must be integer "
                         f"(B, S + Tk) = ({B}, {keys}): one position id per key")
    if q_positions is None:
        return k_positions[:, keys - T:]  # the queries are the last T tree nodes
    if q_positions.shape != (B, T) or q_positions.dtype.is_floating_point or q_positions.dtype == torch.bool:
        raise ValueError(f"q_positions {tuple(q_positions.shape)} {q_positions.dtype} must be integer (B, T) = "
                         f"({B}, {T}): one position id per query (or None: the last T of k_positions)")
    return q_positions


def position_mask(
    q_positions: Tensor, k_positions: Tensor, sliding_window: int | None = None, chunk_size: int | None = None,
) -> Tensor:
    """``(B, T, S + Tk)`` bool: the window and chunk overlays of transformers, by position (see the module doc)."""
    qp = q_positions[:, :, None].long()  # (B, T, 1)
    kp = k_positions[:, None, :].long()  # (B, 1, S + Tk)
    visible = torch.ones(qp.shape[0], qp.shape[1], kp.shape[2], dtype=torch.bool, device=k_positions.device)
    if sliding_window is not None:
        visible &= kp > qp - sliding_window
    if chunk_size is not None:
        visible &= torch.div(kp, chunk_size, rounding_mode="floor") == torch.div(qp, chunk_size, rounding_mode="floor")
    return visible


def dense_tree_mask(
    prefix_start: Tensor, prefix_end: Tensor, tree_mask: Tensor, cached: int, *,
    q_positions: Tensor | None = None, k_positions: Tensor | None = None,
    sliding_window: int | None = None, chunk_size: int | None = None,
) -> Tensor:
    """``(B, T, S + Tk)`` bool: row b's query i sees cached keys ``[start_b, end_b)`` and its tree
    ancestors, and with a window or chunks only those of them that the overlay keeps.

    A model whose layers differ (sliding and global layers) builds one mask per distinct
    ``(sliding_window, chunk_size)`` and passes it to every layer of that kind as ``dense_mask``.

    Args:
        prefix_start, prefix_end: ``(B,)`` valid cached range of each row.
        tree_mask: ``(B, T, Tk)`` bool, ``[b, i, j]`` True when tree node j is query i or its ancestor.
        cached: S, the cached positions before the tree's keys.
        q_positions: ``(B, T)`` int position ids of the queries (default: the last T of k_positions).
        k_positions: ``(B, S + Tk)`` int position ids of every key; needed with a window or chunks.
        sliding_window: W, keep keys with ``p_k > p_q - W`` (None: no window).
        chunk_size: C, keep keys with ``p_k // C == p_q // C`` (None: no chunks).
    """
    B, T, Tk = tree_mask.shape
    q_positions = check_overlay(q_positions, k_positions, sliding_window, chunk_size, B, T, cached + Tk)
    cols = torch.arange(cached, device=tree_mask.device)  # (S,)
    prefix = (cols >= prefix_start[:, None]) & (cols < prefix_end[:, None])  # (B, S)
    prefix = prefix[:, None, :].expand(-1, T, -1)  # (B, T, S)
    mask = torch.cat([prefix, tree_mask], dim=-1)  # (B, T, S + Tk)
    if sliding_window is None and chunk_size is None:
        return mask
    return mask & position_mask(q_positions, k_positions, sliding_window, chunk_size)


def _eager(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float | None,
           sinks: Tensor | None) -> Tensor:
    """Transformers' eager attention (Gemma-2 softcap, gpt-oss sinks) on a boolean ``(B, T, S + Tk)`` mask."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)  # (B, H, S + Tk, Dk)
    v = v.repeat_interleave(group, 1)  # (B, H, S + Tk, Dv)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, T, S + Tk)
    if softcap is not None:  # Gemma-2: scale, then cap, then mask
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.to(torch.promote_types(q.dtype, torch.float32))  # softmax in float32 at least
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    if sinks is not None:  # gpt-oss: the sink joins the softmax, its max included, and is dropped after
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)  # (B, H, T, 1)
        logits = torch.cat([scores, sink], dim=-1)  # (B, H, T, S + Tk + 1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees nothing gets 0, as in SDPA
    return torch.matmul(probs.to(v.dtype), v)


def tree_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, prefix_start: Tensor, prefix_end: Tensor, tree_mask: Tensor,
    scale: float | None = None, dense_mask: Tensor | None = None, *,
    q_positions: Tensor | None = None, k_positions: Tensor | None = None,
    sliding_window: int | None = None, chunk_size: int | None = None,
    softcap: float | None = None, sinks: Tensor | None = None,
) -> Tensor:
    """Tree attention by masked SDPA, or by transformers' eager softmax with softcap or sinks.

    Args:
        q: ``(B, H, T, Dk)`` queries of the tree nodes.
        k: ``(B, Hk, S + Tk, Dk)``, v: ``(B, Hk, S + Tk, Dv)`` cached keys/values then the tree nodes'.
        prefix_start, prefix_end: ``(B,)`` int, the valid cached range of each row.
        tree_mask: ``(B, T, Tk)`` bool ancestor-or-self mask.
        scale: softmax scale, default ``Dk ** -0.5``.
        dense_mask: ``(B, T, S + Tk)`` the mask from :func:`dense_tree_mask`, when already built
            (a model's layers of one kind share one); used as is, so build it with this call's
            positions, window and chunks.
        q_positions, k_positions, sliding_window, chunk_size: the overlays of :func:`dense_tree_mask`.
        softcap: scores become ``softcap * tanh(scores / softcap)`` after scaling, before masking.
        sinks: ``(H,)`` one logit per query head that joins the softmax denominator and adds no value.

    Returns:
        ``(B, H, T, Dv)`` attention output, in q's dtype.
    """
    if dense_mask is None:
        dense_mask = dense_tree_mask(prefix_start, prefix_end, tree_mask, k.shape[2] - tree_mask.shape[2],
                                     q_positions=q_positions, k_positions=k_positions,
                                     sliding_window=sliding_window, chunk_size=chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if softcap is not None or sinks is not None:
        return _eager(q, k, v, dense_mask, scale, softcap, sinks).to(q.dtype)
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask[:, None], scale=scale, enable_gqa=gqa)
