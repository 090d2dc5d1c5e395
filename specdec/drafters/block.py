"""A block drafter conditioned on the target: k tokens from ONE draft forward over the target's own features.

The DFlash / DSpark family (arXiv 2602.06036, "DFlash: Block Diffusion for Flash Speculative Decoding";
arXiv 2607.05147, DSpark's parallel backbone), on EAGLE-3's fused features (Li et al. 2025, arXiv
2503.01840): the target's hidden states after a low, a middle and a high layer, side by side.

The draft (:class:`BlockHead`) is one or two decoder layers of the target's architecture and width, with
the target's embedding and its (reduced, frozen) output head borrowed. Each step it runs ONE forward over

    [ context: fuse(g_j) for the committed tokens it has not seen | block: e(root), mask, ..., mask ]

where ``g_j`` is the target's fused feature of committed token ``t_j`` (position ``j``), ``e(root)`` the
root token's embedding at the root's position ``n`` and mask ``i`` a learned embedding at position
``n + i``. Context columns attend causally to the context (they stay in the draft's ragged cache, each
computed once); the ``1 + k`` block columns see the whole context and each other, both ways (the
diffusion-style block of DFlash), and are dropped after the step. The output at mask ``i`` scored by
the target's head is ``q_i``, the draft's distribution of the token ``i`` ahead of the root
(``t_{n+i}``), conditioned on the committed prefix only: a *marginal*, not on the drafted tokens above.

q, and why sampling stays exact: a chain (or a top-k tree, :func:`~specdec.drafters.growth.grow`)
draws the node at depth ``d`` from ``q_d`` after the target's temperature / top-k / top-p, and carries
that ``q_d`` as the node's q (greedy: the argmax, point masses). Recursive rejection is lossless for any
q from which the drafts were actually drawn, whatever q conditions on. With ``tree="ddtree"`` the tree
is built best-first from the marginals (:mod:`specdec.drafters.ddtree`) and its nodes are deterministic
candidates (``q=None``), exact for the same reason prompt lookup's trees are.

Training (:mod:`specdec.training.train`, kind ``block``) reads the cached teacher pass the EAGLE-3
training writes (fused features and the target's greedy labels): random anchors per chunk, each a
block after the anchor's true prefix (:func:`anchor_blocks`), all in one forward; cross-entropy of
mask ``i`` against the label ``i`` ahead, weighted ``decay ** (i - 1)`` (DFlash's position decay) and,
with ``confidence > 0``, by how likely the draft's own chain reaches depth ``i``
(:func:`chain_weights`: the product of its probabilities of the earlier labels, held constant), a
confidence-adaptive token weight in the spirit of PARD-2 (arXiv 2605.08632).

p is the target distribution and q the draft's, everywhere.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from specdec.drafters.base import DecodeState, Needs, Proposer, TargetView, Verified, module_for
from specdec.drafters.ddtree import BlockProposer, DDTree, as_ddtree
from specdec.drafters.eagle import (DraftLMHead, check_fused_layers, default_fused_layers, direct_layers, head_config,
                                    quantized, run_layers)
from specdec.drafters.growth import Level
from specdec.drafters.network import DraftNetwork, GrowingProposer, ModelDrafter, prepare
from specdec.drafters.vocab import ReducedHead
from specdec.training.checkpoint import load_weights
from specdec.tree import TreeSpec


class BlockHead(nn.Module):
    """The draft network: ``fuse`` (the fused target features to the hidden size), ``layers`` decoder layers
    of the target's architecture, the final norm, and the mask embedding.

    Args:
        target_config: the target's config (the layers copy its architecture and width).
        fused_layers: the target hidden states read side by side (indices into ``output_hidden_states``).
        layers: decoder layers (1-2 keep the draft forward cheap).
    """

    def __init__(self, target_config: PretrainedConfig, fused_layers: tuple[int, ...], layers: int = 1) -> None:
        super().__init__()
        hidden = target_config.hidden_size
        self.fused_layers = check_fused_layers(fused_layers, target_config.num_hidden_layers)
        self.body = AutoModel.from_config(head_config(target_config, layers))
        self.body.get_input_embeddings().requires_grad_(False)  # inputs come in as embeddings: unused
        if not direct_layers(self.body):
            raise ValueError(f"the block drafter calls its decoder layers directly with rotary position embeddings; "
                             f"{type(self.body).__name__} has none: use drafter=eagle or drafter=draft_model")
        self.fuse = nn.Linear(len(self.fused_layers) * hidden, hidden, bias=False)
        self.feature_norm = copy.deepcopy(self.body.norm)  # the fused features and the embeddings differ in scale
        self.mask = nn.Parameter(torch.zeros(hidden))
        # the feature of the token before the root, added to every block column (zero at the start): the
        # block reads what EAGLE reads in its own column, so it need not first learn to attend to it
        self.anchor = nn.Linear(hidden, hidden, bias=False)

    @property
    def feature_width(self) -> int:
        """Width of the target features read: ``H * len(fused_layers)``."""
        return self.fuse.in_features

    @property
    def layers(self) -> int:
        return len(self.body.layers)

    @classmethod
    def from_target(cls, target: PreTrainedModel, fused_layers: tuple[int, ...] | None = None,
                    layers: int = 1) -> BlockHead:
        """An untrained head started from the target: its last ``layers`` layers and final norm, ``fuse``
        passing the highest fused layer through, the mask the mean token embedding."""
        num = target.config.num_hidden_layers
        fused = check_fused_layers(fused_layers or default_fused_layers(num), num)
        head = cls(target.config, fused, layers).to(target.dtype)
        hidden = target.config.hidden_size
        with torch.no_grad():
            for mine, theirs in zip(head.body.layers, target.model.layers[num - layers :]):
                mine.load_state_dict(theirs.state_dict())
            head.body.norm.load_state_dict(target.model.norm.state_dict())
            head.fuse.weight.zero_()
            high = max(range(len(fused)), key=lambda i: fused[i])
            head.fuse.weight[:, high * hidden : (high + 1) * hidden] = torch.eye(hidden)
            head.mask.copy_(target.get_input_embeddings().weight.float().mean(0))
            head.anchor.weight.zero_()
        return head

    def context(self, features: Tensor) -> Tensor:
        """``(..., feature_width)`` fused target features -> ``(..., H)`` context inputs."""
        return self.feature_norm(self.fuse(features))

    def block_inputs(self, root_embeds: Tensor, k: int, before: Tensor) -> Tensor:
        """``root_embeds (..., H)`` -> ``(..., 1 + k, H)``: the root's embedding, then ``k`` masks, each plus
        ``anchor(context(before))``; ``before (..., feature_width)`` is the fused feature of the token before
        the root (zeros where there is none)."""
        masks = self.mask.to(root_embeds.dtype).expand(*root_embeds.shape[:-1], k, -1)
        inputs = torch.cat([root_embeds[..., None, :], masks], dim=-2)
        return inputs + self.anchor(self.context(before.to(root_embeds.dtype)))[..., None, :].to(inputs.dtype)

    def hidden(self, x: Tensor, position_ids: Tensor, cache=None, attention_mask: Tensor | None = None,
               **kwargs) -> Tensor:
        """``x (B, T, H)`` -> ``(B, T, H)`` the normed states the output head reads."""
        return self.body.norm(run_layers(self.body, x, position_ids, cache, attention_mask, **kwargs))


# --- training layout and loss weights (pure) ------------------------------------------------------------


def anchor_blocks(positions: Tensor, valid: Tensor, answer: Tensor, block: int, anchors: int,
                  generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The training layout: each row's ``T`` context columns, then ``C`` blocks of ``1 + block`` columns.

    Up to ``anchors`` anchors per row are drawn without replacement among the positions ``n`` at or after
    ``answer[b]`` (the last prompt token) with a label (``n < valid[b].sum()``). Block ``c`` of anchor ``n``
    is the root ``t_n`` at ``positions[n]`` and ``block`` masks at ``positions[n] + i``; its columns see the
    context columns ``j < n`` and their own block (both ways), as drafting does; context columns see their
    causal prefix. Mask ``i`` is labelled with the label index ``n + i - 1`` (the label ``i`` ahead of ``n``).

    Args:
        positions: ``(B, T)``; valid: ``(B, T)`` bool (right padding); answer: ``(B,)``.

    Returns:
        ``anchor (B, C)`` each block's root index (-1: a padding block, labelled nowhere), ``label_index
        (B, C, block)`` (-1: no label), ``positions (B, T + C (1 + block))`` and ``visible (B, 1, L, L)``.
    """
    B, T = valid.shape
    n = valid.sum(1)
    picks = []
    for b in range(B):
        first = max(0, int(answer[b]))
        pool = torch.arange(first, max(first, int(n[b])))
        picks.append(pool[torch.randperm(len(pool), generator=generator)[:anchors]].sort().values)
    C = max(1, max(len(p) for p in picks))
    anchor = torch.full((B, C), -1, dtype=torch.long)
    for b, p in enumerate(picks):
        anchor[b, : len(p)] = p
    depth = torch.arange(block + 1)  # (1 + block,): the root, then masks 1 .. block
    index = anchor[:, :, None] + depth[None, None, 1:] - 1  # (B, C, block)
    label_index = torch.where((anchor[:, :, None] >= 0) & (index < n[:, None, None]), index, -1)
    root_pos = positions.gather(1, anchor.clamp(min=0))  # (B, C)
    block_pos = (root_pos[:, :, None] + depth).flatten(1)  # (B, C (1 + block))
    L = T + C * (block + 1)
    col = torch.arange(T)
    own = anchor.repeat_interleave(block + 1, dim=1)  # (B, C (1 + block)): each block column's anchor
    which = torch.arange(C).repeat_interleave(block + 1)  # its block
    visible = torch.zeros(B, L, L, dtype=torch.bool)
    visible[:, :T, :T] = torch.ones(T, T, dtype=torch.bool).tril()[None] & valid[:, None, :] & valid[:, :, None]
    visible[:, T:, :T] = (col[None, None, :] < own[:, :, None]) & valid[:, None, :]
    visible[:, T:, T:] = (which[:, None] == which[None, :])[None] & (own >= 0)[:, :, None]
    visible |= torch.eye(L, dtype=torch.bool)[None]  # padding sees itself
    return {"anchor": anchor, "label_index": label_index, "positions": torch.cat([positions, block_pos], dim=1),
            "visible": visible[:, None]}


