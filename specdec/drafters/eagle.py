"""EAGLE heads: one decoder layer of the target's architecture drafting over the target's own features.

One head, two modes:

- **EAGLE-3** (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models
  via Training-Time Test"), ``fused_layers=(low, mid, high)``: the target's hidden states after a low,
  a middle and a high layer (indices into its ``output_hidden_states``, 0 = the embeddings), side by
  side, are fused by ``fuse`` into one state ``g_j``. The head reads ``(g_j, e(x_{j+1}))``: ``fc``
  projects the two (each normed) to the hidden size, the decoder layer runs, and its output state
  ``h_j`` gives the next token's logits through the target's output head (optionally reduced to the
  frequent tokens, :mod:`specdec.drafters.vocab`) after the final norm. It predicts tokens, not
  features: at its later draft steps it reads its own output state ``h`` in place of ``g``, which is
  how it was trained (the training-time test, :mod:`specdec.training.train`).
- **EAGLE-1/2** (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
  Uncertainty"; EAGLE-2's dynamic trees), ``fused_layers=None``: the head reads the target's final
  hidden state ``f_j`` and predicts ``f_{j+1}``, which the target's head turns into logits (the
  ``eagle-smollm2-135m`` checkpoint shipped before the 1M-token set; the one shipped now is EAGLE-3).

Drafting runs the head auto-regressively, growing a tree level by level for every row at once
(:func:`~specdec.drafters.growth.grow`: dynamic top-k, rerank to a budget, or a static shape). Each
step the engine hands over the target's true features of the committed tokens (for EAGLE-3 the
``fused_layers`` side by side, asked for through the proposer's ``Needs.layers``); the head's cache keeps only
entries made from true features.

Draft-side speed (only the target must stay exact, so the draft's rounding is free): the decoder
layer is called directly (rotary embeddings, no mask building, no model wrapper), and with
``quantize=True`` (as the configs set) every linear map of the bound head and the output head runs in
int8 on CPU (:class:`Int8Linear`, fbgemm's dynamic quantization: the weights are read 4x faster, which is
what a one-row product on this CPU costs; about half the draft's time per depth on SmolLM2-135M).
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, DynamicCache, PretrainedConfig, PreTrainedModel

from specdec.drafters.base import DecodeState, Needs, TargetView, Verified, module_for
from specdec.drafters.growth import Level
from specdec.drafters.network import DraftNetwork, ModelDrafter, prepare
from specdec.drafters.vocab import ReducedHead
from specdec.training.checkpoint import load_weights
from specdec.tree import TreeSpec


def head_config(target_config: PretrainedConfig, layers: int = 1) -> PretrainedConfig:
    """The target's decoder architecture with ``layers`` layers and no vocabulary (inputs are embeddings)."""
    config = copy.deepcopy(target_config)
    config.num_hidden_layers, config.vocab_size, config.pad_token_id = layers, 1, None
    config.tie_word_embeddings = False
    return config


