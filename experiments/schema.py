"""Typed schemas of the experiment configs, registered in Hydra's ConfigStore.

``configs/config.yaml`` starts from ``base_config``, so a misspelt key or a value of the
wrong type fails at composition, before any model loads, with Hydra naming the key.
:func:`validate` then checks the ranges a type cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

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
    hf_prompt_lookup_num_tokens: int = 10
    progress: bool = True
    variants: Any = field(default_factory=dict)


def register() -> None:
    """Put the schema in Hydra's ConfigStore as ``base_config``."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def validate(cfg: DictConfig) -> None:
    """Ranges and choices the types cannot express; raises ``ValueError`` naming the key."""
    checks = [
        ("max_new_tokens", cfg.max_new_tokens >= 1, ">= 1"),
        ("threads", cfg.threads >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("hf_prompt_lookup_num_tokens", cfg.hf_prompt_lookup_num_tokens >= 0, ">= 0 (0 turns it off)"),
        ("attention_backend", cfg.attention_backend in BACKENDS, f"one of {BACKENDS}"),
        ("logger.kind", cfg.logger.kind in LOGGERS, f"one of {LOGGERS}"),
        ("logger.mode", cfg.logger.mode in ("offline", "online", "disabled"), "offline, online or disabled"),
        ("dataset.per_task", cfg.dataset.per_task is None or cfg.dataset.per_task >= 1, ">= 1 or null"),
        ("tree.depth", cfg.tree.depth >= 1, ">= 1"),
        ("tree.budget", cfg.tree.budget is None or cfg.tree.budget >= 1, ">= 1 or null"),
        ("drafter", "_target_" in cfg.drafter and "name" in cfg.drafter, "a config with name and _target_"),
    ]
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"config {key}={_get(cfg, key)!r} is invalid: it must be {want}")
    for name, variant in cfg.variants.items():
        if "_target_" not in variant:
            raise ValueError(f"config variants.{name} has no _target_: give the drafter class to build")


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node
