"""Early-exit self-speculation (LayerSkip, Elhoushi et al. 2024; Draft & Verify, Zhang et al. 2024):
the target drafts for itself with its first L layers, its final norm and its output head.

No second model and no second KV cache: the draft attends over the target's own cached keys and
values of those L layers (read through the call's :meth:`~specdec.drafters.base.TargetView.prefix_cache`,
all rows at once), and its tree's entries are thrown away after proposing; the verification forward
then writes every layer. A
trained adapter (a zero-initialised residual linear map after the norm, so an untrained one is
plain early exit) and an optional reduced vocabulary make the exit cheaper and closer to the
target's final layer.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from specdec.backends.cpu_linear import install_linears
from specdec.drafters.base import DecodeState, TargetView, Verified, module_for
from specdec.drafters.growth import Level
from specdec.drafters.network import DraftNetwork, ModelDrafter, RowTable
from specdec.drafters.vocab import ReducedHead
from specdec.training.checkpoint import load_weights
from specdec.tree import TreeSpec


class ExitAdapter(nn.Module):
    """``h + W h`` on the normed exit state; ``W = 0`` at start (plain early exit)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.proj(hidden)


class ExitModel(nn.Module):
    """The target's first ``layers`` layers -> its final norm -> adapter -> output head, called like a
    causal LM. The target's modules are borrowed, not copied."""

    def __init__(self, target: nn.Module, layers: int, adapter: ExitAdapter, head: ReducedHead) -> None:
        super().__init__()
        total = target.config.num_hidden_layers
        if not 1 <= layers < total:
            raise ValueError(f"early exit layers={layers} must be in [1, {total - 1}] for this target")
        self._target = [target]  # a plain reference: the target's weights stay the target's
        self.layers, self.adapter, self.head = layers, adapter, head

    @property
    def device(self) -> torch.device:
        return self._target[0].device

    def truncated(self) -> nn.Module:
        """The target's inner model, seen with ``layers`` layers (a shallow view; the target is untouched)."""
        body = copy.copy(self._target[0].model)
        body.config = copy.copy(body.config)
        body.config.num_hidden_layers = self.layers
        return body

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache: DynamicCache, use_cache: bool = True,
                logits_to_keep: int = 0, **kwargs) -> SimpleNamespace:
        hidden = self.truncated()(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=use_cache,
                                  **kwargs).last_hidden_state
        return SimpleNamespace(logits=self.head(self.adapter(hidden[:, -logits_to_keep:])))


class ExitNet(DraftNetwork):
    """The exit model as the draft network, attending over the target's own cached keys and values of
    its first layers (copied once per step into a scratch cache that grows by the tree's nodes and is
    dropped after the step). The root is fed first, as the tree's node 0."""

    def __init__(self, model: ExitModel, view: TargetView) -> None:
        super().__init__(view, served=view.model)  # the tree reaches the target's layers as the target takes it
        self.model = model
        self.rows = _EngineRows(view, model.layers)
        self.scratch: DynamicCache | None = None
        self.start = self.end = None

    def _logits(self, tokens: Tensor, positions: Tensor, ancestors: Tensor, key_positions: Tensor) -> Tensor:
        device = self.device
        return self.through_tree(self.model, ancestors, key_positions, start=self.start, end=self.end,
                                 cached=self.scratch.get_seq_length(), input_ids=tokens.to(device),
                                 position_ids=positions.to(device), cache=self.scratch).logits

    def root(self, states: list[DecodeState], depths: list[int]) -> Tensor:
        kv, self.start, self.end = self.rows.kv, self.rows.start, self.rows.end
        self.scratch = DynamicCache(config=self.model.truncated().config)
        for layer, (keys, values) in zip(self.scratch.layers, kv):
            if keys is None:  # a one-token prompt: nothing cached yet
                continue
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values  # views: the next update copies them, the target's stay
        roots = torch.cat([s.tokens[:, -1:] for s in states])  # (A, 1)
        positions = (self.end - self.start)[:, None]  # the root's position: its row's committed count
        logits = self._logits(roots, positions, torch.ones(len(states), 1, 1, dtype=torch.bool), positions)
        return logits[:, -1]

    def expand(self, level: Level) -> Tensor:
        A, F, N = level.ancestors.shape
        ancestors = torch.cat([torch.ones(A, F, 1, dtype=torch.bool), level.ancestors.cpu()], dim=2)  # the root
        root = (self.end - self.start)[:, None]
        keys = torch.cat([root, root + level.key_depths.cpu()], dim=1)  # the root, then every fed node
        return self._logits(level.tokens, (root + level.depth).expand_as(level.tokens), ancestors, keys)

    def commit(self, states: list[DecodeState], fed: dict[int, list[int]], verified: list[Verified]) -> None:
        self.scratch = None  # the target's cache gets the accepted tokens from the verification forward