def default_fused_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high features for a target of ``num_layers`` layers: the hidden states
    after layers 2, L/2 and L-3 (30 layers: 2, 15, 27), as indices into ``output_hidden_states``."""
    return tuple(sorted((min(2, num_layers), num_layers // 2, max(0, num_layers - 3))))


def check_fused_layers(fused_layers, num_layers: int) -> tuple[int, ...]:
    """``fused_layers`` as a tuple of indices into ``output_hidden_states`` (0..L), or a ValueError."""
    layers = tuple(int(layer) for layer in fused_layers)
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if not layers or bad:
        raise ValueError(f"EAGLE-3 fused_layers={list(fused_layers)} must be indices in [0, {num_layers}] into the "
                         f"target's output_hidden_states (0 = embeddings), e.g. {list(default_fused_layers(num_layers))}")
    return layers


def direct_layers(body: nn.Module) -> bool:
    """Whether ``body``'s decoder layers can be called one by one with the model's rotary embeddings."""
    layers = getattr(body, "layers", None)
    if layers is None or getattr(body, "rotary_emb", None) is None or not len(layers):
        return False
    return "position_embeddings" in inspect.signature(layers[0].forward).parameters


def run_layers(body: nn.Module, x: Tensor, position_ids: Tensor, cache: DynamicCache | None = None,
               attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """``x (B, T, H)`` through ``body``'s decoder layers, called directly (no embedding, no mask building,
    no final norm); ``attention_mask`` a 4-D ``(B, 1, T, keys)`` additive mask or ``None`` (``tree=``)."""
    position_embeddings = body.rotary_emb(x, position_ids)
    for layer in body.layers:
        x = layer(x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                  use_cache=cache is not None, position_embeddings=position_embeddings, **kwargs)
        if isinstance(x, tuple):
            x = x[0]
    return x


class EagleHead(nn.Module):
    """An EAGLE head: ``fc([state ; e(x_{j+1})]) -> decoder layer``, in one of two modes (module docstring).

    Args:
        target_config: the target's config (the layer copies its architecture).
        fused_layers: EAGLE-3: the target hidden states ``fuse`` reads, side by side; ``None``: EAGLE-1.
    """

    def __init__(self, target_config: PretrainedConfig, fused_layers: tuple[int, ...] | None = None) -> None:
        super().__init__()
        hidden = target_config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.body = AutoModel.from_config(head_config(target_config))
        self.body.get_input_embeddings().requires_grad_(False)  # inputs come in as embeddings: unused
        self.direct = direct_layers(self.body)
        self.fused_layers = None
        if fused_layers is not None:
            self.fused_layers = check_fused_layers(fused_layers, target_config.num_hidden_layers)
            if not self.direct:
                raise ValueError(f"EAGLE-3 heads call the decoder layer directly with rotary position embeddings; "
                                 f"{type(self.body).__name__} has none: use fused_layers=None (EAGLE-1)")
            self.fuse = nn.Linear(len(self.fused_layers) * hidden, hidden, bias=False)
            self.state_norm = copy.deepcopy(self.body.norm)  # g and the head's own h differ in scale
            self.embed_norm = copy.deepcopy(self.body.norm)

    @property
    def eagle3(self) -> bool:
        return self.fused_layers is not None

    @property
    def feature_width(self) -> int:
        """Width of the target features the head reads: ``H`` (EAGLE-1) or ``H * len(fused_layers)``."""
        hidden = self.fc.out_features
        return hidden * (len(self.fused_layers) if self.eagle3 else 1)

    @classmethod
    def from_target(cls, target: PreTrainedModel, fused_layers: tuple[int, ...] | None = None) -> EagleHead:
        """A head started from the target: its last layer and final norm; ``fc`` (and ``fuse``, reading the
        highest fused layer) passing the state through, so an untrained head drafts something plausible."""
        head = cls(target.config, fused_layers).to(target.dtype)
        hidden = target.config.hidden_size
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.weight[:, :hidden] = torch.eye(hidden)
            head.body.layers[0].load_state_dict(target.model.layers[-1].state_dict())
            head.body.norm.load_state_dict(target.model.norm.state_dict())
            if head.eagle3:
                head.fuse.weight.zero_()
                high = max(range(len(head.fused_layers)), key=lambda i: head.fused_layers[i])
                head.fuse.weight[:, high * hidden : (high + 1) * hidden] = torch.eye(hidden)
        return head

    def fuse_features(self, features: Tensor) -> Tensor:
        """``(..., feature_width)`` target features -> ``(..., H)`` the state the head reads."""
        return self.fuse(features) if self.eagle3 else features

    def forward(self, states: Tensor, embeds: Tensor, position_ids: Tensor, cache: DynamicCache | None = None,
                attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """``states, embeds: (B, T, H)`` -> ``(B, T, H)`` the next states: EAGLE-1 the predicted features,
        EAGLE-3 the layer's output (see :meth:`logit_states`)."""
        embeds = embeds.to(states.dtype)
        if self.eagle3:
            x = self.fc(torch.cat([self.state_norm(states), self.embed_norm(embeds)], dim=-1))
            return run_layers(self.body, x, position_ids, cache, attention_mask, **kwargs)
        x = self.fc(torch.cat([states, embeds], dim=-1))
        if self.direct:
            return self.body.norm(run_layers(self.body, x, position_ids, cache, attention_mask, **kwargs))
        return self.body(inputs_embeds=x, position_ids=position_ids, cache=cache, use_cache=cache is not None,
                         attention_mask=attention_mask, **kwargs).last_hidden_state

    def logit_states(self, states: Tensor) -> Tensor:
        """``(..., H)`` what the output head reads: the normed output (EAGLE-3) or the feature itself."""
        return self.body.norm(states) if self.eagle3 else states


