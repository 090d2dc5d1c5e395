"""The architecture sweep: a tiny random model of every causal-LM family transformers knows, and the
checks that ``specdec.generate`` serves it exactly or refuses it before decoding.

The list is transformers' own ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (issue 12), so a new release's
families join the sweep without anyone editing it. Each model starts from its config class's
defaults with the common size fields shrunk (:data:`SIZES`), one layer of each layer type its
default has, sliding windows and attention chunks shorter than the test sequences, and its query
and key projections scaled up so attention is far from uniform (:func:`sharpen`). Families whose
defaults need more than that get a few fields in :data:`OVERRIDES`; what still cannot be built or
cannot run a plain ``model.generate`` is reported as "not buildable" with the reason.

:func:`check` runs the four cases on one architecture (a prompt-lookup chain, a draft-model tree,
an adversarial tree that hides the true continuation behind wrong siblings, a left-padded batch),
each against ``model.generate(do_sample=False)`` in float32; for the adversarial tree it also
compares the target's verification logits of the accepted path with a no-cache recompute, and at
the end it checks that plain ``model.generate`` still gives what it gave before specdec ran.
Generation settings that configs carry over from their checkpoints (forced EOS, suppressed
tokens) are cleared: the sweep is about the architecture, both sides decode plain greedy.
``tests/test_architectures.py`` asserts on the outcomes; ``experiments/arch_sweep.py`` prints them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import time
import traceback
import weakref
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import specdec
from specdec.compat import check_servable
from specdec.text import left_pad

ARCHITECTURES: tuple[str, ...] = tuple(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)  # model types, the mapping's order
# variants of a model type, swept beside it: learned positions with a short window (64 positions), where no
# position past the window has an embedding (the goodput controller's cost curve must fit inside it)
VARIANTS: dict[str, tuple[str, dict]] = {
    "gpt2:window64": ("gpt2", {"n_positions": 64}),
    "opt:window64": ("opt", {"max_position_embeddings": 64}),
}
SWEEP: tuple[str, ...] = ARCHITECTURES + tuple(VARIANTS)

VOCAB = 96
WINDOW = 6  # sliding windows and attention chunks: shorter than every test sequence
NEW_TOKENS = 20
PROMPT = [11, 23, 5, 42, 17, 8, 11, 23, 5, 42, 17, 8, 11, 23]  # repeats itself: prompt lookup finds drafts
SHORT_PROMPT = [31, 7, 64, 19, 52, 3, 77]  # the batch's second row, shorter (left-padded)

# config fields shrunk wherever a config class declares them (a field absent from a class is skipped)
SIZES: dict[str, object] = {
    **dict.fromkeys(["hidden_size", "n_embd", "d_model", "n_embed", "emb_dim", "embedding_size", "embedding_dim",
                     "word_embed_proj_dim", "input_embedding_size", "output_embedding_size", "backbone_hidden_size",
                     "router_hidden_size", "hidden_size_global"], 64),
    **dict.fromkeys(["num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
                     "num_decoder_layers", "num_encoder_layers", "depth"], 2),
    **dict.fromkeys(["num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
                     "decoder_attention_heads", "encoder_attention_heads", "num_decoder_attention_heads",
                     "num_encoder_attention_heads", "swa_num_attention_heads", "linear_num_heads"], 4),
    **dict.fromkeys(["num_key_value_heads", "swa_num_key_value_heads", "linear_num_key_heads"], 2),
    **dict.fromkeys(["head_dim", "kv_channels", "dim_head", "attention_head_size", "attention_head_dim",
                     "swa_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim",
                     "mamba_head_dim", "index_head_dim"], 16),
    "linear_num_value_heads": 4,
    **dict.fromkeys(["intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "dff", "dim_ff", "d_inner",
                     "intermediate_size_mlp", "ffn_hidden_size", "feed_forward_size", "dense_intermediate_size",
                     "n_inner", "mamba_d_ssm"], 128),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                     "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size",
                     "shared_intermediate_size"], 32),
    **dict.fromkeys(["vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size"], VOCAB),
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
                     "max_target_positions", "max_source_positions", "position_bias_max_distance"], 256),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k", "top_k_experts"], 2),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "first_k_dense_replace",
                     "num_dense_layers"], 1),
    # multi-head latent attention: keys of 8 + 8 dims, values of 8 (a value head unlike the key head)
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "rotary_dim": 8,
    "index_n_heads": 2, "index_topk": 4, "encoder_hash_byte_group_vocab": 128, "hidden_size_per_layer_input": 8,
    "laurel_rank": 8,
    **dict.fromkeys(["state_size", "mamba_d_state", "ssm_state_size"], 8),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads"], 8),
    **dict.fromkeys(["n_group", "topk_group", "mamba_n_groups", "n_groups"], 1),
}
# shrunk only where the default is set: None means the feature is off (no window, no low-rank query)
SIZES_IF_SET: dict[str, object] = {
    **dict.fromkeys(["sliding_window", "attention_chunk_size", "window_size", "attention_window_size",
                     "sliding_window_size", "local_attention", "local_attention_window_len"], WINDOW),
    "q_lora_rank": 32,
}
QSA_INDEXER = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
               "indexer_compress_ratio": 2}  # an attention budget of 8 tokens: sparse at these lengths
# where a family's defaults need more than the common fields: config kwargs by model type
OVERRIDES: dict[str, dict] = {
    # hybrids whose attention layers sit at indices a 2-layer model does not reach
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "hybrid"], "num_hidden_layers": 3},  # 2 share
    # hybrids whose default is one layer type only, unlike their checkpoints
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # the default leaves layer_types None
    # layouts in fields of their own
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1, "num_hidden_layers": 3,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "gemma3n_text": {"num_hidden_layers": 4, "num_kv_shared_layers": 2,  # the last two reuse the first two's K/V
                     "layer_types": ["sliding_attention", "full_attention"] * 2},
    # fields the defaults leave unset or inconsistent at this size
    "mamba2": {"num_heads": 8},  # SSM heads: hidden 64 * expand 2 = 8 heads * 16
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "reformer": {"attn_layers": ["local", "lsh"], "axial_pos_shape": [16, 16], "axial_pos_embds_dim": [32, 32]},
    "xlstm": {"qk_dim_factor": 1.0},
    "dots3_note": {"num_key_value_heads": 4},
    "dots3_note_text": {"num_key_value_heads": 4},
    "qwen4_exp_text": QSA_INDEXER,
    "qwen4_exp": QSA_INDEXER,
    "xmod": {"default_language": "en_XX"},
    "zaya": {"num_experts_per_tok": 1},
}
# what a failure to build means, for the families where the error alone does not say it
EXPLAINED = {
    "gemma4_assistant": "an assistant head that decodes from its target's shared K/V, not a standalone LM",
    "gemma4_unified_assistant": "an assistant head that decodes from its target's shared K/V, not a standalone LM",
    "musicgen": "an audio decoder whose input_ids are one row per codebook, not a token stream",
    "musicgen_melody": "an audio decoder whose input_ids are one row per codebook, not a token stream",
    "gemma3n": "its vision tower needs timm (gemma3n_text is the same text model)",
}
# lists with one entry per layer: the tiny model keeps one layer of each distinct entry
LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "mlp_layer_types")
# linear layers whose output is a query or a key (or fused q/k/v): scaled up by sharpen()
QK_LINEARS = {"q_proj", "k_proj", "query", "key", "q", "k", "q_lin", "k_lin", "Wq", "Wk", "wq", "wk", "wq_b",
              "c_attn", "query_key_value", "Wqkv", "W_pack", "qkv_proj", "q_a_proj", "q_b_proj",
              "kv_a_proj_with_mqa", "kv_b_proj", "kv_proj", "query_proj", "key_proj", "project_q", "project_k"}
# value and attention-output projections (the latter only inside an attention module): re-drawn at unit gain,
# so attention moves the residual stream as much as the token's own embedding does
VO_LINEARS = {"v_proj", "value", "v", "v_lin", "Wv", "wv", "value_proj", "project_v", "o_proj", "out_lin",
              "attention_out"}
ATTENTION_OUTPUTS = {"out_proj", "dense", "c_proj", "Wo", "wo", "o"}
QK_NORMS = {"q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm", "q_a_layernorm",
            "kv_a_layernorm"}
SHARPNESS = 2.0  # queries and keys of RMS ~2: attention scores of std ~4, far from uniform
MIN_SENSITIVITY = 1e-3  # an early prompt token must move later logits at least this much (relative)
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
               "sep_token_id": 2, "cls_token_id": 1, "mask_token_id": 2, "unk_token_id": 2, "start_token_id": 1}


class NotBuildable(Exception):
    """The tiny model cannot be made or cannot run a plain ``model.generate``; the message says why."""


@dataclass
class Built:
    """One architecture's tiny model, or why there is none."""

    name: str
    model: torch.nn.Module | None = None
    reason: str | None = None  # set when model is None
    vocab: int = 0  # width of the model's logits (the draft's vocabulary)
    layer_types: tuple[str, ...] = ()
    seconds: float = 0.0


