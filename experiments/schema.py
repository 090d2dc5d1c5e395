"""Typed schemas of the experiment configs, registered in Hydra's ConfigStore.

``configs/config.yaml`` starts from ``base_config``, so a misspelt key or a value of the
wrong type fails at composition, before any model loads, with Hydra naming the key.
:func:`validate` then checks the ranges a type cannot express.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from specdec.options import LINEAR_BACKENDS
from specdec_kernels.tree_attention.ops import BACKENDS

LOGGERS = ("none", "csv", "wandb")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # embedded default, a .gguf file, a HF directory or a cached hub id
    dtype: str = "float32"


@dataclass
class DatasetConfig:
    name: str = "spec_bench_sample"
    path: Optional[str] = None  # None: data/spec_bench/question.jsonl; else any JSONL of prompts
    per_task: Optional[int] = 3  # a fixed sample per task; None: every prompt
    seed: int = 0
    tasks: Optional[list[str]] = None  # only these tasks (e.g. [mt_bench]); None: all
    all_turns: bool = False  # multi-turn prompts as conversations (MT-bench's two turns)


@dataclass
class TreeConfig:
    name: str = "chain"
    depth: int = 10
    branches: int = 1
    top_k: int = 1
    width: int = 1
    budget: Optional[int] = None


@dataclass
class SamplingConfig:
    name: str = "greedy"
    do_sample: bool = False
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None


@dataclass
class LoggerConfig:
    kind: str = "csv"  # none | csv | wandb
    project: str = "specdec"
    mode: str = "offline"  # W&B: offline (sync later with `wandb sync`), online, disabled


@dataclass
class VllmConfig:
    # name -> vLLM --speculative-config (null: plain decoding), each run as vllm_<name>; {}: no vLLM peer
    methods: Any = field(default_factory=dict)
    venv: str = ".venv-vllm"  # made by `make vllm-env`; missing: the methods are skipped with one line
    cache_dir: str = "outputs/peers"  # the model converted to a Hugging Face directory once, reused
    startup_timeout_s: int = 900
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE per server


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    drafter: Any = MISSING  # a drafter config: name, _target_ and its arguments
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    max_new_tokens: int = 128
    threads: int = 2
    batch_size: int = 1
    attention_backend: str = "auto"
    min_verify_tokens: int = 1  # pad verification forwards with drafts to this many tokens (a CPU speed knob)
    linear_backend: str = "auto"  # the engine's linear layers: auto/skinny ((W @ x.T).T on CPU) or torch
    hf_prompt_lookup_num_tokens: int = 10
    prompt_lookup_k: int = 5  # specdec's prompt lookup beside the drafter (0: off; skipped when it is the drafter)
    hf_assistant: Optional[str] = None  # a distilled draft checkpoint run as transformers' assistant_model
    hf_static_compiled: bool = False  # model.generate with a static cache + torch.compile (compiles per prompt length)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    progress: bool = True
    variants: Any = field(default_factory=dict)


@dataclass
class DistillConfig:
    gsm8k_prompts: int = 400  # GSM8K training questions
    self_prompts: int = 240  # prompts the target writes itself on varied topics
    rag_prompts: int = 0  # retrieval-style rows: passages the target wrote, then a question (Spec-Bench's RAG)
    max_new_tokens: int = 192  # length of the target's answers
    batch_size: int = 48  # prompts per generate() call while building the set
    seed: int = 0
    teacher_layers: list[int] = field(default_factory=lambda: [6])  # hidden states kept besides the last (early exit)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    drafter: Any = MISSING  # a drafter config with a `train` block (specdec.training.train.TrainSettings fields)
    data: DistillConfig = field(default_factory=DistillConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    threads: int = 2
    output: Optional[str] = None  # None: where the drafter config loads its checkpoint
    decode_prompts: int = 4  # held-out prompts decoded with the trained drafter (0: none)
    decode_max_new_tokens: int = 96


def register() -> None:
    """Put the schemas in Hydra's ConfigStore as ``base_config`` and ``train_base_config``."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)
    ConfigStore.instance().store(name="train_base_config", node=TrainConfig)