class ReferenceEagle3Head(EagleHead):
    """EAGLE-3 in its reference layout: SafeAILab's ``midlayer``, the one vLLM's ``speculators`` format, vLLM
    and SGLang load (:mod:`specdec.export` maps it to and from that format).

    ``fuse`` (their ``fc``) makes ``g_j`` from the fused layers (after ``fc_norm``: one norm per layer, or
    ``norm_before_fc``: one norm over them all, where a checkpoint has them). The first decoder layer's
    q/k/v read ``[input_layernorm(e(x_{j+1})) ; hidden_norm(g_j)]`` (2H wide) and its residual is ``g_j``
    (``hidden_norm(g_j)`` with ``norm_before_residual``); further layers are plain. The output state is the
    pre-norm output (``norm_output``: the normed one, EAGLE 3.1), which later draft steps read in place of
    ``g``, as in :class:`EagleHead`'s EAGLE-3 mode; so :class:`Eagle` drafts with either head unchanged.

    :class:`EagleHead`'s layout differs: it projects ``[norm(g) ; norm(e)]`` to H with ``fc`` *before* a plain
    decoder layer, whose input norm then normalizes that mixture, and its residual is ``fc``'s output. No
    weights of this layout reproduce that (an RMSNorm of the projected pair is not linear in the pair).

    Args:
        target_config: the target's config (``num_hidden_layers``: the target's, which ``fused_layers`` index).
        fused_layers: the target hidden states ``fuse`` reads (indices into ``output_hidden_states``).
        layers: decoder layers of the head (1 in every public EAGLE-3 head).
        layer_config: the layers' own config where it differs from the target's (an imported head's
            ``transformer_layer_config``); ``None``: the target's architecture.
    """

    def __init__(self, target_config: PretrainedConfig, fused_layers: tuple[int, ...], layers: int = 1,
                 layer_config: PretrainedConfig | None = None, norm_before_residual: bool = False,
                 norm_output: bool = False, fc_norm: bool = False, norm_before_fc: bool = False) -> None:
        nn.Module.__init__(self)
        config = layer_config if layer_config is not None else target_config
        hidden = config.hidden_size
        self.fused_layers = check_fused_layers(fused_layers, target_config.num_hidden_layers)
        self.body = AutoModel.from_config(head_config(config, layers))
        self.body.get_input_embeddings().requires_grad_(False)  # inputs come in as embeddings: unused
        self.direct = direct_layers(self.body)
        attn = self.body.layers[0].self_attn
        projections = ("q_proj", "k_proj", "v_proj")
        if not self.direct or not all(isinstance(getattr(attn, name, None), nn.Linear) for name in projections):
            raise ValueError(f"the reference EAGLE-3 layout widens the first layer's q_proj/k_proj/v_proj to 2H and "
                             f"calls its layers with rotary embeddings; {type(self.body).__name__} has no such "
                             "layers: use EagleHead (specdec's layout)")
        for name in projections:
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None))
        self.hidden_norm = copy.deepcopy(self.body.norm)
        width = len(self.fused_layers) * hidden
        self.fuse = nn.Linear(width, hidden, bias=False)
        self.fc_norm = nn.ModuleList(copy.deepcopy(self.body.norm) for _ in self.fused_layers) if fc_norm else None
        self.input_norm = None
        if norm_before_fc:
            self.input_norm = type(self.body.norm)(width, eps=config.rms_norm_eps)
        self.norm_before_residual, self.norm_output = norm_before_residual, norm_output

    @property
    def feature_width(self) -> int:
        return self.fuse.in_features

    @property
    def options(self) -> dict:
        """The layout's switches, by the names the speculators format gives them."""
        return {"norm_before_residual": self.norm_before_residual, "norm_output": self.norm_output,
                "fc_norm": self.fc_norm is not None, "norm_before_fc": self.input_norm is not None}

    @classmethod
    def from_target(cls, target: PreTrainedModel, fused_layers: tuple[int, ...] | None = None,
                    **options) -> ReferenceEagle3Head:
        """An untrained head started from the target: its last layer (q/k/v reading only the ``g`` half, the
        embedding half zero) and final norm; ``fuse`` passing the highest fused layer through."""
        num = target.config.num_hidden_layers
        fused = check_fused_layers(fused_layers or default_fused_layers(num), num)
        head = cls(target.config, fused, **options).to(target.dtype)
        hidden = target.config.hidden_size
        last, first = target.model.layers[-1], head.body.layers[0]
        with torch.no_grad():
            state = dict(last.state_dict())
            for name in ("q_proj", "k_proj", "v_proj"):
                weight = state[f"self_attn.{name}.weight"]  # (out, H) -> (out, 2H): [embeddings | g]
                state[f"self_attn.{name}.weight"] = torch.cat([torch.zeros_like(weight), weight], dim=1)
            first.load_state_dict(state)
            head.hidden_norm.load_state_dict(last.input_layernorm.state_dict())
            head.body.norm.load_state_dict(target.model.norm.state_dict())
            head.fuse.weight.zero_()
            high = max(range(len(fused)), key=lambda i: fused[i])
            head.fuse.weight[:, high * hidden : (high + 1) * hidden] = torch.eye(hidden)
        return head

    def fuse_features(self, features: Tensor) -> Tensor:
        """``(..., feature_width)`` target features -> ``(..., H)`` ``g``."""
        if self.input_norm is not None:
            features = self.input_norm(features)
        if self.fc_norm is not None:
            chunks = features.chunk(len(self.fc_norm), dim=-1)
            features = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks)], dim=-1)
        return self.fuse(features)

    def forward(self, states: Tensor, embeds: Tensor, position_ids: Tensor, cache: DynamicCache | None = None,
                attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        """``states, embeds: (B, T, H)`` -> ``(B, T, H)`` the output states (pre-norm; normed with
        ``norm_output``)."""
        embeds = embeds.to(states.dtype)
        first, *rest = self.body.layers
        position_embeddings = self.body.rotary_emb(states, position_ids)
        normed = self.hidden_norm(states)
        x = torch.cat([first.input_layernorm(embeds), normed], dim=-1)  # (B, T, 2H)
        attn = first.self_attn(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, use_cache=cache is not None, position_embeddings=position_embeddings,
                               **kwargs)[0]
        h = (normed if self.norm_before_residual else states) + attn
        h = h + first.mlp(first.post_attention_layernorm(h))
        for layer in rest:
            h = layer(h, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      use_cache=cache is not None, position_embeddings=position_embeddings, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
        return self.body.norm(h) if self.norm_output else h

    def logit_states(self, states: Tensor) -> Tensor:
        return states if self.norm_output else self.body.norm(states)


def own_output_head(rows: Tensor, vocab: Tensor | None, like: nn.Module) -> nn.Linear:
    """A ``(V, H)`` output head holding a drafter's own ``rows (N, H)`` at the ids ``vocab`` (``None``: all V
    rows given), zero elsewhere (never scored: :class:`ReducedHead` keeps only ``vocab``)."""
    weight = like.weight
    expected = tuple(weight.shape) if vocab is None else (len(vocab), weight.shape[1])
    if tuple(rows.shape) != expected:
        raise ValueError(f"the drafter's own output head is {tuple(rows.shape)}, but {expected} fits its "
                         f"{weight.shape[0] if vocab is None else len(vocab)} ids on this target (output head "
                         f"{tuple(weight.shape)}): the head was made for another target")
    full = rows.to(device=weight.device, dtype=weight.dtype)
    if vocab is not None:
        full = weight.new_zeros(weight.shape).index_copy_(0, vocab.long().to(weight.device), full)
    head = nn.Linear(full.shape[1], full.shape[0], bias=False, device=full.device, dtype=full.dtype)
    head.weight.data = full
    return head


def ttt_mask(n: int, step: int, valid: Tensor | None = None) -> Tensor:
    """EAGLE-3's training-time-test attention at unroll ``step``: ``(B, 1, n, (step + 1) n)`` bool.

    Keys are laid out step after step (``n`` per step); query ``j`` of step ``step`` sees the true
    prefix (step-0 keys ``i <= j``, valid ones only) and its own earlier predicted steps (key ``j`` of
    each step ``1 .. step``) -- exactly what the node at depth ``step`` below position ``j`` sees when
    drafting. ``valid``: ``(B, n)`` real (non-padded) positions.
    """
    valid = torch.ones(1, n, dtype=torch.bool) if valid is None else valid.bool()
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    prefix = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    prefix = (prefix[None] & valid[:, None, :]) | eye[None]  # (B, n, n): padded keys hidden, never a query's own
    return torch.cat([prefix] + [eye[None].expand(len(valid), -1, -1)] * step, dim=2)[:, None]


class Int8Linear(nn.Module):
    """A CPU ``nn.Linear`` in int8 for drafting: weights quantized per output row, activations per call
    (fbgemm's dynamic quantization). Inference only; relative error about 1e-2."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().cpu()
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scale = (weight.abs().amax(dim=1).clamp(min=1e-8) / 127).double()
        with warnings.catch_warnings():  # the quantized-tensor constructors warn that they are deprecated
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, bias)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()  # (N, in)
        out = torch.ops.quantized.linear_dynamic(flat, self._packed, True)  # reduce_range: safe on every x86
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantized(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``nn.Linear`` as :class:`Int8Linear` (``module`` itself if it is not on
    CPU or the int8 kernels are unavailable: quantization only ever changes the draft's rounding)."""
    param = next(module.parameters(), None)
    if param is None or param.device.type != "cpu" or not hasattr(torch.ops.quantized, "linear_dynamic"):
        return module
    copied = copy.deepcopy(module)
    try:
        for child in list(copied.modules()):
            for attr, leaf in list(child.named_children()):
                if type(leaf) is nn.Linear:
                    setattr(child, attr, Int8Linear(leaf))
    except (RuntimeError, NotImplementedError):  # no quantized engine in this torch build
        return module
    return copied


class DraftLMHead(nn.Module):
    """The output head a drafter scores with: ``(..., H) -> (..., V)``, ``-inf`` off the reduced vocabulary
    (as :class:`~specdec.drafters.vocab.ReducedHead`), in int8 when ``int8``."""

    def __init__(self, head: ReducedHead, int8: bool) -> None:
        super().__init__()
        self.head = head
        self.vocab_size = head.vocab_size
        self.int8 = None
        if int8 and head.weight.device.type == "cpu" and hasattr(torch.ops.quantized, "linear_dynamic"):
            linear = nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=head.bias is not None)
            linear.weight.data = head.weight
            if head.bias is not None:
                linear.bias.data = head.bias
            self.int8 = Int8Linear(linear)

    def forward(self, hidden: Tensor) -> Tensor:
        if self.int8 is None:
            return self.head(hidden)
        scores = self.int8(hidden)
        if self.head.token_ids is None:
            return scores
        full = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.head.token_ids, scores)