def _defaults(cls) -> dict:
    """The config dataclass's field defaults (what ``cls()`` starts from, before ``__post_init__``)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _get(config, name: str):
    """``config.<name>``, or None where the attribute is absent or ambiguous (per-layer heterogeneous configs)."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - heterogeneous configs raise their own error for global per-layer reads
        return None


def _one_of_each(values) -> list:
    return list(dict.fromkeys(values))


def tiny_config_kwargs(cls: type[PreTrainedConfig], overrides: dict | None = None) -> dict:
    """Keyword arguments that shrink ``cls``'s defaults to a tiny model (see the module docstring)."""
    defaults = _defaults(cls)
    default = cls()
    kwargs = {name: value for name, value in SIZES.items() if name in defaults}
    if "kv_lora_rank" in defaults:  # latent attention expands keys and values to every query head
        kwargs.update({name: 4 for name in ("num_key_value_heads",) if name in defaults})
        kwargs.update({name: 8 for name in ("head_dim",) if name in defaults})
    kwargs.update({name: value for name, value in SIZES_IF_SET.items() if defaults.get(name) is not None})
    for name, small in SPECIAL_IDS.items():
        value = _get(default, name)
        if isinstance(value, (list, tuple)) or (isinstance(value, int) and value >= VOCAB):
            kwargs[name] = small
    lists = {name: _one_of_each(_get(default, name)) for name in LAYER_LISTS
             if name in defaults and isinstance(_get(default, name), (list, tuple)) and _get(default, name)}
    if lists:
        n = max(2, *(len(v) for v in lists.values()))
        kwargs.update({name: v + v[-1:] * (n - len(v)) for name, v in lists.items()})
        kwargs.update({name: n for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                       if name in kwargs})
    overrides = dict(overrides or {})
    for name, sub_cls in (getattr(cls, "sub_configs", None) or {}).items():
        sub = _get(default, name)
        if isinstance(sub, PreTrainedConfig):
            kwargs[name] = type(sub)(**tiny_config_kwargs(type(sub), overrides.pop(name, None)))
    kwargs.update(overrides)
    return kwargs