class _EngineRows(RowTable):
    """Early exit's rows are the engine's: their order and ranges are read each step through the view."""

    def __init__(self, view: TargetView, layers: int) -> None:
        super().__init__()
        self.view, self.layers = view, layers

    def full(self, states: list[DecodeState], depths: list[int]) -> tuple[list[DecodeState], list[int], list[int]]:
        self.kv, self.start, self.end, self.order = self.view.prefix_cache(self.layers)
        return super().full(states, depths)


class EarlyExit(ModelDrafter):
    """Drafts chains or trees (``k``, ``top_k``, ``width``, ``budget``, ``tree`` as in
    :class:`~specdec.drafters.DraftModel`) with the target's first ``layers`` layers.

    Args:
        layers: exit after this many layers.
        adapter: trained :class:`ExitAdapter` (``None``: untrained, plain early exit).
        vocab: token ids the exit head scores (``None``: all).
        checkpoint: the loaded checkpoint, whose target fingerprint is enforced.
    """

    def __init__(self, layers: int = 6, adapter: ExitAdapter | None = None, vocab: Tensor | None = None,
                 checkpoint: dict | None = None, k: int = 4, top_k: int = 1, width: int | None = None,
                 budget: int | None = None, tree: TreeSpec | list[list[int]] | None = None) -> None:
        if layers < 1:
            raise ValueError(f"EarlyExit layers={layers} must be >= 1")
        super().__init__(k, top_k, width, budget, tree, checkpoint)
        self.layers, self.adapter, self.vocab = layers, adapter, vocab

    kind = "early_exit"
    default_checkpoint = "early_exit-smollm2-135m"

    @classmethod
    def from_loaded(cls, checkpoint: dict, **kwargs) -> EarlyExit:
        adapter = ExitAdapter(checkpoint["settings"]["hidden"])
        load_weights(adapter, checkpoint)
        return cls(checkpoint["settings"]["layers"], adapter, checkpoint["vocab"], checkpoint, **kwargs)

    @classmethod
    def checkpoint_settings(cls, target: PreTrainedModel, settings) -> dict:
        return {"hidden": target.config.hidden_size, "layers": settings.layers}

    def bind(self, target: torch.nn.Module) -> tuple[ExitAdapter, ReducedHead]:
        total = target.config.num_hidden_layers
        if not 1 <= self.layers < total:
            raise ValueError(f"early exit layers={self.layers} must be in [1, {total - 1}] for this target")
        adapter = module_for(self.adapter or ExitAdapter(target.config.hidden_size), target)
        return adapter, ReducedHead(target.get_output_embeddings(), self.vocab)

    def network(self, bound: tuple[ExitAdapter, ReducedHead], view: TargetView) -> ExitNet:
        adapter, head = bound
        if view.options.linear_backend != "torch":
            install_linears(adapter)
        return ExitNet(ExitModel(view.model, self.layers, adapter, head), view)
