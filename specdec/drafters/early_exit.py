"""Early-exit self-speculation (LayerSkip, Elhoushi et al. 2024; Draft & Verify, Zhang et al. 2024):
the target drafts for itself with its first L layers, its final norm and its output head.

No second model and no second KV cache: the draft attends over the target's own cached keys and
values of those L layers (read in place, row by row, from the engine's cache), and its tree's
entries are thrown away after proposing; the verification forward then writes every layer. A
trained adapter (a zero-initialised residual linear map after the norm, so an untrained one is
plain early exit) and an optional reduced vocabulary make the exit cheaper and closer to the
target's final layer.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from specdec.training.checkpoint import load_checkpoint
from specdec.drafters.base import BuiltOnTarget, DecodeState
from specdec.drafters.draft_model import DraftModel, _Row
from specdec.drafters.vocab import ReducedHead
from specdec.verify import Acceptance


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


class EarlyExit(BuiltOnTarget, DraftModel):
    """Drafts chains or trees (``k``, ``top_k``, ``width``, ``budget``, ``tree`` as in :class:`DraftModel`)
    with the target's first ``layers`` layers.

    Args:
        layers: exit after this many layers.
        adapter: trained :class:`ExitAdapter` (``None``: untrained, plain early exit).
        vocab: token ids the exit head scores (``None``: all).
        checkpoint: the loaded checkpoint, whose target :meth:`check` enforces.
    """

    def __init__(self, layers: int = 6, adapter: ExitAdapter | None = None, vocab: Tensor | None = None,
                 checkpoint: dict | None = None, **kwargs) -> None:
        super().__init__(None, **kwargs)
        if layers < 1:
            raise ValueError(f"EarlyExit layers={layers} must be >= 1")
        self.layers, self.adapter, self.vocab, self.checkpoint = layers, adapter, vocab, checkpoint
        self.decoder = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str = "early_exit-smollm2-135m", **kwargs) -> EarlyExit:
        """A shipped checkpoint by name, or a ``.pt`` path written by ``experiments.train_drafter``."""
        ckpt = load_checkpoint(checkpoint, "early_exit")
        adapter = ExitAdapter(ckpt["settings"]["hidden"])
        adapter.load_state_dict(ckpt["state_dict"])
        return cls(ckpt["settings"]["layers"], adapter, ckpt["vocab"], ckpt, **kwargs)

    def bind(self, target: torch.nn.Module) -> None:
        adapter = self.adapter or ExitAdapter(target.config.hidden_size)
        adapter.to(device=target.device, dtype=target.dtype)
        self.model = ExitModel(target, self.layers, adapter, ReducedHead(target.get_output_embeddings(), self.vocab))

    def attach(self, decoder) -> None:
        self.decoder = decoder

    def prefill(self, states: list[DecodeState]) -> None:
        self.rows = {}

    @torch.inference_mode()
    def propose(self, states: list[DecodeState]):
        if self.decoder is None:
            raise RuntimeError("EarlyExit drafts from the target's cache: run it through specdec.generate")
        trees = []
        for a, state in enumerate(states):  # states come in the engine's cache order
            self.rows[state.row] = self._borrow(a)
            trees.append(self._propose_row(state, self.rows[state.row]))
        return trees

    def _borrow(self, a: int) -> _Row:
        """Row ``a``'s first ``layers`` layers of the target's cache, as the start of a scratch cache."""
        d = self.decoder
        start, end = int(d.start[a]), int(d.end[a])
        cache = DynamicCache(config=self.model.truncated().config)
        for i, layer in enumerate(d.cache.layers[: self.layers]):
            if layer.is_initialized and end > start:
                cache.update(layer.keys[a : a + 1, :, start:end], layer.values[a : a + 1, :, start:end], i)
        return _Row(cache, cached=end - start)

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        self.rows = {}  # the scratch caches go; the target's cache already holds the accepted tokens