def model_type(name: str) -> str:
    """The model type of a sweep entry (a variant's base type)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def tiny_config(name: str) -> PreTrainedConfig:
    """The tiny config of model type (or variant) ``name``; raises :class:`NotBuildable`."""
    base = model_type(name)
    cls = CONFIG_MAPPING[base]
    model_config = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base]).config_class
    if model_config in (getattr(cls, "sub_configs", None) or {}).values():
        cls = model_config  # a composite config whose causal LM takes only the text config
    try:
        config = cls(**tiny_config_kwargs(cls, {**OVERRIDES.get(base, {}), **VARIANTS.get(name, (base, {}))[1]}))
    except Exception as e:  # noqa: BLE001 - any failure of a config class is the reason it is not buildable
        raise NotBuildable(f"tiny config rejected: {_short(e)}") from e
    config.use_cache = True
    config.is_decoder = True  # BERT-style causal LMs are bidirectional otherwise
    return config


def _short(e: BaseException, n: int = 220) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else ""
    return f"{type(e).__name__}: {text[:n]}"


def _rescale_norm(norm: torch.nn.Module, factor: float) -> bool:
    """Make ``norm``'s output ``factor`` times larger (``w * x`` norms scale w, ``(1 + w) * x`` norms 1 + w)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return False
    probe = torch.randn(3, weight.shape[0])
    before = norm(probe)
    original = weight.detach().clone()
    for candidate in (original * factor, (1 + original) * factor - 1):
        weight.copy_(candidate)
        if torch.allclose(norm(probe), before * factor, rtol=1e-4, atol=1e-5):
            return True
    weight.copy_(original)
    return False


