"""A distilled draft model: the classic two-model setup, with a draft trained to imitate the target.

The draft is a few decoder layers of the target's architecture, initialised from chosen target
layers and trained on the target's own greedy outputs (``experiments.train_drafter
drafter=draft_model``). It borrows the target's token embedding and its output head (optionally
reduced to the frequent tokens), so a checkpoint holds only the draft's layers and norm. Once
built (once per target, device and dtype) it drafts like :class:`~specdec.drafters.DraftModel`, with
its own KV cache.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from specdec.drafters.base import TargetView
from specdec.drafters.draft_model import LMNet
from specdec.drafters.network import ModelDrafter, prepare
from specdec.tree import TreeSpec
from specdec.drafters.eagle import head_config
from specdec.drafters.vocab import ReducedHead

BORROWED = ("model.embed_tokens.", "lm_head.")


def build_draft(target: PreTrainedModel, init_layers: list[int], vocab: Tensor | None = None) -> PreTrainedModel:
    """A causal LM with ``len(init_layers)`` layers copied from the target's ``init_layers``, its final
    norm, and the target's embedding and (reduced) output head, shared and frozen."""
    total = target.config.num_hidden_layers
    bad = [i for i in init_layers if not 0 <= i < total]
    if not init_layers or bad:
        raise ValueError(f"draft init_layers={init_layers} must be non-empty indices in [0, {total})")
    config = head_config(target.config, len(init_layers))
    config.vocab_size = target.config.vocab_size
    draft = AutoModelForCausalLM.from_config(config).to(device=target.device, dtype=target.dtype)
    with torch.no_grad():
        for mine, theirs in zip(draft.model.layers, init_layers):
            mine.load_state_dict(target.model.layers[theirs].state_dict())
        draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.model.embed_tokens = target.get_input_embeddings()
    draft.lm_head = ReducedHead(target.get_output_embeddings(), vocab)
    for name, param in draft.named_parameters():
        param.requires_grad_(not name.startswith(BORROWED))
    return draft.eval()


def own_weights(draft: PreTrainedModel) -> dict[str, Tensor]:
    """The draft's trained weights: everything but the borrowed embedding and head."""
    return {k: v for k, v in draft.state_dict().items() if not k.startswith(BORROWED)}


class Distilled(ModelDrafter):
    """A trained draft model from a checkpoint, built against each target it serves (chains or trees:
    ``k``, ``top_k``, ``width``, ``budget``, ``tree`` as in :class:`~specdec.drafters.DraftModel`)."""

    kind = "draft_model"
    default_checkpoint = "draft_model-smollm2-135m"

    def __init__(self, checkpoint: dict, k: int = 4, top_k: int = 1, width: int | None = None,
                 budget: int | None = None, tree: TreeSpec | list[list[int]] | None = None) -> None:
        super().__init__(k, top_k, width, budget, tree, checkpoint)

    @classmethod
    def from_loaded(cls, checkpoint: dict, **kwargs) -> Distilled:
        return cls(checkpoint, **kwargs)

    @classmethod
    def checkpoint_settings(cls, target: PreTrainedModel, settings) -> dict:
        return {"init_layers": list(settings.init_layers)}

    @classmethod
    def trained_weights(cls, module: torch.nn.Module) -> dict[str, Tensor]:
        return own_weights(module)

    def draft_for(self, target: PreTrainedModel) -> PreTrainedModel:
        """The draft LM built on ``target`` (its embedding and head), made once per target, device and dtype."""
        return self.bound(target)

    def bind(self, target: PreTrainedModel) -> PreTrainedModel:
        draft = build_draft(target, self.checkpoint["settings"]["init_layers"], self.checkpoint["vocab"])
        missing, unexpected = draft.load_state_dict(
            {k: v.to(target.dtype) for k, v in self.checkpoint["state_dict"].items()}, strict=False)
        trained_missing = [k for k in missing if not k.startswith(BORROWED)]
        if trained_missing or unexpected:
            raise ValueError(f"checkpoint {self.checkpoint['path']!r} does not fit its draft: missing "
                             f"{trained_missing}, unexpected {unexpected}; retrain it with experiments.train_drafter")
        return draft

    def network(self, draft: PreTrainedModel, view: TargetView) -> LMNet:
        prepare(draft, view)
        return LMNet(draft, view)