def validate_training(cfg: DictConfig):
    """Check a training config; returns the drafter's :class:`~specdec.training.train.TrainSettings`."""
    from specdec.training.train import KINDS, TrainSettings

    if cfg.drafter.get("name") not in KINDS:
        raise ValueError(f"config drafter={cfg.drafter.get('name')!r} cannot be trained: use one of {KINDS}")
    if "train" not in cfg.drafter or "checkpoint" not in cfg.drafter:
        raise ValueError(f"config drafter={cfg.drafter.name} needs a `train` block and a `checkpoint` name")
    block = OmegaConf.to_container(cfg.drafter.train, resolve=True)
    known = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ValueError(f"config drafter.train.{unknown[0]} is not a training setting: use one of {sorted(known)}")
    for name in ("init_layers", "skip_families"):
        if name in block:
            block[name] = tuple(block[name])
    settings = TrainSettings(**block)
    checks = [
        ("threads", cfg.threads >= 1, ">= 1"),
        ("drafter.train.epochs", settings.epochs > 0, "> 0"),
        ("drafter.train.steps", settings.steps >= 0, ">= 0 (0: from epochs)"),
        ("drafter.train.lr", settings.lr > 0, "> 0"),
        ("drafter.train.batch_size", settings.batch_size >= 1, ">= 1"),
        ("drafter.train.seq_len", settings.seq_len >= 2, ">= 2"),
        ("drafter.train.vocab", settings.vocab >= 0, ">= 0 (0: the full vocabulary)"),
        ("drafter.train.holdout", settings.holdout >= 1, ">= 1"),
        ("drafter.train.unroll", settings.unroll >= 1, ">= 1"),
        ("drafter.train.heads", settings.heads >= 1, ">= 1"),
        ("drafter.train.layers", settings.layers >= 1, ">= 1"),
        ("drafter.train.lookup_weight", settings.lookup_weight >= 0, ">= 0 (1: every label alike)"),
        ("drafter.train.loop_ngram", settings.loop_ngram == 0 or settings.loop_ngram >= 2, "0 (off) or >= 2"),
        ("data.gsm8k_prompts", cfg.data.gsm8k_prompts + cfg.data.self_prompts >= 2, "with self_prompts, >= 2"),
        ("decode_prompts", 0 <= cfg.decode_prompts <= settings.holdout, f"in [0, holdout={settings.holdout}]"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"config {key}={_get(cfg, key)!r} is invalid: it must be {want}")
    return settings


def validate(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Ranges and choices the types cannot express, the sampling settings as ``generate`` would check
    them, and the ``tree.*`` settings among ``overrides`` (the command line's) that no drafter of the run
    reads; raises ``ValueError`` naming the key, before any model loads."""
    _validate_tree_overrides(cfg, overrides)
    checks = [
        ("max_new_tokens", cfg.max_new_tokens >= 1, ">= 1"),
        ("threads", cfg.threads >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("min_verify_tokens", cfg.min_verify_tokens >= 1, ">= 1"),
        ("hf_prompt_lookup_num_tokens", cfg.hf_prompt_lookup_num_tokens >= 0, ">= 0 (0 turns it off)"),
        ("prompt_lookup_k", cfg.prompt_lookup_k >= 0, ">= 0 (0 turns it off)"),
        ("attention_backend", cfg.attention_backend in BACKENDS, f"one of {BACKENDS}"),
        ("linear_backend", cfg.linear_backend in LINEAR_BACKENDS, f"one of {LINEAR_BACKENDS}"),
        ("logger.kind", cfg.logger.kind in LOGGERS, f"one of {LOGGERS}"),
        ("logger.mode", cfg.logger.mode in ("offline", "online", "disabled"), "offline, online or disabled"),
        ("dataset.per_task", cfg.dataset.per_task is None or cfg.dataset.per_task >= 1, ">= 1 or null"),
        ("tree.depth", cfg.tree.depth >= 1, ">= 1"),
        ("tree.branches", cfg.tree.branches >= 1, ">= 1"),
        ("tree.top_k", cfg.tree.top_k >= 1, ">= 1"),
        ("tree.width", cfg.tree.width >= 1, ">= 1"),
        ("tree.budget", cfg.tree.budget is None or cfg.tree.budget >= 1, ">= 1 or null"),
        ("drafter", "_target_" in cfg.drafter and "name" in cfg.drafter, "a config with name and _target_"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"config {key}={_get(cfg, key)!r} is invalid: it must be {want}")
    _validate_sampling(cfg)
    _validate_vllm(cfg)
    reserved = {"no_draft": "the engine without a drafter"}
    if beside_prompt_lookup(cfg):
        reserved["prompt_lookup"] = "the prompt lookup run beside the drafter (set prompt_lookup_k=0 to drop it)"
    reserved[cfg.drafter.name] = "drafter.name"
    for name, variant in cfg.variants.items():
        if name in reserved:
            raise ValueError(f"config variants.{name} has the name of {reserved[name]}: both would report as "
                             f"specdec_{name}; rename the variant")
        if "_target_" not in variant:
            raise ValueError(f"config variants.{name} has no _target_: give the drafter class to build")
        if variant.get("linear_backend", "auto") not in LINEAR_BACKENDS:
            raise ValueError(f"config variants.{name}.linear_backend={variant.linear_backend!r} is invalid: "
                             f"it must be one of {LINEAR_BACKENDS}")


def _validate_vllm(cfg: DictConfig) -> None:
    """The vLLM peer's settings: a mapping of names to a speculative config with a ``method`` (or null)."""
    v = cfg.vllm
    if not isinstance(v.methods, (dict, DictConfig)):
        raise ValueError(f"config vllm.methods={v.methods!r} is invalid: it must map names to a speculative config "
                         "(or null for plain decoding)")
    for name, spec in v.methods.items():
        if spec is not None and (not isinstance(spec, (dict, DictConfig)) or "method" not in spec):
            raise ValueError(f"config vllm.methods.{name}={spec!r} is invalid: give vLLM's --speculative-config as a "
                             "mapping with `method` (ngram, suffix, ...), or null for plain decoding")
    checks = [("vllm.startup_timeout_s", v.startup_timeout_s >= 1, ">= 1"),
              ("vllm.kv_cache_gib", v.kv_cache_gib >= 1, ">= 1")]
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"config {key}={_get(cfg, key)!r} is invalid: it must be {want}")


def _validate_sampling(cfg: DictConfig) -> None:
    """The sampling group as :class:`specdec.Sampling` checks it (temperature > 0, top_k >= 0, top_p in (0, 1])."""
    from specdec.sampling import Sampling

    s = cfg.sampling
    try:
        Sampling(do_sample=s.do_sample, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    except ValueError as err:
        raise ValueError(f"config sampling.{err}") from err


def _validate_tree_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """A ``tree.<key>`` override that neither the drafter nor any variant reads (as ``${tree.<key>}``), or a
    ``tree=<shape>`` choice when none reads any tree setting, would be silently ignored: refuse it."""
    text = json.dumps([OmegaConf.to_container(cfg.drafter, resolve=False),
                       OmegaConf.to_container(cfg.variants, resolve=False)])
    read = {f.name for f in fields(TreeConfig) if "${tree." + f.name + "}" in text}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "tree" and not read:
            raise ValueError(f"config tree={value} is not read by drafter {cfg.drafter.name} (nor any variant): its "
                             "settings are in its own config (e.g. drafter.k, drafter.top_k); drop tree=")
        if key.startswith("tree.") and key.removeprefix("tree.") not in read:
            name = key.removeprefix("tree.")
            raise ValueError(f"config {key}={value} is not read by drafter {cfg.drafter.name} (nor any variant): "
                             + (f"set drafter.{name} instead" if name in cfg.drafter else
                                f"drafter {cfg.drafter.name} reads tree.{', tree.'.join(sorted(read))}" if read
                                else "it reads no tree.* setting"))


def beside_prompt_lookup(cfg: DictConfig) -> bool:
    """Whether specdec's prompt lookup runs beside the drafter (``prompt_lookup_k`` > 0, another drafter)."""
    return cfg.prompt_lookup_k > 0 and cfg.drafter.name != "prompt_lookup"


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node