@torch.no_grad()
def sharpen(model: torch.nn.Module, factor: float = SHARPNESS) -> int:
    """Re-draw query and key projections with RMS ``factor`` outputs on unit-RMS inputs (and scale q/k norms
    by ``factor``), so attention weights are far from uniform, and value / output projections at unit gain, so
    what attention reads matters; returns how many modules changed."""
    changed = 0
    for name, module in model.named_modules():
        path = name.split(".")
        leaf = path[-2] if path[-1] == "linear" and len(path) > 1 else path[-1]  # q_proj.linear: a wrapped Linear
        parent = ".".join(path[:-1]).lower()
        gain = factor if leaf in QK_LINEARS else 1.0 if leaf in VO_LINEARS or (
            leaf in ATTENTION_OUTPUTS and ("attn" in parent or "attention" in parent)) else None
        weight = getattr(module, "weight", None)
        if gain is not None and isinstance(weight, torch.nn.Parameter) and weight.dim() == 2:
            fan_in = weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]
            weight.normal_(0.0, gain / fan_in**0.5)
            changed += 1
        elif leaf in QK_NORMS:
            changed += _rescale_norm(module, factor)
        for pname, param in module.named_parameters(recurse=False):  # raw (d_model, H, D) projections (XLNet)
            if param.dim() == 3 and pname in {"q", "k", "v", "o"}:
                param.normal_(0.0, (factor if pname in "qk" else 1.0) / param.shape[0] ** 0.5)
                changed += 1
    return changed


def _layer_types(config: PreTrainedConfig) -> tuple[str, ...]:
    text = config.get_text_config()
    for name in LAYER_LISTS[:3]:
        value = _get(text, name)
        if isinstance(value, (list, tuple)) and value:
            return tuple(str(v) for v in value)
    return ()


@torch.no_grad()
def _logits(model, ids: list[int]) -> Tensor:
    """``(n, V)`` logits of one sequence, no cache, at positions ``0..n-1`` as ``model.generate`` gives them
    (models that count positions from their padding id otherwise start elsewhere)."""
    x = torch.tensor([ids])
    kwargs = {"position_ids": torch.arange(len(ids))[None]} if _takes(model, "position_ids") else {}
    return model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False, **kwargs).logits[0].float()


