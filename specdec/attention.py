"""Tree attention plugged into transformers through its ``AttentionInterface``.

No model file is forked: the function below is registered under the name
``"specdec_tree"``; while a model runs with that implementation, a forward given a
``tree=TreeMask(...)`` keyword argument (passed by transformers down to every
attention layer) attends over the tree, and any other forward (prefill, plain
steps) is exactly transformers' SDPA path with its usual mask.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from specdec_kernels.tree_attention import tree_attention
from specdec_kernels.tree_attention.ops import BACKENDS
from specdec_kernels.tree_attention.reference import dense_tree_mask

TREE_ATTENTION = "specdec_tree"


@dataclass(frozen=True)
class TreeMask:
    """What every attention layer needs to verify a batch of trees.

    Attributes:
        prefix_start, prefix_end: ``(B,)`` each row's valid cached keys ``[start, end)``.
        ancestors: ``(B, T, T)`` bool, True where key node j is query node i or its ancestor
            (T counts the root: node 0 of the forward is the root token).
        backend: ``"auto"`` (Triton on CUDA, torch reference elsewhere), ``"triton"``, ``"reference"``.
    """

    prefix_start: Tensor
    prefix_end: Tensor
    ancestors: Tensor
    backend: str = "auto"
    _dense: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"tree attention backend {self.backend!r} is not one of {BACKENDS}")
        if (self.prefix_start < 0).any() or (self.prefix_start > self.prefix_end).any():
            raise ValueError("tree prefix ranges must satisfy 0 <= start <= end")

    def dense(self, keys: int) -> Tensor:
        """``(B, T, keys)`` dense boolean mask for the torch reference, built once per forward."""
        if keys not in self._dense:
            cached = keys - self.ancestors.shape[2]
            self._dense[keys] = dense_tree_mask(self.prefix_start, self.prefix_end, self.ancestors, cached)
        return self._dense[keys]


def tree_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    tree: TreeMask | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The registered attention: ``query (B, H, T, D)``, ``key/value (B, Hk, S + T, D)`` -> ``(B, T, H, D)``."""
    if tree is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    unsupported = [name for name in ("softcap", "s_aux", "sliding_window") if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"tree attention does not support {', '.join(unsupported)}: this model needs its own "
                         "attention for those; use a model without them")
    uses_reference = tree.backend == "reference" or (tree.backend == "auto" and not query.is_cuda)
    dense = tree.dense(key.shape[2]) if uses_reference else None
    out = tree_attention(query, key, value, tree.prefix_start, tree.prefix_end, tree.ancestors, scale=scaling,
                         backend=tree.backend, dense_mask=dense, check_ranges=False)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(TREE_ATTENTION, tree_attention_forward)
AttentionMaskInterface.register(TREE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def tree_attention_enabled(model: PreTrainedModel):
    """Run ``model`` with tree attention inside the block; its own implementation is restored after."""
    previous = model.config._attn_implementation
    if previous == TREE_ATTENTION:  # already on (a draft that is the target itself)
        yield model
        return
    model.set_attn_implementation(TREE_ATTENTION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
