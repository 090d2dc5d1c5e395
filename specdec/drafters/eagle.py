"""EAGLE: one decoder layer that drafts in the target's feature space (Li et al. 2024, "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty"; EAGLE-2's dynamic trees).

The head reads ``(f_j, e(x_{j+1}))``, the target's final hidden state at position j and the
embedding of the token that followed, and predicts ``f_{j+1}``; the target's own output head
(optionally reduced to its frequent tokens) turns a feature into next-token logits. Drafting runs
it auto-regressively on its own predicted features, growing a tree level by level for every row
at once (:func:`~specdec.drafters.growth.grow`: dynamic top-k, rerank to a budget, or a static shape). Each step the engine hands over the target's true features of the committed tokens; the
head's cache keeps only entries made from true features.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, DynamicCache, PretrainedConfig, PreTrainedModel

from specdec.attention import TreeMask, layer_overlays
from specdec.cache import RaggedCache
from specdec.drafters.base import DecodeState, Drafter, PerTarget, Proposer, TargetView, module_for
from specdec.drafters.draft_model import GrowingProposer, RowTable, chain_feed, prepare
from specdec.drafters.growth import Level, TreeShape
from specdec.drafters.vocab import ReducedHead
from specdec.training.checkpoint import check_target, load_checkpoint
from specdec.tree import TreeSpec


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


class EagleNet:
    """The head as the draft network: a ragged cache of entries made from the target's true features,
    caught up each step on the pairs ``(f_j, x_{j+1})`` it has not fed; tree nodes feed their parent's
    predicted feature and are dropped after the step."""

    needs_hidden = True

    def __init__(self, head: EagleHead, embed: nn.Module, lm: ReducedHead, view: TargetView) -> None:
        self.head, self.embed, self.lm, self.backend = head, embed, lm, view.options.attention_backend
        self.overlays = layer_overlays(head.body)
        self.rows = RowTable()
        self.cache: RaggedCache | None = None
        self.pending: dict[int, tuple[Tensor, Tensor]] = {}  # row -> (features (m, H), the tokens after them (m,))
        self.seen: dict[int, int] = {}  # row -> tokens of the row accounted for in pending/cache
        self.feats: Tensor | None = None  # (A, 1 + N, H): the root's and every node's predicted feature
        self.tree_start = 0

    def prefill(self, states: list[DecodeState]) -> None:
        self.rows.add(states)
        for s in states:  # elements (f_j, x_{j+1}) for the prompt: features of all but the root
            self.pending[s.row] = (s.hidden, s.tokens[0, 1:])
            self.seen[s.row] = s.tokens.shape[1]

    def _forward(self, feats: Tensor, tokens: Tensor, positions: Tensor, ancestors: Tensor,
                 key_positions: Tensor) -> Tensor:
        device = self.head.fc.weight.device
        mask = TreeMask(self.cache.start.to(device), self.cache.end.to(device), ancestors.to(device), self.backend,
                        key_positions.to(device), self.overlays)
        embeds = self.embed(tokens.to(device))
        return self.head(feats.to(device=device, dtype=self.head.fc.weight.dtype), embeds, positions.to(device),
                         self.cache.cache, tree=mask)  # (A, T, H)

    def root(self, states: list[DecodeState]) -> Tensor:
        if self.cache is None:
            self.cache = RaggedCache(self.head.body, len(states))
        pend = [self.pending[s.row] for s in states]
        counts = torch.tensor([len(toks) for _, toks in pend])
        valid, ancestors, offset = chain_feed(counts)
        A, M = valid.shape
        H = self.head.fc.weight.shape[0]
        device = self.head.fc.weight.device
        feats = torch.zeros(A, M, H, dtype=self.head.fc.weight.dtype, device=device)
        tokens = torch.zeros(A, M, dtype=torch.long)
        for a, (f, toks) in enumerate(pend):
            feats[a, valid[a].to(device)] = f.to(device=device, dtype=feats.dtype)
            tokens[a, valid[a]] = toks.cpu()
        root = self.embed(torch.cat([s.tokens[:, -1] for s in states]).to(device)).to(feats.dtype)  # (A, H)
        if M:
            S = self.cache.length
            positions = self.cache.lengths[:, None] + offset
            out = self._forward(feats, tokens, positions, ancestors, positions)  # (A, M, H)
            self.cache.commit([S + valid[a].nonzero().flatten() for a in range(A)])
            fed = (counts > 0).to(device)[:, None]
            root = torch.where(fed, out[:, -1], root)  # a one-token prompt: its embedding stands in
        for s in states:
            f, toks = self.pending[s.row]
            self.pending[s.row] = (f[:0], toks[:0])
        self.tree_start = self.cache.length
        self.feats = root[:, None]
        return self.lm(root)  # (A, V)

    def expand(self, level: Level) -> Tensor:
        device = self.feats.device
        parent_feats = self.feats.gather(1, (level.parents + 1).to(device)[:, :, None].expand(-1, -1, self.feats.shape[2]))
        root = (self.cache.lengths - 1)[:, None]
        out = self._forward(parent_feats, level.tokens, (root + level.depth).expand_as(level.tokens), level.ancestors,
                            root + level.key_depths)
        index = (level.nodes + 1).to(device)  # (A, F) slots in feats
        width = max(self.feats.shape[1], int(index.max()) + 1)
        if width > self.feats.shape[1]:
            grown = self.feats.new_zeros(self.feats.shape[0], width, self.feats.shape[2])
            grown[:, : self.feats.shape[1]] = self.feats
            self.feats = grown
        self.feats.scatter_(1, index[:, :, None].expand(-1, -1, out.shape[2]), out)
        return self.lm(out)  # (A, F, V)

    def commit(self, states: list[DecodeState], fed: dict[int, list[int]]) -> None:
        if self.cache is not None:
            self.cache.truncate(self.tree_start)  # the tree's entries came from predicted features
        for state in states:
            if state.row not in self.seen:
                continue
            appended = state.tokens.shape[1] - self.seen[state.row]
            m = min(len(state.hidden), appended)  # features of root + accepted nodes, each followed by a token
            feats, toks = self.pending[state.row]  # not fed yet when this row did not draft (Combined's fallback)
            seen = self.seen[state.row]
            self.pending[state.row] = (torch.cat([feats, state.hidden[:m]]),
                                       torch.cat([toks, state.tokens[0, seen : seen + m]]))
            self.seen[state.row] = state.tokens.shape[1]
        self.feats = None
        keep = self.rows.drop_finished(states)
        if keep is not None:
            for s in states:
                if s.finished:
                    self.pending.pop(s.row, None)
                    self.seen.pop(s.row, None)
            if self.cache is not None:
                if len(keep):
                    self.cache.select(keep)
                else:
                    self.cache = None


class Eagle(Drafter):
    """An EAGLE head proposing chains or trees (``k``, ``top_k``, ``width``, ``budget``, ``tree`` as in
    :class:`~specdec.drafters.DraftModel`).

    Args:
        head: the trained :class:`EagleHead`.
        vocab: token ids its output head scores (``None``: all); see :mod:`specdec.drafters.vocab`.
        checkpoint: the loaded checkpoint, whose target fingerprint is enforced (``None``: an
            untrained head, any target).
    """

    def __init__(self, head: EagleHead, vocab: Tensor | None = None, checkpoint: dict | None = None, k: int = 4,
                 top_k: int = 1, width: int | None = None, budget: int | None = None,
                 tree: TreeSpec | list[list[int]] | None = None) -> None:
        if not isinstance(head, EagleHead):
            raise ValueError(f"Eagle needs an EagleHead, got {type(head).__name__}: use Eagle.from_checkpoint(...)")
        self.head, self.vocab, self.checkpoint = head.eval(), vocab, checkpoint
        self.shape = TreeShape.make(k, top_k, width, budget, tree)
        self._bound = PerTarget()

    @property
    def k(self) -> int:
        return self.shape.k

    @classmethod
    def from_checkpoint(cls, checkpoint: str = "eagle-smollm2-135m", **kwargs) -> Eagle:
        """A shipped checkpoint by name, or a ``.pt`` path written by ``experiments.train_drafter``."""
        ckpt = load_checkpoint(checkpoint, "eagle")
        config = dict(ckpt["settings"]["target_config"])
        head = EagleHead(AutoConfig.for_model(config.pop("model_type"), **config))
        head.load_state_dict(ckpt["state_dict"])
        return cls(head, ckpt["vocab"], ckpt, **kwargs)

    def _bind(self, target: torch.nn.Module) -> tuple[EagleHead, ReducedHead]:
        if self.checkpoint is not None:
            check_target(self.checkpoint, target)
        return module_for(self.head, target), ReducedHead(target.get_output_embeddings(), self.vocab)

    def check(self, target: torch.nn.Module) -> None:
        self._bound.get(target, lambda: self._bind(target))

    def proposer(self, view: TargetView) -> Proposer:
        head, lm = self._bound.get(view.model, lambda: self._bind(view.model))
        prepare(head.body, view)
        prepare(head, view)
        return GrowingProposer(EagleNet(head, view.model.get_input_embeddings(), lm, view), self.shape)