def _takes(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def reference(model, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """Prompt and ``model.generate(do_sample=False)`` continuation, as one list."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                         eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


_TRUTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {prompt: reference}


def cached_reference(model, ids: list[int]) -> list[int]:
    """:func:`reference` of ``ids`` (``NEW_TOKENS`` new tokens), computed on the first call per model and prompt
    and kept for the process: the sweep's models are built once (:func:`build`) and each test file asks for
    the same truths. The first call comes before specdec runs on the model (each case asks for its truth
    first); :func:`check`'s "afterwards" case recomputes with :func:`reference`, never from here."""
    per_model = _TRUTHS.setdefault(model, {})
    key = tuple(ids)
    if key not in per_model:
        per_model[key] = reference(model, ids)
    return list(per_model[key])


@functools.lru_cache(maxsize=None)
def build(name: str, seed: int = 0) -> Built:
    """Tiny random float32 model of model type ``name`` (cached per process), or the reason there is none."""
    t0 = time.perf_counter()
    try:
        config = tiny_config(name)
        try:
            model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type(name)])
            torch.manual_seed(seed)
            model = model_cls(config).float().eval()
        except Exception as e:  # noqa: BLE001
            raise NotBuildable(f"model construction failed: {_short(e)}") from e
        sharpen(model)
        # generation settings a config carries over from its checkpoints (forced EOS, suppressed tokens) are
        # not the architecture: both generate calls see plain greedy decoding
        model.generation_config = GenerationConfig(**{k: _get(config.get_text_config(), k) for k in
                                                      ("bos_token_id", "eos_token_id", "pad_token_id")})
        default_types, types = set(_layer_types(type(config)())), _layer_types(config)
        if not default_types <= set(types):
            raise NotBuildable(f"tiny config lost layer types {sorted(default_types - set(types))}")
        try:
            logits = _logits(model, PROMPT)
            changed = PROMPT[:1] + [(PROMPT[1] + 1) % VOCAB] + PROMPT[2:]
            moved = (_logits(model, changed)[3:] - logits[3:]).abs().max() / logits.abs().max().clamp(min=1e-6)
            reference(model, PROMPT, new_tokens=2)
        except Exception as e:  # noqa: BLE001
            raise NotBuildable(f"plain forward/generate failed: {_short(e)}") from e
        if not torch.isfinite(logits).all():
            raise NotBuildable("logits are not finite")
        if moved < MIN_SENSITIVITY:
            raise NotBuildable(f"logits ignore an early prompt token (relative change {float(moved):.1e})")
    except NotBuildable as e:
        reason = f"{EXPLAINED[name]} ({e})" if name in EXPLAINED else str(e)
        return Built(name, reason=reason, seconds=time.perf_counter() - t0)
    return Built(name, model, vocab=logits.shape[-1], layer_types=types, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- the checks

@dataclass(frozen=True)
class Outcome:
    """What one case (or one architecture) came to.

    ``kind`` is ``"exact"``, ``"refused"`` (a specdec ``ValueError`` before any token), ``"not buildable"``,
    or one of the failures: ``"WRONG"`` (tokens or verification logits differ) and ``"ERROR"`` (any other
    exception, a ``ValueError`` raised outside specdec, or one raised after tokens were streamed).
    """

    kind: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in ("exact", "refused", "not buildable")

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass
class Report:
    """One architecture's outcome per case, or why it has no model."""

    name: str
    cases: dict[str, Outcome]
    not_buildable: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.cases.values())

    @property
    def outcome(self) -> str:
        """One line: the outcome every case had, else each outcome with its cases."""
        if self.not_buildable is not None:
            return str(Outcome("not buildable", self.not_buildable))
        groups: dict[str, list[str]] = {}  # outcome -> the cases that had it
        for case, outcome in self.cases.items():
            groups.setdefault(str(outcome), []).append(case)
        if len(groups) == 1:
            return next(iter(groups))
        case, first = next(iter(self.cases.items()))
        if all(o.kind == first.kind for o in self.cases.values()):  # details differ (shapes, positions)
            return f"{first} (in {case}; alike in the other cases)"
        return "; ".join(f"{', '.join(cases)}: {outcome}" for outcome, cases in groups.items())


class RecordingStreamer:
    """A streamer that keeps what it was given (transformers' protocol: the prompt first, then new tokens)."""

    def __init__(self, prompt: list[int]) -> None:
        self.prompt, self.puts, self.ended = prompt, [], False

    def put(self, value) -> None:
        self.puts.append(torch.as_tensor(value).flatten().tolist())

    def end(self) -> None:
        self.ended = True

    @property
    def new_tokens(self) -> list[int]:
        puts = self.puts[1:] if self.puts and self.puts[0] == self.prompt else self.puts
        return [t for put in puts for t in put]


class HidingDrafter(specdec.Drafter):
    """An old-style drafter (``propose`` only) that knows each row's true continuation and hides it.

    At every level of its tree, ``wrong`` siblings with wrong tokens come first and the true token last;
    the next level hangs below the true token. With ``ragged``, the truth stops after a depth that varies
    by step and row, and the tree goes on below a wrong token instead, so rows accept different lengths
    and nodes below a rejected one must not leak into anything. A token equal to the truth at its
    position appears only on the true path, so (position, token) identifies the accepted nodes.

    Args:
        truths: per row (``state.row``), prompt and reference continuation, from ``model.generate``.
        vocab: tokens are drawn from ``range(vocab)``.
        depth: levels per tree (capped by ``state.budget``).
        wrong: wrong siblings before the true child at each level.
        ragged: reveal the truth only to a depth that cycles through 0..depth.
    """

    def __init__(self, truths: list[list[int]], vocab: int, depth: int = 4, wrong: int = 12,
                 ragged: bool = False) -> None:
        self.truths, self.vocab, self.depth, self.wrong, self.ragged = truths, vocab, depth, wrong, ragged

    def propose(self, states) -> list[specdec.DraftTree]:
        return [self._tree(state) for state in states]

    def _tree(self, state) -> specdec.DraftTree:
        seq, truth = state.tokens[0].tolist(), self.truths[state.row]
        depth = min(self.depth, state.budget)
        if depth == 0:
            return specdec.DraftTree.empty(state.tokens.device)
        on_track = seq == truth[: len(seq)]  # off track, the output is already wrong: draft noise
        reveal = (len(seq) + state.row) % (depth + 1) if self.ragged else depth
        rng = torch.Generator().manual_seed(1009 * state.row + len(seq))
        tokens, parents, parent = [], [], -1
        for level in range(1, depth + 1):
            right = truth[len(seq) - 1 + level]  # the root sits at position len(seq) - 1
            pool = [t for t in torch.randperm(self.vocab, generator=rng).tolist() if t != right]
            main = right if on_track and level <= reveal else pool[self.wrong]
            tokens += pool[: self.wrong] + [main]
            parents += [parent] * (self.wrong + 1)
            parent = len(tokens) - 1
        return specdec.DraftTree(torch.tensor(tokens), torch.tensor(parents))


