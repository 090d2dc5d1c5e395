"""Training drafters on the self-distillation set (:mod:`specdec.training.distill`); the target stays frozen.

One objective per drafter kind, all scored against the target's own greedy labels:

- ``eagle`` with ``fused_layers`` (EAGLE-3, Li et al. 2025): cross-entropy of the next token through
  the target's (reduced) head, the head reading the fused low/middle/high target features, and the
  training-time test: ``unroll`` steps, step s reading the head's own output states of step s - 1
  (attention :func:`~specdec.drafters.eagle.ttt_mask`: each position sees the true prefix and its
  own earlier steps), losses weighted ``step_weight ** s``;
- ``eagle`` with ``fused_layers=None`` (EAGLE-1): feature regression (smooth L1 to the target's next
  hidden state) plus cross-entropy of the target's head on the predicted feature, the head also fed
  its own predicted features for ``unroll`` steps;
- ``medusa``: cross-entropy of head d against the label d + 1 positions on (Medusa-1);
- ``early_exit``: cross-entropy of the exit (layer-L state -> norm -> adapter -> head);
- ``draft_model``: cross-entropy of the small draft on token sequences (distillation on the
  target's greedy outputs);
- ``pard`` (An et al. 2025): the distilled draft plus a mask embedding, trained on the sequences
  with random mask blocks (:func:`~specdec.drafters.pard.mask_blocks`: conditional drop-token with
  ``retain``), cross-entropy at every position, a mask j after anchor t against the label j ahead;
- ``block`` (DFlash / DSpark family): the block head over the fused target features, ``anchors`` random
  blocks per chunk after their true prefix (:func:`~specdec.drafters.block.anchor_blocks`), all in one
  forward, mask i against the label i ahead, weighted by :func:`~specdec.drafters.block.chain_weights`.

The output head is the target's, reduced to the ``vocab`` most frequent target tokens, so labels
off that subset are ignored. accelerate places the module and shards the batches over processes
(``accelerate launch -m experiments.train_drafter``). ``log(metrics, step)`` receives the loss and
the per-depth top-1 accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specdec.training.checkpoint import check_target, load_checkpoint
from specdec.training.distill import DistillSet
from specdec.drafters.block import BlockDrafter, BlockHead, anchor_blocks, chain_weights, features_before
from specdec.drafters.distilled import BORROWED, Distilled, build_draft
from specdec.drafters.eagle import (Eagle, EagleHead, ReferenceEagle3Head, check_fused_layers, default_fused_layers,
                                    ttt_mask)
from specdec.drafters.early_exit import EarlyExit, ExitAdapter
from specdec.drafters.medusa import Medusa, MedusaHeads
from specdec.drafters.network import ModelDrafter
from specdec.drafters.pard import Pard, PardDraft, mask_blocks
from specdec.drafters.prompt_lookup import lookup_hits
from specdec.drafters.vocab import ReducedHead, frequent_tokens

DRAFTERS: dict[str, type[ModelDrafter]] = {cls.kind: cls for cls in (Eagle, Medusa, EarlyExit, Distilled, Pard,
                                                                       BlockDrafter)}
KINDS = tuple(DRAFTERS)  # ("eagle", "medusa", "early_exit", "draft_model", "pard", "block")
LOOKUP_NGRAM = (3, 2)  # the n-grams of the shipped lookup-else-* drafters: where lookup misses (``evaluate``)


@dataclass
class TrainSettings:
    """Optimisation and model-shape settings (each drafter's config sets its own)."""

    epochs: float = 4.0
    steps: int = 0  # optimiser steps (0: from epochs); equal steps give ablations the same compute
    lr: float = 1e-3
    batch_size: int = 8  # chunks per step
    seq_len: int = 256  # tokens per chunk
    vocab: int = 8192  # reduced vocabulary size (0: the full vocabulary)
    holdout: int = 24  # sequences kept for validation
    eval_every: int = 50
    seed: int = 0
    unroll: int = 2  # eagle: steps on its own predicted states (training-time test)
    fused_layers: tuple[int, ...] | None = None  # eagle: EAGLE-3's target layers (() = 2, L/2, L-3); None: EAGLE-1
    # (block: always fused, None or () = 2, L/2, L-3)
    step_weight: float = 0.8  # eagle-3: loss weight of unroll step s is step_weight ** s
    noise: float = 0.1  # eagle-1: uniform noise on input features
    ce_weight: float = 0.1  # eagle-1: cross-entropy weight beside the feature loss
    heads: int = 4  # medusa
    layers: int = 6  # early_exit: exit after this many layers
    init_layers: tuple[int, ...] = (0, 29)  # draft_model, pard: target layers the draft starts from
    block: int = 4  # pard: tokens per draft forward (the root's prediction and block - 1 masks); block: masks (k)
    anchors: int = 32  # block: random blocks per chunk, each after its anchor's true prefix
    block_layers: int = 1  # block: decoder layers of the head
    loss_decay: float = 0.8  # block: weight of depth d is loss_decay ** (d - 1) (DFlash's position decay)
    confidence: float = 0.5  # block: share of the weight scaled by how likely the draft's chain reaches depth d
    retain: float = 0.5  # pard: a mask of depth j after an anchor is trained with probability retain ** j
    layout: str = "specdec"  # eagle-3: "specdec" (EagleHead) or "reference" (ReferenceEagle3Head: the layout
    # vLLM's speculators format, vLLM and SGLang load, so `python -m specdec.export` writes it exactly)
    init_from: str = ""  # pard: start from this draft_model checkpoint (its init_layers), "" from the target;
    # eagle: from this eagle checkpoint (further epochs; its fused_layers must match); block: likewise (resume)
    eval_depths: int = 5  # depths of the per-depth accuracy
    answer_only: bool = False  # train on the labels of the target's answers only (the prompt is context),
    # where drafting happens (EAGLE's loss mask on the assistant's turn)
    lookup_weight: float = 1.0  # block: loss weight of the labels prompt lookup already drafts (a lookup-else-block
    # drafter drafts those with lookup; 1: all labels alike)
    loop_ngram: int = 0  # cut each training answer where it first repeats one of its own n-grams of this length
    # (the target's loops, DistillSet.loops_cut; 0: keep them); validation keeps the set as it is
    skip_families: tuple[str, ...] = ()  # prompt families left out of training (ablations; validation keeps them)
    bf16: bool = False  # products in bfloat16 (torch.autocast), weights and optimiser in float32: 4x faster
    # matrix products on CPUs with AVX512-BF16, and the draft's rounding never reaches the target's output


@dataclass
class Chunk:
    """Up to ``seq_len`` consecutive positions of one sequence."""

    tokens: Tensor  # (T,)
    features: Tensor  # (T, H) final hidden states
    exit_features: Tensor | None  # (T, H) after ``layers`` layers (early exit)
    labels: Tensor  # (T,) target's greedy next tokens
    start: int  # position of the first token
    fused: list[Tensor] | None = None  # EAGLE-3: per fused layer (T, H), concatenated when batched
    answer: int = 0  # first index of the chunk at or after the prompt's last token (PARD's anchors)
    lookup: Tensor | None = None  # (T,) bool: prompt lookup already drafts the label here (``lookup_hits``)


def chunks(data: DistillSet, seq_len: int, exit_layer: int | None = None,
           fused_layers: tuple[int, ...] | None = None, lookup: bool = False) -> list[Chunk]:
    """Every sequence cut into consecutive pieces of at most ``seq_len`` positions; with ``lookup``, each
    flags the labels prompt lookup already drafts (what validation splits its accuracy by)."""
    for layer in fused_layers or ():
        if layer not in data.layer_features:
            raise ValueError(f"EAGLE-3 reads the target's hidden states {list(fused_layers)}, but the distillation set "
                             f"holds only {sorted(data.layer_features)} besides the final one: build it with "
                             f"data.teacher_layers={list(fused_layers)}")
    out = []
    for i, seq in enumerate(data.sequences):
        # label j is token j + 1 of the sequence (the set is the target's greedy output)
        hits = torch.cat([lookup_hits(seq, *LOOKUP_NGRAM)[1:], torch.zeros(1, dtype=torch.bool)]) if lookup else None
        for lo in range(0, len(seq) - 1, seq_len):
            hi = min(len(seq), lo + seq_len)
            exit_feats = data.layer_features[exit_layer][i][lo:hi] if exit_layer is not None else None
            fused = None if fused_layers is None else [data.layer_features[layer][i][lo:hi] for layer in fused_layers]
            features = data.features[i][lo:hi] if data.features else torch.empty(hi - lo, 0)
            out.append(Chunk(seq[lo:hi], features, exit_feats, data.labels[i][lo:hi], lo, fused,
                             max(0, data.prompt_lens[i] - 1 - lo), None if hits is None else hits[lo:hi]))
    return out


def _pad(rows: list[Tensor], value=0) -> Tensor:
    return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def collate(batch: list[Chunk], label_index: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Right-padded tensors; padded labels are -100 (ignored)."""
    lengths = [len(c.tokens) for c in batch]
    out = {
        "tokens": _pad([c.tokens for c in batch]),
        "features": _pad([c.features.float() for c in batch]),
        "labels": _pad([label_index(c.labels) for c in batch], -100),
        "positions": _pad([torch.arange(c.start, c.start + n) for c, n in zip(batch, lengths)]),
        "mask": _pad([torch.ones(n, dtype=torch.bool) for n in lengths], False),
        "answer": torch.tensor([c.answer for c in batch]),
    }
    if batch[0].lookup is not None:
        out["lookup"] = _pad([c.lookup for c in batch], False)
    if batch[0].fused is not None:
        out["fused"] = _pad([torch.cat([f.float() for f in c.fused], dim=-1) for c in batch])
    if batch[0].exit_features is not None:
        out["exit_features"] = _pad([c.exit_features.float() for c in batch])
    return out


class Objective(nn.Module):
    """A drafter kind's trainable module and its loss; ``forward(batch) -> (loss, per-depth top-1 hits)``."""

    def __init__(self, kind: str, target: PreTrainedModel, head: ReducedHead, settings: TrainSettings) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"drafter kind {kind!r} is not trainable: use one of {KINDS}")
        self.kind, self.settings, self.head = kind, settings, head
        self._target = [target]  # frozen, not a submodule (not trained, not saved)
        if kind == "eagle":
            layout = ReferenceEagle3Head if settings.layout == "reference" else EagleHead
            self.module = layout.from_target(target, settings.fused_layers)
            if settings.init_from:  # more epochs from a trained head
                ckpt = _checkpoint(settings.init_from, "eagle", target)
                layers = ckpt["settings"].get("fused_layers")
                if (None if layers is None else tuple(layers)) != self.module.fused_layers:
                    raise ValueError(f"eagle init_from={settings.init_from!r} reads target layers {layers}, not "
                                     f"fused_layers={self.module.fused_layers}: set drafter.train.fused_layers to match")
                if ckpt["settings"].get("layout", "specdec") != settings.layout:
                    raise ValueError(f"eagle init_from={settings.init_from!r} is a "
                                     f"{ckpt['settings'].get('layout', 'specdec')!r}-layout head, not "
                                     f"layout={settings.layout!r}: set drafter.train.layout to match")
                self.module.load_state_dict(ckpt["state_dict"])
        elif kind == "medusa":
            self.module = MedusaHeads(target.config.hidden_size, settings.heads)
        elif kind == "early_exit":
            self.module = ExitAdapter(target.config.hidden_size)
        elif kind == "pard":
            self.module = PardDraft.from_target(target, list(settings.init_layers), head.token_ids)
            if settings.init_from:
                missing, unexpected = self.module.lm.load_state_dict(
                    _checkpoint(settings.init_from, "draft_model", target)["state_dict"], strict=False)
                missing = [k for k in missing if not k.startswith(BORROWED)]  # the embedding and head are the target's
                if missing or unexpected:
                    raise ValueError(f"pard init_from={settings.init_from!r} does not fit a draft of layers "
                                     f"{list(settings.init_layers)}: missing {missing}, unexpected {unexpected}")
        elif kind == "block":
            self.module = BlockHead.from_target(target, settings.fused_layers, settings.block_layers)
            if settings.init_from:  # resume: more runs from a trained head of the same shape
                ckpt = _checkpoint(settings.init_from, "block", target)
                shape = (tuple(ckpt["settings"]["fused_layers"]), ckpt["settings"]["layers"])
                if shape != (self.module.fused_layers, self.module.layers):
                    raise ValueError(f"block init_from={settings.init_from!r} has fused_layers, layers = {shape}, not "
                                     f"{(self.module.fused_layers, self.module.layers)}: set drafter.train.fused_layers "
                                     "and drafter.train.block_layers to match")
                self.module.load_state_dict(ckpt["state_dict"])
        else:
            self.module = build_draft(target, list(settings.init_layers), head.token_ids)
        self.module.to(dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(settings.seed)  # pard's mask blocks

    def forward(self, batch: dict[str, Tensor], depths: int | None = None) -> tuple[Tensor, list[Tensor]]:
        if self.settings.answer_only:  # labels of the answers only (the prompt stays as context)
            labels = batch["labels"]
            index = torch.arange(labels.shape[1], device=labels.device)[None, :]  # (1, T)
            batch = batch | {"labels": labels.masked_fill(index < batch["answer"].to(labels.device)[:, None], -100)}
        kind = "eagle3" if self.kind == "eagle" and self.module.eagle3 else self.kind
        return getattr(self, f"_{kind}")(batch, depths)

    def _ce(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy of the reduced head on ``hidden (..., H)`` at the labelled positions of ``labels (...)``
        (the head runs on those alone) and the top-1 hits ``(correct, counted)``."""
        keep = labels != -100
        scores = self.head.reduced(hidden[keep])  # (N, V)
        want = labels[keep]
        loss = F.cross_entropy(scores, want) if len(want) else hidden.sum() * 0.0
        hits = torch.stack([(scores.detach().max(-1).indices == want).sum(), keep.sum()])
        return loss, hits

    def _eagle3(self, batch, depths):
        s = self.settings
        steps = ttt_unroll(self.module, self._target[0].get_input_embeddings(), batch["fused"], batch["tokens"],
                           batch["positions"], batch["mask"], depths or s.unroll)
        total, hits = 0.0, []
        for step, out in enumerate(steps):
            ahead = 1 + step  # index j of step s predicts the label j + 1 + s
            want = F.pad(batch["labels"][:, ahead:], (0, ahead - 1), value=-100)[:, : out.shape[1]]
            ce, hit = self._ce(self.module.logit_states(out), want)
            total = total + ce * (s.step_weight ** step)
            hits.append(hit)
        return total, hits

    def _pard(self, batch, depths):
        draft, s = self.module, self.settings
        block = mask_blocks(batch["tokens"].cpu(), batch["labels"].cpu(), batch["positions"].cpu(),
                            batch["mask"].cpu(), batch["answer"].cpu(), s.block, s.retain,
                            self.generator if self.training else torch.Generator().manual_seed(s.seed))
        device = batch["tokens"].device
        block = {k: v.to(device) for k, v in block.items()}
        x = draft.embed(block["ids"], block["is_mask"])
        hidden = draft.hidden(x, block["positions"], attention_mask=attention_bias(block["visible"], draft.lm.config))
        total, hits = 0.0, []
        for d in range(min(depths or s.block, s.block)):  # depth 1: the tokens' own next-token guesses
            at = block["depth"] == d
            labels = torch.where(at, block["labels"], -100)
            if not (labels != -100).any():
                hits.append(torch.zeros(2, dtype=torch.long, device=device))
                continue
            ce, hit = self._ce(hidden[at], labels[at])
            total = total + ce
            hits.append(hit)
        return total, hits

    def _block(self, batch, depths):
        head, s = self.module, self.settings
        tokens, labels = batch["tokens"], batch["labels"]
        device = tokens.device
        layout = anchor_blocks(batch["positions"].cpu(), batch["mask"].cpu(), batch["answer"].cpu(), s.block,
                               s.anchors, self.generator if self.training else torch.Generator().manual_seed(s.seed))
        layout = {k: v.to(device) for k, v in layout.items()}
        B, T = tokens.shape
        anchor = layout["anchor"]  # (B, C)
        roots = self._target[0].get_input_embeddings()(tokens.gather(1, anchor.clamp(min=0)))  # (B, C, H)
        before = features_before(batch["fused"], anchor)  # (B, C, F)
        x = torch.cat([head.context(batch["fused"]), head.block_inputs(roots.float(), s.block, before).flatten(1, 2)],
                      dim=1)
        hidden = head.hidden(x, layout["positions"], attention_mask=attention_bias(layout["visible"], head.body.config))
        out = hidden[:, T:].unflatten(1, (anchor.shape[1], s.block + 1))[:, :, 1:]  # (B, C, block, H): the masks
        index = layout["label_index"]  # (B, C, block)
        want = torch.where(index >= 0, labels.gather(1, index.clamp(min=0).flatten(1)).view_as(index), -100)
        keep = want != -100
        if not keep.any():
            return hidden.sum() * 0.0, [torch.zeros(2, dtype=torch.long, device=device)] * s.block
        logq = torch.log_softmax(self.head.reduced(out[keep]).float(), dim=-1)  # (N, V)
        label_logq = torch.full(want.shape, -1e4, device=device)  # (B, C, block); off the labels: unreachable
        label_logq[keep] = logq.gather(1, want[keep][:, None])[:, 0]
        weights = chain_weights(label_logq, s.loss_decay, s.confidence)[keep]  # (N,), constant
        if self.training and s.lookup_weight != 1.0 and "lookup" in batch:  # labels lookup drafts weigh less
            drafted = batch["lookup"].gather(1, index.clamp(min=0).flatten(1)).view_as(index)[keep]
            weights = weights * torch.where(drafted, s.lookup_weight, 1.0)
        loss = -(weights * label_logq[keep]).sum() / weights.sum()  # the weighted mean cross-entropy
        right = torch.zeros(want.shape, dtype=torch.bool, device=device)
        right[keep] = logq.argmax(-1) == want[keep]
        hits = [torch.stack([right[..., d].sum(), keep[..., d].sum()]) for d in range(min(depths or s.block, s.block))]
        return loss, hits

    def _eagle(self, batch, depths):
        target, s = self._target[0], self.settings
        feats, labels, pos = batch["features"], batch["labels"], batch["positions"]
        embeds = target.get_input_embeddings()(batch["tokens"][:, 1:]).float()  # x_{j+1}
        inputs = feats[:, :-1]  # f_j
        if self.training and s.noise:
            inputs = inputs + (torch.rand_like(inputs) - 0.5) * 2 * s.noise
        want, want_labels = feats[:, 1:], labels[:, 1:]
        valid = batch["mask"][:, 1:]
        total, hits = 0.0, []
        for step in range(depths or s.unroll):
            pred = self.module(inputs, embeds, pos[:, :-1])
            reg = F.smooth_l1_loss(pred, want, reduction="none").mean(-1)
            ce, hit = self._ce(pred, want_labels)
            total = total + (reg[valid].mean() + s.ce_weight * ce) * (0.5 ** step)
            hits.append(hit)
            # next step: element j reads the feature the head predicted for position j
            inputs = torch.cat([inputs[:, :1], pred[:, :-1]], dim=1)
        return total, hits

    def _medusa(self, batch, depths):
        feats, labels = batch["features"], batch["labels"]
        out = self.module(feats)  # (B, T, K, H)
        total, hits = 0.0, []
        for d in range(len(self.module)):
            # head d at position j guesses label[j + d + 1] (the token d + 2 ahead)
            ce, hit = self._ce(out[:, : out.shape[1] - d - 1, d], labels[:, d + 1 :])
            total = total + ce * (0.8 ** d)
            hits.append(hit)
        return total, hits

    def _early_exit(self, batch, depths):
        target = self._target[0]
        normed = target.model.norm(batch["exit_features"])
        ce, hit = self._ce(self.module(normed), batch["labels"])
        return ce, [hit]

    def _draft_model(self, batch, depths):
        hidden = self.module.model(input_ids=batch["tokens"], position_ids=batch["positions"]).last_hidden_state
        ce, hit = self._ce(hidden, batch["labels"])
        return ce, [hit]


def attention_bias(visible: Tensor, config) -> Tensor:
    """``visible (B, 1, T, K)`` bool as the layer's attention mask: itself for SDPA (any dtype under autocast),
    else additive (0 / the float32 minimum)."""
    if "sdpa" in (config._attn_implementation or "sdpa"):
        return visible
    return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, torch.finfo(torch.float32).min)


TTT_ATTENTION = "specdec_eagle3_ttt_over_sdpa"


def _ttt_attention(module, query, key, value, attention_mask, *args, ttt_queries: int | None = None, **kwargs):
    """EAGLE-3's training-time-test attention, structured: ``query (B, H, n, D)`` of one unroll step over
    ``key, value (B, Hk, (s + 1) n, D)`` (the cache: step 0's keys, then each later step's) -- causal over
    step 0, and key ``j`` alone of each later step (:func:`~specdec.drafters.eagle.ttt_mask`), in ``n x n``
    products instead of ``n x (s + 1) n`` masked ones. Right padding needs no mask: a real position's
    prefix is real, and a padded position reaches only its own column of later steps. Without
    ``ttt_queries`` it is SDPA."""
    if ttt_queries is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    B, Hq, n, D = query.shape
    key = key.repeat_interleave(Hq // key.shape[1], dim=1)  # (B, H, (s + 1) n, D)
    value = value.repeat_interleave(Hq // value.shape[1], dim=1)
    scale = kwargs.get("scaling") or D**-0.5
    scores = (query @ key[:, :, :n].transpose(-1, -2)) * scale  # (B, H, n, n): the true prefix
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    steps = key.shape[2] // n - 1
    if steps:
        earlier_k = key[:, :, n:].unflatten(2, (steps, n))  # (B, H, s, n, D): each earlier step's key j
        earlier_v = value[:, :, n:].unflatten(2, (steps, n))
        own = ((query[:, :, None] * earlier_k).sum(-1) * scale).transpose(2, 3)  # (B, H, n, s)
        scores = torch.cat([scores, own], dim=-1)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype)  # (B, H, n, n + s)
    out = probs[..., :n] @ value[:, :, :n]  # (B, H, n, D)
    if steps:
        out = out + (probs[..., n:, None] * earlier_v.transpose(2, 3)).sum(dim=-2)
    return out.transpose(1, 2).contiguous(), None  # (B, n, H, D)


AttentionInterface.register(TTT_ATTENTION, _ttt_attention)
AttentionMaskInterface.register(TTT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def ttt_unroll(head: EagleHead, embed: nn.Module, fused: Tensor, tokens: Tensor, positions: Tensor, valid: Tensor,
               steps: int, mask=None) -> list[Tensor]:
    """EAGLE-3's training-time test: the head run ``steps`` times over every position at once.

    Index ``j`` of step ``s`` is the pair ``(state, x_{j+1+s})`` at position ``j + s``: step 0 reads the
    fused target features ``g_j``, step ``s`` the head's own output of step ``s - 1`` at ``j``, attending to
    the true prefix and its own earlier steps (:func:`~specdec.drafters.eagle.ttt_mask`), as the node at
    depth ``s`` below ``j`` does when drafting. ``mask=None`` computes that attention structured
    (:func:`_ttt_attention`, selected on the head once); a mask function (``ttt_mask`` or any other)
    runs it as an explicit mask through the layer's own attention.

    Args:
        fused: ``(B, T, F)`` target features side by side; tokens, positions: ``(B, T)``; valid ``(B, T)``.

    Returns:
        Per step ``(B, T - 1, H)`` the head's output states (index ``j`` predicts the label ``j + 1 + s``).
    """
    if mask is None and head.body.config._attn_implementation != TTT_ATTENTION:
        head.body.set_attn_implementation(TTT_ATTENTION)  # SDPA itself wherever ttt_queries is not given
    n = tokens.shape[1] - 1  # index j: the pair (g_j, x_{j+1})
    states = head.fuse_features(fused[:, :n])  # (B, n, H)
    cache = DynamicCache(config=head.body.config)  # every step's keys, step after step
    out = []
    for step in range(steps):
        ahead = 1 + step
        toks = F.pad(tokens[:, ahead:], (0, ahead - 1))[:, :n]  # (B, n): x_{j+1+step} (0 past the end)
        if mask is None:
            attend = {"ttt_queries": n}
        else:
            visible = mask(n, step, valid[:, :n]).to(states.device)  # (B, 1, n, (step + 1) n)
            attend = {"attention_mask": attention_bias(visible, head.body.config)}
        states = head(states, embed(toks).to(states.dtype), positions[:, :n] + step, cache, **attend)
        out.append(states)
    return out


@torch.no_grad()
def rank_accuracy(objective: Objective, batches: list[dict], ranks: int = 8) -> Tensor:
    """Medusa: ``(K, ranks)`` how often head d's rank-r candidate is the label (held-out batches)."""
    heads = objective.module
    counts, total = torch.zeros(len(heads), ranks), torch.zeros(len(heads))
    for batch in batches:
        out = heads(batch["features"])
        for d in range(len(heads)):
            scores = objective.head.reduced(out[:, : out.shape[1] - d - 1, d])
            labels = batch["labels"][:, d + 1 :]
            valid = labels != -100
            top = scores.topk(ranks, dim=-1).indices  # (B, T', R)
            counts[d] += ((top == labels[..., None]) & valid[..., None]).sum(dim=(0, 1)).float()
            total[d] += valid.sum()
    return counts / total.clamp(min=1)[:, None]


def evaluate(objective: Objective, batches: list[dict]) -> dict[str, float]:
    """Held-out loss and top-1 accuracy per depth, over every label and over the labels prompt lookup misses.

    The second is what a drafter adds beside lookup (``Combined``), and closer to what it accepts on
    Spec-Bench: the target's long greedy answers loop, so lookup finds about 55-70% of the set's labels
    (the head's easy ones) against about 38% of the benchmark's.
    """
    objective.eval()
    totals: dict[str, list] = {"": [], "_lookup_miss": []}
    losses = []
    with torch.no_grad(), torch.autocast(batches[0]["tokens"].device.type, dtype=torch.bfloat16,
                                         enabled=objective.settings.bf16):
        for batch in batches:
            loss, hits = objective(batch, depths=objective.settings.eval_depths)
            losses.append(float(loss))
            totals[""].append(hits)
            if "lookup" in batch:
                missed = batch | {"labels": batch["labels"].masked_fill(batch["lookup"], -100)}
                totals["_lookup_miss"].append(objective(missed, depths=objective.settings.eval_depths)[1])
    objective.train()
    metrics = {"val/loss": sum(losses) / len(losses)}
    for suffix, per_batch in totals.items():
        for d, depth in enumerate(zip(*per_batch)):
            correct, counted = sum(depth)
            metrics[f"val/top1_depth{d + 1}{suffix}"] = float(correct) / max(1, float(counted))
    return metrics


def train(kind: str, target: PreTrainedModel, data: DistillSet, settings: TrainSettings,
          log: Callable[[dict, int], None] = lambda metrics, step: None,
          accelerator: Accelerator | None = None) -> tuple[nn.Module, Tensor | None, dict]:
    """Train a drafter of ``kind`` for ``target``.

    Returns:
        The trained module, the reduced vocabulary (``None``: full) and the final metrics
        (held-out loss, top-1 per depth, ``rank_accuracy`` for Medusa).
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(settings.seed)
    for param in target.parameters():
        param.requires_grad_(False)
    train_set, val_set = data.split(settings.holdout)
    train_set = aimed(train_set, settings)
    vocab = None
    if settings.vocab:
        vocab = frequent_tokens(train_set.labels, settings.vocab, target.get_output_embeddings().weight.shape[0])
    head = ReducedHead(target.get_output_embeddings(), vocab).float()
    settings = resolved(kind, target, settings)
    objective = Objective(kind, target, head, settings)
    exit_layer = settings.layers if kind == "early_exit" else None
    fused = settings.fused_layers if kind in ("eagle", "block") else None
    train_chunks = chunks(train_set, settings.seq_len, exit_layer, fused, lookup=settings.lookup_weight != 1.0)
    if len(train_chunks) < settings.batch_size:
        raise ValueError(f"the distillation set has {len(train_chunks)} training chunks of <= {settings.seq_len} tokens "
                         f"(after {settings.holdout} held-out sequences), fewer than one batch of "
                         f"batch_size={settings.batch_size}: build a larger set or lower drafter.train.batch_size")
    val_chunks = chunks(val_set, settings.seq_len, exit_layer, fused, lookup=True)
    if not val_chunks:
        raise ValueError(f"the distillation set has {len(data.sequences)} sequences, none left for validation after "
                         f"holdout={settings.holdout}: build a larger set or set drafter.train.holdout")
    val_batches = [collate(c, head.label_index) for c in _batched(val_chunks, settings.batch_size)]
    params = [p for p in objective.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    steps = settings.steps or max(1, math.ceil(settings.epochs * len(train_chunks) / settings.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    inner = accelerator.unwrap_model(objective)
    inner.head.to(accelerator.device)
    rng = random.Random(settings.seed)
    objective.train()
    order: list[Chunk] = []
    bar = tqdm(range(steps), desc=f"train {kind}", disable=not accelerator.is_main_process)
    for step in bar:
        if len(order) < settings.batch_size * accelerator.num_processes:
            order += length_batched(train_chunks, settings.batch_size * accelerator.num_processes, rng)
        mine = order[: settings.batch_size * accelerator.num_processes][accelerator.process_index ::
                                                                         accelerator.num_processes]
        del order[: settings.batch_size * accelerator.num_processes]
        batch = {k: v.to(accelerator.device) for k, v in collate(mine, head.label_index).items()}
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=settings.bf16):
            loss, hits = objective(batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        metrics = {"train/loss": loss.item(), "train/lr": schedule.get_last_lr()[0]}
        metrics |= {f"train/top1_depth{d + 1}": float(c) / max(1, float(n)) for d, (c, n) in enumerate(hits)}
        if (step + 1) % settings.eval_every == 0 or step + 1 == steps:
            metrics |= evaluate(inner, val_batches)
        if accelerator.is_main_process:
            log(metrics, step)
            bar.set_postfix({k.split("/")[-1]: round(v, 3) for k, v in metrics.items() if "loss" in k or "depth1" in k})
    final = evaluate(inner, val_batches)
    if kind == "medusa":
        final["rank_accuracy"] = rank_accuracy(inner, val_batches).tolist()
    return inner.module, vocab, final


def aimed(train_set: DistillSet, settings: TrainSettings) -> DistillSet:
    """The training rows aimed where drafting pays: ``skip_families`` left out, the target's loops cut
    (``loop_ngram``). Labels lookup drafts are down-weighted in the loss itself (``lookup_weight``)."""
    if settings.skip_families:
        train_set = train_set.without(settings.skip_families)
    if settings.loop_ngram:
        train_set = train_set.loops_cut(settings.loop_ngram)
    return train_set


def resolved(kind: str, target: PreTrainedModel, settings: TrainSettings) -> TrainSettings:
    """``settings`` with EAGLE-3's and the block head's layers chosen (``()``: 2, L/2, L-3) and PARD's layers those
    of ``init_from``."""
    changes = {}
    if kind == "block":
        layers = tuple(settings.fused_layers or ()) or default_fused_layers(target.config.num_hidden_layers)
        changes["fused_layers"] = check_fused_layers(layers, target.config.num_hidden_layers)
        for name, least in (("block", 1), ("anchors", 1), ("block_layers", 1)):
            if getattr(settings, name) < least:
                raise ValueError(f"block {name}={getattr(settings, name)} must be >= {least} "
                                 f"(drafter.train.{name})")
    if kind == "eagle" and settings.layout not in ("specdec", "reference"):
        raise ValueError(f"eagle layout={settings.layout!r} is not a layout: use 'specdec' (EagleHead) or "
                         "'reference' (ReferenceEagle3Head, the speculators format's) (drafter.train.layout)")
    if kind == "eagle" and settings.layout == "reference" and settings.fused_layers is None:
        raise ValueError("eagle layout='reference' is EAGLE-3 only, but fused_layers is None (EAGLE-1): set "
                         "drafter.train.fused_layers=[] (target layers 2, L/2, L-3) or list the layers")
    if kind == "eagle" and settings.fused_layers is not None:
        layers = tuple(settings.fused_layers) or default_fused_layers(target.config.num_hidden_layers)
        changes["fused_layers"] = check_fused_layers(layers, target.config.num_hidden_layers)
    if kind == "pard":
        if settings.block < 2:
            raise ValueError(f"pard block={settings.block} must be >= 2 (the root's prediction and at least one mask)")
        if settings.init_from:
            changes["init_layers"] = tuple(load_checkpoint(settings.init_from, "draft_model")["settings"]["init_layers"])
    return dataclasses.replace(settings, **changes) if changes else settings


def drafter_layers(kind: str, settings: TrainSettings) -> set[int]:
    """The target hidden states (indices into ``output_hidden_states``) the teacher pass must keep for ``kind``
    (``settings`` from :func:`resolved`): EAGLE-3's fused layers, early exit's exit layer."""
    if kind in ("eagle", "block") and settings.fused_layers is not None:
        return set(settings.fused_layers)
    if kind == "early_exit":
        return {settings.layers}
    return set()


def _checkpoint(name: str, kind: str, target: PreTrainedModel) -> dict:
    """A ``kind`` checkpoint for ``target`` a training starts from (``init_from``: PARD from the distilled
    draft, EAGLE from an earlier head)."""
    ckpt = load_checkpoint(name, kind)
    check_target(ckpt, target)
    return ckpt


def drafter_class(kind: str) -> type[ModelDrafter]:
    """The drafter class whose checkpoints ``kind`` names (it writes and reads back their settings)."""
    if kind not in DRAFTERS:
        raise ValueError(f"drafter kind {kind!r} is not trainable: use one of {KINDS}")
    return DRAFTERS[kind]


def module_settings(kind: str, target: PreTrainedModel, settings: TrainSettings) -> dict:
    """What a checkpoint needs to rebuild the module before its weights load: the drafter class's own
    write half (:meth:`~specdec.drafters.network.ModelDrafter.checkpoint_settings`; ``from_loaded`` reads it)."""
    return drafter_class(kind).checkpoint_settings(target, resolved(kind, target, settings))


def trained_weights(kind: str, module: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint keeps: the module's own weights (a draft's borrowed embedding stays out)."""
    return drafter_class(kind).trained_weights(module)


def length_batched(items: list[Chunk], size: int, rng: random.Random, window: int = 16) -> list[Chunk]:
    """``items`` shuffled, then within each ``window`` batches sorted by length and cut into batches of ``size``
    in random order: batches of similar lengths pad less (the same epoch, in a seeded order)."""
    items = list(items)
    rng.shuffle(items)
    out = []
    for lo in range(0, len(items), size * window):
        span = sorted(items[lo : lo + size * window], key=lambda c: len(c.tokens))
        batches = [span[i : i + size] for i in range(0, len(span), size)]
        rng.shuffle(batches)
        out += [c for batch in batches for c in batch]
    return out


def _batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