def features_before(fused: Tensor, anchor: Tensor) -> Tensor:
    """``fused (B, T, F)``, ``anchor (B, C)`` root indices -> ``(B, C, F)`` the feature of the token before each
    root (zeros for a root at index 0 or a padding block), what the block's columns read besides attention."""
    prev = (anchor - 1).clamp(min=0)
    out = fused.gather(1, prev[..., None].expand(-1, -1, fused.shape[-1]))
    return out * (anchor > 0)[..., None].to(out.dtype)


def chain_weights(label_logq: Tensor, decay: float, confidence: float) -> Tensor:
    """Loss weights of the block's depths: ``decay ** (d - 1) * ((1 - confidence) + confidence * reach_d)``.

    ``label_logq (..., K)``: the draft's log-probability of the label at depths 1..K; ``reach_d`` is
    ``prod_{j < d} q_j(label_j)`` (1 at depth 1), how likely the draft's own chain gets to depth ``d``:
    depths it rarely reaches weigh less. Constant (no gradient); ``(..., K)``.
    """
    K = label_logq.shape[-1]
    before = torch.nn.functional.pad(label_logq.detach()[..., :-1], (1, 0)).cumsum(-1)  # (..., K)
    reach = before.clamp(min=-80.0).exp()
    decays = decay ** torch.arange(K, dtype=label_logq.dtype, device=label_logq.device)
    return decays * ((1.0 - confidence) + confidence * reach)


