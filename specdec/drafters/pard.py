"""PARD: a parallel block drafter (An et al. 2025, "PARD: Accelerating LLM Inference with Low-Cost
PARallel Draft Model Adaptation").

The draft is the distilled draft model (:func:`~specdec.drafters.distilled.build_draft`: a few
decoder layers of the target's architecture, the target's embedding and its reduced output head)
plus one learned *mask* embedding. Each step it runs ONE forward over the committed tokens it has not
seen (the root last) followed by ``k - 1`` mask tokens, positions continuing: the output at the
root predicts the token 1 ahead, the output at mask ``j`` the token ``j + 1`` ahead. Drafting is a
chain of ``k`` (or any tree shape over those per-depth distributions: a static
:class:`~specdec.tree.TreeSpec` of the top-2 at each depth, or top-k growth; every depth's candidates
come from the one forward). The draft keeps its own ragged cache of committed tokens; the mask
positions' keys and values are dropped after each step.

q: a node at depth ``d`` is drawn from (greedy: ranked by) the block's distribution at depth ``d``,
which conditions on the committed prefix, not on the drafted tokens above it; any q from which the
drafts were actually drawn keeps recursive rejection lossless, so the target's law is unchanged.

Training (:mod:`specdec.training.train`, kind ``pard``): the training sequences get random blocks of
mask tokens after chosen anchors (:func:`mask_blocks`; PARD's conditional drop-token keeps the depth-j
mask of an anchor with probability ``retain ** j``, and only with its shallower masks), each block
seeing its anchor's true prefix and its own earlier masks; cross-entropy at every position against
the target's greedy labels (a mask ``j`` after anchor ``t``: the label ``j`` ahead of ``t``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from specdec.drafters.base import DecodeState, Proposer, TargetView, Verified
from specdec.drafters.ddtree import BlockProposer, DDTree, as_ddtree
from specdec.drafters.distilled import BORROWED, build_draft
from specdec.drafters.eagle import DraftLMHead, direct_layers, quantized, run_layers
from specdec.drafters.growth import Level
from specdec.drafters.network import DraftNetwork, GrowingProposer, ModelDrafter, check_vocab, prepare
from specdec.tree import TreeSpec


class PardDraft(nn.Module):
    """A distilled draft LM and the mask embedding it reads at the block's positions.

    Args:
        lm: a causal LM from :func:`~specdec.drafters.distilled.build_draft` (its embedding and output
            head are the target's, borrowed and frozen).
        mask: ``(H,)`` the mask embedding (default: the mean token embedding).
    """

    def __init__(self, lm: PreTrainedModel, mask: Tensor | None = None) -> None:
        super().__init__()
        if not direct_layers(lm.model):
            raise ValueError(f"PARD calls the draft's decoder layers directly with rotary position embeddings; "
                             f"{type(lm.model).__name__} has none: use drafter=draft_model for this target")
        self.lm = lm
        table = lm.get_input_embeddings().weight.detach()
        self.mask = nn.Parameter((table.float().mean(0) if mask is None else mask.detach().float()).to(table.dtype))

    @classmethod
    def from_target(cls, target: PreTrainedModel, init_layers: list[int], vocab: Tensor | None = None) -> PardDraft:
        """An untrained PARD draft: target layers ``init_layers``, its embedding and (reduced) head."""
        return cls(build_draft(target, list(init_layers), vocab))

    @property
    def body(self) -> nn.Module:
        return self.lm.model

    def embed(self, ids: Tensor, is_mask: Tensor) -> Tensor:
        """``ids, is_mask: (B, T)`` -> ``(B, T, H)`` token embeddings, the mask embedding where ``is_mask``."""
        x = self.body.embed_tokens(ids)
        return torch.where(is_mask[..., None], self.mask.to(x.dtype), x)

    def hidden(self, x: Tensor, position_ids: Tensor, cache=None, attention_mask: Tensor | None = None,
               **kwargs) -> Tensor:
        """``x (B, T, H)`` -> ``(B, T, H)`` the normed final states the output head reads."""
        return self.body.norm(run_layers(self.body, x, position_ids, cache, attention_mask, **kwargs))

    def own_weights(self) -> dict[str, Tensor]:
        """What a checkpoint keeps: the layers, the norm and the mask (not the borrowed embedding and head)."""
        borrowed = tuple("lm." + prefix for prefix in BORROWED)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(borrowed)}

    def bound_copy(self, int8: bool) -> PardDraft:
        """A copy for drafting that shares the borrowed embedding and head, its linear maps in int8 if ``int8``."""
        memo = {id(self.body.embed_tokens): self.body.embed_tokens, id(self.lm.lm_head): self.lm.lm_head}
        draft = copy.deepcopy(self, memo)
        if int8:
            draft.lm.model.layers = quantized(draft.lm.model.layers)
        return draft


def mask_blocks(tokens: Tensor, labels: Tensor, positions: Tensor, valid: Tensor, answer: Tensor, block: int,
                retain: float, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """PARD's training input: each row's tokens, then mask blocks after random anchors.

    An anchor ``t`` (a position at or after ``answer[b]``, the last prompt token, with a token after it)
    gets masks of depth ``j = 1 .. block - 1`` while ``u_t < retain ** j`` (one uniform ``u_t`` per
    anchor: a block always keeps its shallower masks, the conditional drop-token) and ``t + j`` is in
    the row. Mask ``(t, j)`` sits at position ``positions[t] + j``, sees the true tokens up to ``t``
    and the masks ``(t, 1 .. j)``, and is labelled ``labels[t + j]``; tokens see their causal prefix.

    Args:
        tokens, labels, positions: ``(B, T)``; valid: ``(B, T)`` bool (right padding);
        answer: ``(B,)`` first anchor allowed per row.

    Returns:
        ``ids, is_mask, positions, labels, depth (B, L)`` (depth 0 for tokens, j for masks; padding
        labelled -100) and ``visible (B, 1, L, L)`` bool.
    """
    B, T = tokens.shape
    rows = []
    for b in range(B):
        n = int(valid[b].sum())
        first = max(0, int(answer[b]))
        anchors = torch.arange(first, max(first, n - 1))  # (C,): each has a token after it (none in a prompt chunk)
        u = torch.rand(len(anchors), generator=generator)
        depth = torch.arange(1, block)
        keep = (u[:, None] < retain ** depth[None, :].double()) & (anchors[:, None] + depth[None, :] < n)
        t, j = keep.nonzero(as_tuple=True)  # sorted by anchor, then depth
        rows.append((n, anchors[t], depth[j]))
    L = T + max(len(t) for _, t, _ in rows)
    ids = torch.zeros(B, L, dtype=torch.long)
    is_mask = torch.zeros(B, L, dtype=torch.bool)
    pos = torch.zeros(B, L, dtype=torch.long)
    lab = torch.full((B, L), -100, dtype=torch.long)
    dep = torch.zeros(B, L, dtype=torch.long)
    anchor = torch.arange(L).repeat(B, 1)  # (B, L): a token's own index, a mask's anchor
    real = torch.zeros(B, L, dtype=torch.bool)
    for b, (n, t, j) in enumerate(rows):
        ids[b, :T], pos[b, :T], lab[b, :T], real[b, :T] = tokens[b], positions[b], labels[b], valid[b]
        m = slice(T, T + len(t))
        is_mask[b, m], pos[b, m], lab[b, m], dep[b, m], anchor[b, m] = True, positions[b, t] + j, labels[b, t + j], j, t
    lab[:, :T] = torch.where(valid, lab[:, :T], -100)
    q_anchor, k_anchor = anchor[:, :, None], anchor[:, None, :]
    sees_token = real[:, None, :] & (k_anchor <= q_anchor) & (real | is_mask)[:, :, None]
    sees_mask = (is_mask[:, :, None] & is_mask[:, None, :] & (k_anchor == q_anchor)
                 & (dep[:, None, :] <= dep[:, :, None]))
    visible = sees_token | sees_mask | torch.eye(L, dtype=torch.bool)[None]  # padding sees itself
    return {"ids": ids, "is_mask": is_mask, "positions": pos, "labels": lab, "depth": dep, "visible": visible[:, None]}


class PardNet(DraftNetwork):
    """The PARD draft as the network tree growth drives: ``root`` runs the step's one forward (catch-up
    tokens and masks, every row at once) and keeps the block's logits; ``expand`` reads the logits of
    the next depth from them (no forward)."""

    def __init__(self, draft: PardDraft, lm: nn.Module, view: TargetView, masks: int) -> None:
        super().__init__(view, served=draft.body, cached=draft.body)
        self.draft, self.lm, self.masks = draft, lm, masks
        self.block: Tensor | None = None  # (A, masks, V) logits of depths 2 .. masks + 1

    def root(self, states: list[DecodeState], depths: list[int]) -> Tensor:
        masks = max(0, min(self.masks, max(depths) - 1))
        feed, ids = self.catch_up_tokens(states, extra=masks)  # left-padded: catch-up tokens, then the masks
        A, M = ids.shape
        is_mask = torch.zeros(A, M, dtype=torch.bool)
        is_mask[:, M - masks :] = True
        positions = feed.positions.to(self.device)
        x = self.draft.embed(ids.to(self.device), is_mask.to(self.device))
        hidden = self.through_tree(self.draft.hidden, feed.ancestors, positions, x, positions,
                                   self.cache.cache)  # (A, M, H)
        logits = self.lm(hidden[:, M - masks - 1 :])  # (A, 1 + masks, V): the root's, then each mask's
        self.keep_fed(feed)  # the masks' K/V dropped
        self.block = logits[:, 1:]
        return logits[:, 0]

    def marginals(self, states: list[DecodeState], depths: list[int]) -> Tensor:
        """``(A, 1 + masks, V)`` logits of depths 1, 2, ...: every position of the block, from the step's one
        forward (what :class:`~specdec.drafters.ddtree.BlockProposer` builds DDTree trees from)."""
        root = self.root(states, depths)
        return torch.cat([root[:, None], self.block], dim=1)

    def expand(self, level: Level) -> Tensor:
        F = level.tokens.shape[1]
        return self.block[:, level.depth - 1, None, :].expand(-1, F, -1)  # (A, F, V): depth d+1 for all of them

    def commit(self, states: list[DecodeState], fed: dict[int, list[int]], verified: list[Verified]) -> None:
        self.block = None
        super().commit(states, fed, verified)


class Pard(ModelDrafter):
    """A PARD draft proposing ``k`` tokens per draft forward, as a chain or any tree over the block's
    per-depth distributions (``top_k``, ``width``, ``budget``, ``tree`` as in
    :class:`~specdec.drafters.DraftModel`), or ``tree="ddtree"``: the ``budget`` (default 16) likeliest
    prefixes under the block's marginals, best-first (:mod:`specdec.drafters.ddtree`).

    Args:
        draft: a :class:`PardDraft` (drafts for any target of its vocabulary), or ``None`` with
            ``checkpoint``: built once per target from the checkpoint's weights (its fingerprint enforced).
        checkpoint: a loaded ``pard`` checkpoint (see :meth:`from_checkpoint`).
        k: tokens per step (1 root prediction + ``k - 1`` masks); a checkpoint caps it at its trained block.
        quantize: on CPU, draft with int8 copies of the draft's linear maps and output head (the configs
            turn it on; only the draft's rounding changes).
    """

    def __init__(self, draft: PardDraft | None = None, checkpoint: dict | None = None, k: int = 4, top_k: int = 1,
                 width: int | None = None, budget: int | None = None,
                 tree: TreeSpec | list[list[int]] | str | DDTree | None = None, quantize: bool = False) -> None:
        if (draft is None) == (checkpoint is None):
            raise ValueError("Pard needs exactly one of draft=PardDraft(...) or checkpoint=...: use "
                             "Pard.from_checkpoint('pard-smollm2-135m') for a trained one")
        if draft is not None and not isinstance(draft, PardDraft):
            raise ValueError(f"Pard needs a PardDraft, got {type(draft).__name__}: use PardDraft.from_target(...) "
                             "or Pard.from_checkpoint(...)")
        self.ddtree = as_ddtree(tree, budget)
        if self.ddtree is not None:  # the shape is then only the block's depth k
            tree, budget = None, None
        super().__init__(k, top_k, width, budget, tree, checkpoint)
        trained = None if checkpoint is None else checkpoint["settings"].get("block")
        if trained is not None and self.masks + 1 > trained:
            raise ValueError(f"PARD checkpoint {checkpoint['path']!r} was trained for blocks of {trained} tokens: "
                             f"k={k} (or the tree's depth) must be <= {trained}")
        self.draft = None if draft is None else draft.eval()
        self.quantize = quantize

    kind = "pard"
    default_checkpoint = "pard-smollm2-135m"

    @property
    def masks(self) -> int:
        """Mask tokens per forward: the draft's depth less the root's own prediction."""
        depth = self.shape.k if self.shape.spec is None else min(self.shape.k, self.shape.spec.depth)
        return depth - 1

    @classmethod
    def from_loaded(cls, checkpoint: dict, **kwargs) -> Pard:
        return cls(checkpoint=checkpoint, **kwargs)

    @classmethod
    def checkpoint_settings(cls, target: PreTrainedModel, settings) -> dict:
        return {"init_layers": list(settings.init_layers), "block": settings.block}

    @classmethod
    def trained_weights(cls, module: nn.Module) -> dict[str, Tensor]:
        return module.own_weights()

    def bind(self, target: PreTrainedModel) -> tuple[PardDraft, nn.Module]:
        if self.draft is not None:
            check_vocab(self.draft.lm, target)
            draft = self.draft
        else:
            draft = PardDraft.from_target(target, self.checkpoint["settings"]["init_layers"], self.checkpoint["vocab"])
            state = {k: v.to(target.dtype) for k, v in self.checkpoint["state_dict"].items()}
            missing, unexpected = draft.load_state_dict(state, strict=False)
            borrowed = tuple("lm." + prefix for prefix in BORROWED)
            missing = [k for k in missing if not k.startswith(borrowed)]
            if missing or unexpected:
                raise ValueError(f"checkpoint {self.checkpoint['path']!r} does not fit its PARD draft: missing "
                                 f"{missing}, unexpected {unexpected}; retrain it with experiments.train_drafter")
        if next(draft.parameters()).device != target.device or draft.mask.dtype != target.dtype:
            draft = copy.deepcopy(draft).to(device=target.device, dtype=target.dtype)
        bound = draft.bound_copy(self.quantize)
        return bound, DraftLMHead(bound.lm.lm_head, self.quantize)

    def network(self, bound: tuple[PardDraft, nn.Module], view: TargetView) -> PardNet:
        draft, lm = bound
        prepare(draft.body, view)
        return PardNet(draft, lm, view, self.masks)

    def proposer(self, view: TargetView) -> Proposer:
        net = self.network(self.bound(view.model), view)
        if self.ddtree is not None:
            return BlockProposer(net, self.ddtree, view)
        return GrowingProposer(net, self.shape)
