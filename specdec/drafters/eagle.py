"""EAGLE: one decoder layer that drafts in the target's feature space (Li et al. 2024, "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty"; EAGLE-2's dynamic trees).

The head reads ``(f_j, e(x_{j+1}))``, the target's final hidden state at position j and the
embedding of the token that followed, and predicts ``f_{j+1}``; the target's own output head
(optionally reduced to its frequent tokens) turns a feature into next-token logits. Drafting runs
it auto-regressively on its own predicted features, growing a tree level by level with the
:class:`~specdec.drafters.DraftModel` machinery (dynamic top-k, rerank to a budget, or a static
shape). Each step the engine hands over the target's true features of the committed tokens; the
head's cache keeps only entries made from true features.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, DynamicCache, PretrainedConfig, PreTrainedModel

from specdec.attention import TreeMask
from specdec.cache import new_cache, truncate
from specdec.training.checkpoint import load_checkpoint
from specdec.drafters.base import BuiltOnTarget, DecodeState
from specdec.drafters.draft_model import DraftModel, _Row
from specdec.drafters.vocab import ReducedHead
from specdec.verify import Acceptance


def head_config(target_config: PretrainedConfig, layers: int = 1) -> PretrainedConfig:
    """The target's decoder architecture with ``layers`` layers and no vocabulary (inputs are embeddings)."""
    config = copy.deepcopy(target_config)
    config.num_hidden_layers, config.vocab_size, config.pad_token_id = layers, 1, None
    config.tie_word_embeddings = False
    return config


class EagleHead(nn.Module):
    """``fc([f_j ; e(x_{j+1})]) -> decoder layer -> norm``: the predicted feature ``f_{j+1}``."""

    def __init__(self, target_config: PretrainedConfig) -> None:
        super().__init__()
        hidden = target_config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.body = AutoModel.from_config(head_config(target_config))
        self.body.get_input_embeddings().requires_grad_(False)  # inputs come in as embeddings: unused

    @classmethod
    def from_target(cls, target: PreTrainedModel) -> EagleHead:
        """A head started from the target: its last layer and final norm, ``fc`` passing the feature through."""
        head = cls(target.config).to(target.dtype)
        hidden = target.config.hidden_size
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.weight[:, :hidden] = torch.eye(hidden)
            head.body.layers[0].load_state_dict(target.model.layers[-1].state_dict())
            head.body.norm.load_state_dict(target.model.norm.state_dict())
        return head

    def forward(self, features: Tensor, embeds: Tensor, position_ids: Tensor, cache: DynamicCache | None = None,
                **kwargs) -> Tensor:
        """``features, embeds: (B, T, H)`` -> ``(B, T, H)`` predicted next features."""
        x = self.fc(torch.cat([features, embeds.to(features.dtype)], dim=-1))
        return self.body(inputs_embeds=x, position_ids=position_ids, cache=cache, use_cache=cache is not None,
                         **kwargs).last_hidden_state


@dataclass
class _EagleRow(_Row):
    """A row's head cache (entries made from true features only) and what it has not fed yet."""

    pending: tuple[Tensor, Tensor] | None = None  # (features (m, H), the tokens that followed them (m,))
    seen: int = 0  # tokens of the row accounted for
    feats: dict | None = None  # node (-1 = root) -> its predicted feature, while proposing


class Eagle(BuiltOnTarget, DraftModel):
    """An EAGLE head proposing chains or trees (``k``, ``top_k``, ``width``, ``budget``, ``tree`` as in
    :class:`DraftModel`).

    Args:
        head: the trained :class:`EagleHead`.
        vocab: token ids its output head scores (``None``: all); see :mod:`specdec.drafters.vocab`.
        checkpoint: the loaded checkpoint, whose target fingerprint :meth:`check` enforces (``None``:
            an untrained head, any target).
    """

    needs_hidden = True

    def __init__(self, head: EagleHead, vocab: Tensor | None = None, checkpoint: dict | None = None,
                 **kwargs) -> None:
        super().__init__(head.body, **kwargs)
        self.head, self.vocab, self.checkpoint = head.eval(), vocab, checkpoint
        self.embed: nn.Module | None = None
        self.lm: ReducedHead | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str = "eagle-smollm2-135m", **kwargs) -> Eagle:
        """A shipped checkpoint by name, or a ``.pt`` path written by ``experiments.train_drafter``."""
        ckpt = load_checkpoint(checkpoint, "eagle")
        config = dict(ckpt["settings"]["target_config"])
        head = EagleHead(AutoConfig.for_model(config.pop("model_type"), **config))
        head.load_state_dict(ckpt["state_dict"])
        return cls(head, ckpt["vocab"], ckpt, **kwargs)

    def networks(self) -> list[nn.Module]:
        return [self.head]

    def bind(self, target: torch.nn.Module) -> None:
        self.head.to(device=target.device, dtype=target.dtype)
        self.embed = target.get_input_embeddings()
        self.lm = ReducedHead(target.get_output_embeddings(), self.vocab)

    def prefill(self, states: list[DecodeState]) -> None:
        self.rows = {}
        for s in states:  # elements (f_j, x_{j+1}) for the prompt: features of all but the root
            self.rows[s.row] = _EagleRow(new_cache(self.head.body), pending=(s.hidden, s.tokens[0, 1:]),
                                         seen=s.tokens.shape[1])

    def _catch_up(self, state: DecodeState, row: _EagleRow) -> Tensor:
        feats, toks = row.pending
        device = self.head.fc.weight.device
        if len(toks):
            pos = torch.arange(row.cached, row.cached + len(toks), device=device)[None]
            out = self.head(feats[None].to(device), self.embed(toks[None].to(device)), pos, row.cache)
            row.cached += len(toks)
            root = out[0, -1:]  # (1, H): the root's predicted feature
        else:  # a one-token prompt: no feature yet; the root's own embedding stands in
            root = self.embed(state.tokens[:, -1].to(device)).to(self.head.fc.weight.dtype)
        row.pending = (feats[:0], toks[:0])
        row.feats = {-1: root[0]}
        return self.lm(root)

    def _forward_nodes(self, row: _EagleRow, frontier: list[int], tokens: list[int], parents: list[int], pos: Tensor,
                       mask: TreeMask) -> Tensor:
        feats = torch.stack([row.feats[parents[node]] for node in frontier])[None]  # (1, |F|, H)
        ids = torch.tensor([[tokens[i] for i in frontier]], device=pos.device)
        out = self.head(feats, self.embed(ids), pos, row.cache, tree=mask)[0]  # (|F|, H)
        for node, feat in zip(frontier, out):
            row.feats[node] = feat
        return self.lm(out)

    def commit(self, states: list[DecodeState], results: list[Acceptance]) -> None:
        for state in states:
            row = self.rows[state.row]
            truncate(row.cache, row.cached)  # drop the tree: its entries came from predicted features
            appended = state.tokens.shape[1] - row.seen
            m = min(len(state.hidden), appended)  # features of root + accepted nodes, each followed by a token
            feats, toks = row.pending  # not yet fed when this row did not propose (Combined's fallback)
            row.pending = (torch.cat([feats, state.hidden[:m]]),
                           torch.cat([toks, state.tokens[0, row.seen : row.seen + m]]))
            row.seen = state.tokens.shape[1]
            row.fed, row.feats = {}, None
