"""Tree attention: queries are the nodes of draft trees; each attends to its row's cached
prefix (ragged per row) and to its ancestors in the tree (itself included)."""

from specdec_kernels.tree_attention.ops import pack_tree_mask, tree_attention, unpack_tree_mask
from specdec_kernels.tree_attention.reference import tree_attention_reference

__all__ = ["pack_tree_mask", "tree_attention", "tree_attention_reference", "unpack_tree_mask"]