# --- drafting -------------------------------------------------------------------------------------------


class BlockNet(DraftNetwork):
    """The head as the draft network: its ragged cache holds the context columns (the committed tokens'
    fused features, each fed once); ``marginals`` runs the step's one forward (every held row's unseen
    features, then its block) and gives ``q_1 .. q_k``; ``root``/``expand`` serve them to tree growth."""

    def __init__(self, head: BlockHead, embed: nn.Module, lm: nn.Module, view: TargetView, slots: int) -> None:
        super().__init__(view, served=head.body, cached=head.body)
        self.head, self.embed, self.lm, self.slots = head, embed, lm, slots
        self.needs = Needs(hidden=True, layers=head.fused_layers)
        self.pending: dict[int, Tensor] = {}  # row -> (m, F) features of committed tokens not fed yet
        self.seen: dict[int, int] = {}  # row -> tokens of the row whose features are pending or fed
        self.before: dict[int, Tensor] = {}  # row -> (F,) the last fed feature: the token before the next root
        self.block: Tensor | None = None  # (A, slots, V) the step's logits of depths 1 .. slots
        self.dtype = head.mask.dtype

    def _check(self, hidden: Tensor | None) -> Tensor:
        if hidden is None or hidden.shape[-1] != self.head.feature_width:
            got = "none" if hidden is None else f"width {hidden.shape[-1]}"
            raise ValueError(f"the block drafter reads target hidden states {list(self.head.fused_layers)} side by side "
                             f"(width {self.head.feature_width}) but got {got}: the proposer's needs did not reach the "
                             "engine (a wrapper drafter must pass its parts' Proposer.needs on, with Needs.combine)")
        return hidden

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        super().prefill(states, verified)
        for s, seen in zip(states, verified):  # the features of every prompt token but the root
            self.pending[s.row] = self._check(seen.hidden)
            self.seen[s.row] = s.tokens.shape[1]

    def marginals(self, states: list[DecodeState], depths: list[int]) -> Tensor:
        """``(A, K, V)`` logits of depths 1..K (``K = min(k, max(depths))``, at least 1) for every held row,
        from the step's one forward (what :class:`~specdec.drafters.ddtree.BlockProposer` builds from)."""
        slots = max(1, min(self.slots, max(depths, default=0)))
        pend = [self.pending[s.row] for s in states]
        counts = torch.tensor([len(f) for f in pend])
        feed = self.catch_up(counts, extra=1 + slots)  # left-padded: unseen context, the root, the masks
        A, M = feed.valid.shape
        device, dtype = self.device, self.dtype
        first = M - 1 - slots  # the root's column
        ancestors = feed.ancestors.clone()
        ancestors[:, first:, first:] = True  # the block sees itself both ways
        x = torch.zeros(A, M, self.head.fuse.out_features, device=device, dtype=dtype)  # (A, M, H)
        if int(counts.sum()):
            context = self.head.context(torch.cat(pend).to(device=device, dtype=dtype))  # (sum m, H)
            x = feed.place(list(context.split(counts.tolist()))).to(dtype)
        roots = self.embed(torch.cat([s.tokens[:, -1] for s in states]).to(device)).to(dtype)  # (A, H)
        for s, f in zip(states, pend):
            if len(f):
                self.before[s.row] = f[-1]
        zero = torch.zeros(self.head.feature_width)
        before = torch.stack([self.before.get(s.row, zero).to(device=device, dtype=dtype) for s in states])
        x[:, first:] = self.head.block_inputs(roots, slots, before)
        positions = feed.positions.to(device)
        hidden = self.through_tree(self.head.hidden, ancestors, positions, x, positions, self.cache.cache)
        logits = self.lm(hidden[:, first + 1 :])  # (A, slots, V)
        self.keep_fed(feed)  # the context kept, the block dropped
        for s in states:
            self.pending[s.row] = self.pending[s.row][:0]
        self.block = logits
        return logits

    def root(self, states: list[DecodeState], depths: list[int]) -> Tensor:
        return self.marginals(states, depths)[:, 0]

    def expand(self, level: Level) -> Tensor:
        F = level.tokens.shape[1]
        return self.block[:, level.depth, None, :].expand(-1, F, -1)  # (A, F, V): q_{d+1} for every node

    def commit(self, states: list[DecodeState], fed: dict[int, list[int]], verified: list[Verified]) -> None:
        self.block = None
        for state, seen in zip(states, verified):
            if state.row not in self.seen:
                continue
            appended = state.tokens.shape[1] - self.seen[state.row]
            hidden = self._check(seen.hidden)
            m = min(len(hidden), appended)  # the root and the accepted nodes: every token but the new root
            self.pending[state.row] = torch.cat([self.pending[state.row], hidden[:m]])
            self.seen[state.row] = state.tokens.shape[1]
            if state.finished:
                self.pending.pop(state.row, None)
                self.seen.pop(state.row, None)
                self.before.pop(state.row, None)
        super().commit(states, fed, verified)