class EagleNet(DraftNetwork):
    """The head as the draft network: a ragged cache of entries made from the target's true features,
    caught up each step on the pairs ``(features_j, x_{j+1})`` it has not fed; tree nodes feed their
    parent's output state and are dropped after the step."""

    def __init__(self, head: EagleHead, embed: nn.Module, lm: nn.Module, view: TargetView) -> None:
        super().__init__(view, served=head.body, cached=head.body)
        self.head, self.embed, self.lm = head, embed, lm
        self.needs = Needs(hidden=True, layers=head.fused_layers or (-1,))  # EAGLE-3: these layers side by side
        self.pending: dict[int, tuple[Tensor, Tensor]] = {}  # row -> (features (m, F), the tokens after them (m,))
        self.seen: dict[int, int] = {}  # row -> tokens of the row accounted for in pending/cache
        self.states: Tensor | None = None  # (A, 1 + N, H): the root's and every node's output state
        self.dtype = head.body.get_input_embeddings().weight.dtype

    def _check(self, hidden: Tensor) -> None:
        if hidden.shape[-1] != self.head.feature_width:
            layers = self.head.fused_layers or (-1,)
            raise ValueError(f"the EAGLE head reads target hidden states {list(layers)} side by side (width "
                             f"{self.head.feature_width}) but got width {hidden.shape[-1]}: the proposer's "
                             "needs did not reach the engine (a wrapper drafter must pass its parts' "
                             "Proposer.needs on, combined with Needs.combine)")

    def prefill(self, states: list[DecodeState], verified: list[Verified]) -> None:
        super().prefill(states, verified)
        for s, seen in zip(states, verified):  # elements (f_j, x_{j+1}) for the prompt: features of all but the root
            self._check(seen.hidden)
            self.pending[s.row] = (seen.hidden, s.tokens[0, 1:])
            self.seen[s.row] = s.tokens.shape[1]

    def _forward(self, states: Tensor, tokens: Tensor, positions: Tensor, ancestors: Tensor,
                 key_positions: Tensor) -> Tensor:
        device = self.device
        embeds = self.embed(tokens.to(device))
        return self.through_tree(self.head, ancestors, key_positions, states.to(device=device, dtype=self.dtype),
                                 embeds, positions.to(device), self.cache.cache)  # (A, T, H)

    def root(self, states: list[DecodeState], depths: list[int]) -> Tensor:
        pend = [self.pending[s.row] for s in states]
        feed = self.catch_up(torch.tensor([len(toks) for _, toks in pend]))
        device = self.device
        root = self.embed(torch.cat([s.tokens[:, -1] for s in states]).to(device)).to(self.dtype)  # (A, H)
        if feed.valid.shape[1]:
            feats = feed.place([f.to(device=device, dtype=self.dtype) for f, _ in pend])  # (A, M, F)
            tokens = feed.place([toks.cpu() for _, toks in pend])  # (A, M)
            out = self._forward(self.head.fuse_features(feats), tokens, feed.positions, feed.ancestors,
                                feed.positions)  # (A, M, H)
            self.keep_fed(feed)
            fed = (feed.counts > 0).to(device)[:, None]
            root = torch.where(fed, out[:, -1], root)  # a one-token prompt: its embedding stands in
        for s in states:
            f, toks = self.pending[s.row]
            self.pending[s.row] = (f[:0], toks[:0])
        self.tree_start = self.cache.length
        self.states = root[:, None]
        return self.lm(self.head.logit_states(root))  # (A, V)

    def expand(self, level: Level) -> Tensor:
        device = self.states.device
        index = (level.parents + 1).to(device)[:, :, None].expand(-1, -1, self.states.shape[2])
        parent_states = self.states.gather(1, index)
        positions, keys = self.level_positions(level)
        out = self._forward(parent_states, level.tokens, positions, level.ancestors, keys)
        index = (level.nodes + 1).to(device)  # (A, F) slots in states
        width = max(self.states.shape[1], int(index.max()) + 1)
        if width > self.states.shape[1]:
            grown = self.states.new_zeros(self.states.shape[0], width, self.states.shape[2])
            grown[:, : self.states.shape[1]] = self.states
            self.states = grown
        self.states.scatter_(1, index[:, :, None].expand(-1, -1, out.shape[2]), out)
        return self.lm(self.head.logit_states(out))  # (A, F, V)

    def commit(self, states: list[DecodeState], fed: dict[int, list[int]], verified: list[Verified]) -> None:
        self.keep_tree(fed)  # the tree's entries came from predicted states
        for state, seen in zip(states, verified):
            if state.row not in self.seen:
                continue
            self._check(seen.hidden)
            appended = state.tokens.shape[1] - self.seen[state.row]
            m = min(len(seen.hidden), appended)  # features of root + accepted nodes, each followed by a token
            feats, toks = self.pending[state.row]  # not fed yet when this row did not draft (Combined's fallback)
            start = self.seen[state.row]
            self.pending[state.row] = (torch.cat([feats, seen.hidden[:m]]),
                                       torch.cat([toks, state.tokens[0, start : start + m]]))
            self.seen[state.row] = state.tokens.shape[1]
        self.states = None
        for s in states:
            if s.finished:
                self.pending.pop(s.row, None)
                self.seen.pop(s.row, None)
        self.drop_finished(states)


