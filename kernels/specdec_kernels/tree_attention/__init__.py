"""Tree attention: queries are the nodes of draft trees; each attends to its row's cached
prefix (ragged per row) and to its ancestors in the tree (itself included), optionally within
a sliding window or a chunk (by position), with logit softcapping, attention sinks, and a value
head dim of its own."""

from specdec_kernels.tree_attention.ops import pack_tree_mask, tree_attention, unpack_tree_mask
from specdec_kernels.tree_attention.reference import dense_tree_mask, tree_attention_reference

__all__ = ["dense_tree_mask", "pack_tree_mask", "tree_attention", "tree_attention_reference", "unpack_tree_mask"]
