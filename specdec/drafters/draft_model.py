"""An independent draft model: any causal LM sharing the target's vocabulary (Leviathan et al. 2023;
Chen et al. 2023), drafting chains or trees for every row at once, with its own ragged KV cache.

Each step the draft first catches up on the committed tokens it has not seen (one forward for all
rows, left-padded), then grows the tree level by level with :func:`~specdec.drafters.growth.grow`:
one forward per depth for all rows, through the tree channel every draft network shares
(:meth:`~specdec.drafters.network.DraftNetwork.through_tree`: tree attention, or the draft's own 4-D
masks for a family outside the attention interface). On commit the draft cache keeps the accepted
nodes it fed, moved next to the prefix, and drops the rest. The skeleton lives in
:mod:`specdec.drafters.network`; this file holds only what a causal LM supplies.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from specdec.drafters.base import TargetView
from specdec.drafters.growth import Level
from specdec.drafters.network import DraftNetwork, ModelDrafter, check_vocab, prepare
from specdec.tree import TreeSpec


class LMNet(DraftNetwork):
    """A causal LM as the draft network, with a ragged cache of every row's committed tokens."""

    def __init__(self, model: PreTrainedModel, view: TargetView) -> None:
        super().__init__(view, served=model, cached=model)
        self.model = model

    def _logits(self, ids: Tensor, positions: Tensor, ancestors: Tensor, key_positions: Tensor,
                logits_to_keep: int = 0) -> Tensor:
        device = self.device
        return self.through_tree(self.model, ancestors, key_positions, input_ids=ids.to(device),
                                 position_ids=positions.to(device), cache=self.cache.cache, use_cache=True,
                                 logits_to_keep=logits_to_keep).logits

    def root(self, states, depths) -> Tensor:
        feed, ids = self.catch_up_tokens(states)
        logits = self._logits(ids, feed.positions, feed.ancestors, feed.positions, logits_to_keep=1)  # (A, 1, V)
        self.keep_fed(feed)
        return logits[:, -1]

    def expand(self, level: Level) -> Tensor:
        positions, keys = self.level_positions(level)
        return self._logits(level.tokens, positions, level.ancestors, keys)  # (A, F, V)

    def keep_tree(self, fed: dict[int, list[int]]) -> None:
        if self.cache is None:
            return
        kept = [torch.tensor([self.tree_start + j for j in fed.get(row, [])], dtype=torch.long)
                for row in self.rows.order]
        self.cache.commit(kept)  # accepted fed nodes next to the prefix; the rest of the tree goes


class DraftModel(ModelDrafter):
    """Drafts a chain (``top_k=1``) or a tree of depth ``k`` with a small causal LM.

    Args:
        model: the draft LM; must share the target's tokenizer.
        k: draft depth per step.
        top_k: children per expanded node (1 = a chain).
        width: frontier nodes expanded per depth (default ``top_k``).
        budget: greedy trees keep their ``budget`` most probable nodes (default: all).
        tree: a static tree shape (``TreeSpec`` or list of paths of child ranks); overrides
            ``top_k``/``width``/``budget``, and ``k`` caps its depth.
    """

    def __init__(self, model: PreTrainedModel, k: int = 4, top_k: int = 1, width: int | None = None,
                 budget: int | None = None, tree: TreeSpec | list[list[int]] | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"DraftModel needs a causal LM (a transformers model), got {type(model).__name__}: "
                             "for a trained drafter pass it directly as drafter=")
        super().__init__(k, top_k, width, budget, tree)
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", layers: int | None = None,
                        **kwargs) -> DraftModel:
        """Load the draft with :func:`specdec.load_model`; ``layers`` keeps only its first layers."""
        from specdec.models import load_model

        model, _ = load_model(name_or_path, dtype=dtype)
        if layers is not None:
            total = len(model.model.layers)
            if not 1 <= layers <= total:
                raise ValueError(f"DraftModel layers={layers} must be in [1, {total}] for {name_or_path!r}")
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
        return cls(model, **kwargs)

    def bind(self, target: torch.nn.Module) -> PreTrainedModel:
        check_vocab(self.model, target)
        return self.model

    def network(self, model: PreTrainedModel, view: TargetView) -> LMNet:
        prepare(model, view)
        return LMNet(model, view)