class VerificationLogits:
    """Keeps the target's logits of every verification forward: given a ``tree`` keyword, or (for models
    served through their own masks) a 4-D attention mask."""

    def __init__(self, model) -> None:
        self.calls: list[tuple[Tensor | None, Tensor | None, Tensor]] = []
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        mask = kwargs.get("attention_mask")
        if kwargs.get("tree") is not None or (mask is not None and mask.dim() == 4):  # tree attention, or the tree
            self.calls.append((kwargs.get("input_ids"), kwargs.get("position_ids"), output.logits.detach().clone()))

    def remove(self) -> None:
        self._handle.remove()


def compare_logits(model, sequence: list[int], calls) -> Outcome | None:
    """``None`` if every verification logit of a node on ``sequence``'s path (the root and the accepted nodes)
    equals a no-cache forward over ``sequence`` at the same position, else what differs."""
    if not calls:
        return Outcome("ERROR", "no verification forward (a `tree` keyword or a 4-D mask) was seen")
    full = _logits(model, sequence)  # (n, V)
    tol = 1e-4 * max(1.0, float(full.abs().max()))
    worst, where, checked = 0.0, None, 0
    for step, (ids, positions, logits) in enumerate(calls):
        if ids is None or positions is None or ids.shape[0] != 1:
            return Outcome("ERROR", "verification forward without input_ids/position_ids of one row")
        best: dict[int, float] = {}  # position -> smallest error among columns holding the path's token
        for j, (tok, pos) in enumerate(zip(ids[0].tolist(), positions[0].tolist())):
            if pos < len(sequence) and sequence[pos] == tok:
                err = float((logits[0, j].float() - full[pos]).abs().max())
                best[pos] = min(err, best.get(pos, err))
        for pos, err in best.items():
            checked += 1
            if err > worst:
                worst, where = err, (step, pos)
    if checked == 0:
        return Outcome("ERROR", "no verification column held a token of the output")
    if worst > tol:
        recompute = full.argmax(-1)[len(PROMPT) - 1 : -1].tolist() == sequence[len(PROMPT) :]
        note = "" if recompute else "; model.generate itself differs from the no-cache greedy recompute"
        return Outcome("WRONG", f"verification logits differ from a no-cache recompute by {worst:.1e} "
                                f"(> {tol:.0e}) at position {where[1]}, verify step {where[0]}{note}")
    return None


def _origin(e: BaseException) -> str:
    """The file that raised ``e``."""
    frames = traceback.extract_tb(e.__traceback__)
    return os.path.abspath(frames[-1].filename) if frames else "?"


def _where(path: str) -> str:
    """``path`` from its package down (``transformers/cache_utils.py``)."""
    return path.split("site-packages" + os.sep)[-1] if "site-packages" in path else os.path.relpath(path)


def _specdec_dirs() -> tuple[str, ...]:
    """The library's source folders: specdec and its kernels package."""
    packages = [specdec]
    try:
        import specdec_kernels

        packages.append(specdec_kernels)
    except ImportError:
        pass
    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in packages)


def _first_diff(got: list[int], want: list[int]) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"new token {i} is {got[i:i + 1] or 'missing'}, model.generate gives {want[i:i + 1] or 'none'}"