class BlockDrafter(ModelDrafter):
    """A block drafter on the target's fused features (see the module docstring): ``k`` tokens per draft
    forward, as a chain (``top_k=1``), a tree over the per-depth marginals (``top_k``, ``width``,
    ``budget``, a static ``tree``), or ``tree="ddtree"``: the ``budget`` (default 16) likeliest prefixes
    under the marginals, best-first (:mod:`specdec.drafters.ddtree`).

    Args:
        head: a :class:`BlockHead` (untrained: :meth:`BlockHead.from_target`; trained: :meth:`from_checkpoint`).
        vocab: token ids the output head scores (``None``: all); see :mod:`specdec.drafters.vocab`.
        checkpoint: the loaded checkpoint, whose target fingerprint is enforced (``None``: any target).
        k: tokens per step (masks per block; default: the checkpoint's trained block, else 8); at most the
            trained block.
        quantize: on CPU, draft with int8 copies of the head's and the output head's linear maps (only the
            draft's rounding changes).
    """

    kind = "block"
    default_checkpoint = "block-smollm2-135m"

    def __init__(self, head: BlockHead, vocab: Tensor | None = None, checkpoint: dict | None = None, k: int | None = None,
                 top_k: int = 1, width: int | None = None, budget: int | None = None,
                 tree: TreeSpec | list[list[int]] | str | DDTree | None = None, quantize: bool = False) -> None:
        if not isinstance(head, BlockHead):
            raise ValueError(f"BlockDrafter needs a BlockHead, got {type(head).__name__}: use "
                             "BlockHead.from_target(target) or BlockDrafter.from_checkpoint('block-smollm2-135m')")
        self.ddtree = as_ddtree(tree, budget)
        if self.ddtree is not None:  # the shape is then only the block's depth k
            tree, budget = None, None
        trained = None if checkpoint is None else checkpoint["settings"].get("block")
        k = (trained or 8) if k is None else k
        super().__init__(k, top_k, width, budget, tree, checkpoint)
        if trained is not None and self.slots > trained:
            raise ValueError(f"block drafter checkpoint {checkpoint['path']!r} was trained for blocks of {trained} "
                             f"tokens: k={k} (or the tree's depth) must be <= {trained}")
        self.head, self.vocab, self.quantize = head.eval(), vocab, quantize

    @property
    def slots(self) -> int:
        """Masks per forward: the deepest draft."""
        return self.shape.k if self.shape.spec is None else min(self.shape.k, self.shape.spec.depth)

    @classmethod
    def from_loaded(cls, checkpoint: dict, **kwargs) -> BlockDrafter:
        settings = checkpoint["settings"]
        config = dict(settings["target_config"])
        head = BlockHead(AutoConfig.for_model(config.pop("model_type"), **config), tuple(settings["fused_layers"]),
                         settings["layers"])
        load_weights(head, checkpoint)
        return cls(head, checkpoint["vocab"], checkpoint, **kwargs)

    @classmethod
    def checkpoint_settings(cls, target: PreTrainedModel, settings) -> dict:
        """The head's shape, and how it was made: every run's seed and schedule, the earlier ones read from the
        ``init_from`` checkpoint it continued (resumable training, each run seeded)."""
        from dataclasses import asdict

        from specdec.training.checkpoint import load_checkpoint

        history = list(load_checkpoint(settings.init_from, cls.kind)["settings"].get("history", [])) \
            if settings.init_from else []
        run = {k: v for k, v in asdict(settings).items()
               if k in ("seed", "epochs", "lr", "batch_size", "seq_len", "vocab", "block", "anchors", "loss_decay",
                        "confidence", "answer_only", "bf16", "init_from")}
        return {"target_config": target.config.to_dict(), "fused_layers": list(settings.fused_layers),
                "layers": settings.block_layers, "block": settings.block, "history": history + [run]}

    def bind(self, target: nn.Module) -> tuple[BlockHead, nn.Module]:
        config = target.config.get_text_config()
        check_fused_layers(self.head.fused_layers, config.num_hidden_layers)
        if self.head.fuse.out_features != config.hidden_size:
            raise ValueError(f"block drafter head of width {self.head.fuse.out_features} cannot read a target of "
                             f"hidden size {config.hidden_size}: build it with BlockHead.from_target(target)")
        head = module_for(self.head, target)
        if self.quantize:
            head = quantized(head)
        return head, DraftLMHead(ReducedHead(target.get_output_embeddings(), self.vocab), self.quantize)

    def network(self, bound: tuple[BlockHead, nn.Module], view: TargetView) -> BlockNet:
        head, lm = bound
        prepare(head.body, view)
        prepare(head, view)
        return BlockNet(head, view.model.get_input_embeddings(), lm, view, self.slots)

    def proposer(self, view: TargetView) -> Proposer:
        net = self.network(self.bound(view.model), view)
        if self.ddtree is not None:
            return BlockProposer(net, self.ddtree, view)
        return GrowingProposer(net, self.shape)