class Eagle(ModelDrafter):
    """An EAGLE head proposing chains or trees (``k``, ``top_k``, ``width``, ``budget``, ``tree`` as in
    :class:`~specdec.drafters.DraftModel`); EAGLE-3 or EAGLE-1 as the head is (:class:`EagleHead`).

    Args:
        head: the trained :class:`EagleHead`.
        vocab: token ids its output head scores (``None``: all); see :mod:`specdec.drafters.vocab`.
        checkpoint: the loaded checkpoint, whose target fingerprint is enforced (``None``: an
            untrained head, any target).
        quantize: on CPU, draft with int8 copies of the head's and the output head's linear maps
            (:class:`Int8Linear`: about half the draft's cost per depth on SmolLM2-135M; the target's output
            is unchanged, only the draft's rounding; the configs turn it on).
        lm_head: ``(N, H)`` the head's own output rows for ``vocab`` (an imported head's, which may be trained);
            ``None``: the target's output head, as specdec trains.
    """

    def __init__(self, head: EagleHead, vocab: Tensor | None = None, checkpoint: dict | None = None, k: int = 4,
                 top_k: int = 1, width: int | None = None, budget: int | None = None,
                 tree: TreeSpec | list[list[int]] | None = None, quantize: bool = False,
                 lm_head: Tensor | None = None) -> None:
        if not isinstance(head, EagleHead):
            raise ValueError(f"Eagle needs an EagleHead, got {type(head).__name__}: use Eagle.from_checkpoint(...)")
        super().__init__(k, top_k, width, budget, tree, checkpoint)
        self.head, self.vocab, self.quantize = head.eval(), vocab, quantize
        self.lm_head = lm_head  # (N, H) an imported head's own output rows for vocab; None: the target's

    kind = "eagle"
    default_checkpoint = "eagle-smollm2-135m"

    @classmethod
    def from_loaded(cls, checkpoint: dict, **kwargs) -> Eagle:
        config = dict(checkpoint["settings"]["target_config"])
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        fused = checkpoint["settings"].get("fused_layers")
        if checkpoint["settings"].get("layout") == "reference":  # ReferenceEagle3Head, with its switches
            head = ReferenceEagle3Head(config, fused, **checkpoint["settings"].get("layout_options", {}))
        else:
            head = EagleHead(config, fused)
        load_weights(head, checkpoint)
        return cls(head, checkpoint["vocab"], checkpoint, **kwargs)

    @classmethod
    def checkpoint_settings(cls, target: PreTrainedModel, settings) -> dict:
        fused = None if settings.fused_layers is None else list(settings.fused_layers)
        out = {"target_config": target.config.to_dict(), "fused_layers": fused}
        if getattr(settings, "layout", "specdec") == "reference":  # ReferenceEagle3Head, default switches
            out["layout"] = "reference"
        return out

    def bind(self, target: torch.nn.Module) -> tuple[EagleHead, nn.Module]:
        if self.head.eagle3:
            check_fused_layers(self.head.fused_layers, target.config.get_text_config().num_hidden_layers)
        head = module_for(self.head, target)
        out = target.get_output_embeddings()
        lm = ReducedHead(out if self.lm_head is None else own_output_head(self.lm_head, self.vocab, out), self.vocab)
        if self.quantize:
            head = quantized(head)
        return head, DraftLMHead(lm, self.quantize)

    def network(self, bound: tuple[EagleHead, nn.Module], view: TargetView) -> EagleNet:
        head, lm = bound
        prepare(head.body, view)
        prepare(head, view)
        return EagleNet(head, view.model.get_input_embeddings(), lm, view)