def run_case(model, rows: list[list[int]], truths: list[list[int]], drafter, check_logits: bool = False) -> Outcome:
    """``specdec.generate`` on ``rows`` (left-padded when more than one) against each row's ``truths``."""
    if len(rows) == 1:
        ids, mask = torch.tensor(rows), None
        streamer = RecordingStreamer(rows[0])
    else:
        ids, mask = left_pad([torch.tensor(r) for r in rows], pad_id=0)
        streamer = None
    if check_logits:  # specdec's own one-off probe of the model is not one of this case's verification forwards
        try:
            check_servable(model)
        except ValueError:
            pass  # generate raises it again below, as a refusal
    capture = VerificationLogits(model) if check_logits else None
    try:
        out = specdec.generate(model, ids, drafter, attention_mask=mask, streamer=streamer, do_sample=False,
                               max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    except ValueError as e:
        origin = _origin(e)
        if not origin.startswith(_specdec_dirs()):
            return Outcome("ERROR", f"ValueError raised in {_where(origin)}, not by specdec: {_short(e)}")
        if streamer is not None and streamer.new_tokens:
            return Outcome("ERROR", f"ValueError after {len(streamer.new_tokens)} tokens were streamed: {_short(e)}")
        return Outcome("refused", _short(e).removeprefix("ValueError: "))
    except Exception as e:  # noqa: BLE001 - every other exception is a failure to report, not to raise
        return Outcome("ERROR", f"{_short(e)} (raised in {_where(_origin(e))})")
    finally:
        if capture is not None:
            capture.remove()
    for i, (row, truth) in enumerate(zip(rows, truths)):
        got, want = out[i, ids.shape[1]:].tolist(), truth[len(row):]
        if got != want:
            return Outcome("WRONG", (f"row {i}: " if len(rows) > 1 else "") + _first_diff(got, want))
    if streamer is not None and streamer.new_tokens != truths[0][len(rows[0]):]:
        return Outcome("WRONG", f"the streamer got {streamer.new_tokens}, not the output")
    if capture is not None:
        return compare_logits(model, truths[0], capture.calls) or Outcome("exact")
    return Outcome("exact")


@functools.lru_cache(maxsize=None)
def draft_for(vocab: int) -> LlamaForCausalLM:
    """A tiny independent Llama over ``vocab`` tokens: the draft model of the tree case."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def check(name: str) -> Report:
    """Every case on architecture ``name``; never raises for what the model or specdec does."""
    t0 = time.perf_counter()
    try:
        built = build(name)
    except Exception as e:  # noqa: BLE001 - a bug of this harness: reported as a failure, never as not buildable
        return Report(name, {"build": Outcome("ERROR", f"the sweep's builder failed: {_short(e)}")},
                      seconds=time.perf_counter() - t0)
    if built.model is None:
        return Report(name, {}, not_buildable=built.reason, seconds=time.perf_counter() - t0)
    model, vocab = built.model, built.vocab
    try:
        truth, short_truth = cached_reference(model, PROMPT), cached_reference(model, SHORT_PROMPT)
    except Exception as e:  # noqa: BLE001
        return Report(name, {}, not_buildable=f"model.generate failed: {_short(e)}", seconds=time.perf_counter() - t0)
    cases = {
        "chain": run_case(model, [PROMPT], [truth], specdec.PromptLookup(k=4)),
        "tree": run_case(model, [PROMPT], [truth], specdec.DraftModel(draft_for(vocab), k=3, top_k=2)),
        "adversarial": run_case(model, [PROMPT], [truth], HidingDrafter([truth], vocab), check_logits=True),
        "batch": run_case(model, [PROMPT, SHORT_PROMPT], [truth, short_truth],
                          HidingDrafter([truth, short_truth], vocab, ragged=True)),
    }
    try:  # whatever specdec installed on the model, plain decoding must be unchanged by it
        again = reference(model, PROMPT)
        if again != truth:
            cases["afterwards"] = Outcome("WRONG", "model.generate after specdec.generate: "
                                                   + _first_diff(again[len(PROMPT):], truth[len(PROMPT):]))
    except Exception as e:  # noqa: BLE001
        cases["afterwards"] = Outcome("ERROR", f"model.generate after specdec.generate: {_short(e)}")
    return Report(name, cases, seconds=time.perf_counter() - t0)
