"""The torch reference of tree attention: a dense boolean mask and SDPA.

Shapes: B batch, H query heads, Hk KV heads, T query nodes, Tk tree nodes with keys
(Tk >= T: the queries are the last T of them; Tk = T when the whole tree is verified
at once), S cached positions before the tree, D head dim. Keys/values hold the S
cached positions followed by the Tk tree nodes, as transformers' cache returns them
after ``update``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dense_tree_mask(prefix_start: Tensor, prefix_end: Tensor, tree_mask: Tensor, cached: int) -> Tensor:
    """``(B, T, S + Tk)`` bool: row b's query i sees cached keys ``[start_b, end_b)`` and its tree ancestors.

    Args:
        prefix_start, prefix_end: ``(B,)`` valid cached range of each row.
        tree_mask: ``(B, T, Tk)`` bool, ``[b, i, j]`` True when tree node j is query i or its ancestor.
        cached: S, the cached positions before the tree's keys.
    """
    cols = torch.arange(cached, device=tree_mask.device)  # (S,)
    prefix = (cols >= prefix_start[:, None]) & (cols < prefix_end[:, None])  # (B, S)
    prefix = prefix[:, None, :].expand(-1, tree_mask.shape[1], -1)  # (B, T, S)
    return torch.cat([prefix, tree_mask], dim=-1)


def tree_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, prefix_start: Tensor, prefix_end: Tensor, tree_mask: Tensor,
    scale: float | None = None, dense_mask: Tensor | None = None,
) -> Tensor:
    """Tree attention by masked SDPA.

    Args:
        q: ``(B, H, T, D)`` queries of the tree nodes.
        k, v: ``(B, Hk, S + Tk, D)`` cached keys/values then the tree nodes'.
        prefix_start, prefix_end: ``(B,)`` int, the valid cached range of each row.
        tree_mask: ``(B, T, Tk)`` bool ancestor-or-self mask.
        scale: softmax scale, default ``D ** -0.5``.
        dense_mask: ``(B, T, S + Tk)`` the mask from :func:`dense_tree_mask`, when already built
            (a model's layers share one).

    Returns:
        ``(B, H, T, D)`` attention output, in q's dtype.
    """
    if dense_mask is None:
        dense_mask = dense_tree_mask(prefix_start, prefix_end, tree_mask, k.shape[2] - tree_mask.shape[2])
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask[:, None], scale=scale, enable_gqa=gqa)
