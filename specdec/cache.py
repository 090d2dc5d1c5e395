"""KV-cache adapter: after verification keep the root's prefix and the accepted path only.

Works on transformers' own ``DynamicCache`` (its layers expose ``.keys`` / ``.values``
of shape ``(B, Hk, S, D)``). A chain's accepted path is a prefix of the drafted
block, so it is a crop; a tree's path is gathered to contiguous positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(model) -> DynamicCache:
    """An empty cache for ``model``."""
    return DynamicCache(config=model.config)


def keep_path(cache: DynamicCache, prefix_len: int, path: list[int]) -> None:
    """Keep positions ``[0, prefix_len)`` and tree nodes ``path``; drop the rest, in place.

    Args:
        cache: holds ``prefix_len`` committed positions followed by ``T`` tree nodes.
        prefix_len: committed positions, the root included.
        path: accepted node indices (into the ``T`` tree nodes), root side first.
    """
    total = cache.get_seq_length()
    if path == list(range(len(path))):  # a prefix of the block: a plain crop
        if total > prefix_len + len(path):
            cache.crop(-(total - prefix_len - len(path)))
        return
    keep = torch.cat([torch.arange(prefix_len), prefix_len + torch.tensor(path, dtype=torch.long)])
    for layer in cache.layers:
        if layer.is_initialized:
            keep_dev = keep.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, keep_dev)  # (B, Hk, S, D)
            layer.values = layer.values.index_select(-2, keep_dev)


def crop_to(cache: DynamicCache, length: int) -> None:
    """Drop cached positions past ``length``, in place."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
