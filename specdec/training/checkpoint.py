"""Trained drafter checkpoints: weights, the settings that rebuild the module, and the target they
were trained for.

A checkpoint stores a *fingerprint* of its target (architecture plus the signs of a strided sample
of every weight); a drafter refuses to run against any other target, since its heads read that
target's hidden states. Shipped checkpoints live in ``specdec/checkpoints/`` and load by name
(``"eagle-smollm2-135m"``); any path to a ``.pt`` file works too. Matrices are stored as int8 with
a float16 scale per row (small enough to commit; drafts only, so the output is unaffected), the
rest in float16; loading gives float32 back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import PreTrainedModel

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"


def fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the target: its architecture, every weight's name and shape, and the signs of a
    strided sample of each weight (signs survive a cast, so the same weights in float32 or bfloat16
    agree, while any other training run differs almost surely)."""
    h = hashlib.sha256()
    config = model.config
    h.update(json.dumps([config.model_type, config.vocab_size, config.hidden_size, config.num_hidden_layers]).encode())
    for name, param in sorted(model.state_dict().items()):
        sample = param.detach().flatten()[:: max(1, param.numel() // 256)][:256].float()
        h.update(name.encode())
        h.update(str(tuple(param.shape)).encode())
        h.update(torch.sign(sample).to(torch.int8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_path(name_or_path: str | Path) -> Path:
    """A shipped checkpoint's name, or a path to a ``.pt`` file."""
    path = Path(name_or_path)
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"drafter checkpoint {str(path)!r} does not exist")
        return path
    shipped = SHIPPED / f"{name_or_path}.pt"
    if not shipped.is_file():
        names = sorted(p.stem for p in SHIPPED.glob("*.pt"))
        raise FileNotFoundError(
            f"no shipped drafter checkpoint {str(name_or_path)!r}: shipped ones are {names}; train one with "
            "`python -m experiments.train_drafter drafter=<eagle|medusa|early_exit|draft_model|pard|block>` or give a .pt path"
        )
    return shipped


def save_checkpoint(path: str | Path, kind: str, state: dict[str, torch.Tensor], settings: dict,
                    target: PreTrainedModel, vocab: torch.Tensor | None, target_name: str,
                    metrics: dict | None = None) -> Path:
    """Write a checkpoint: the trained weights ``state`` (packed), the ``settings`` that rebuild the module,
    the reduced vocabulary and the target's fingerprint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "kind": kind,
        "settings": settings,
        "state_dict": pack(state),
        "vocab": None if vocab is None else vocab.to(torch.int32),
        "target_fingerprint": fingerprint(target),
        "target_name": target_name,
        "metrics": metrics or {},
    }, path)
    return path


KEYS = ("kind", "settings", "state_dict", "vocab", "target_fingerprint", "target_name", "metrics")
SETTINGS = {  # what each kind's from_checkpoint reads from its settings
    "eagle": ("target_config",),
    "early_exit": ("hidden", "layers"),
    "medusa": ("hidden", "heads"),
    "draft_model": ("init_layers",),
    "pard": ("init_layers",),
    "block": ("target_config", "fused_layers", "layers", "block"),
}


def load_checkpoint(name_or_path: str | Path, kind: str) -> dict:
    """Read a checkpoint of drafter ``kind``. Raises ``ValueError`` naming the file when it cannot be read
    (truncated, corrupted, not a torch file), is not a specdec checkpoint, holds another kind, or lacks a
    setting its kind needs."""
    path = checkpoint_path(name_or_path)
    retrain = f"retrain it with `python -m experiments.train_drafter drafter={kind}` or give another file"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        raise ValueError(f"drafter checkpoint {str(path)!r} cannot be read ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'}): the file is truncated, "
                         f"corrupted or not a torch file; {retrain}") from err
    missing = [key for key in KEYS if key not in ckpt] if isinstance(ckpt, dict) else list(KEYS)
    if missing:
        raise ValueError(f"{str(path)!r} is not a specdec drafter checkpoint (it lacks {', '.join(missing)}): "
                         f"{retrain}")
    if ckpt["kind"] != kind:
        raise ValueError(f"checkpoint {str(path)!r} holds a {ckpt['kind']!r} drafter, not {kind!r}")
    settings = ckpt["settings"] if isinstance(ckpt["settings"], dict) else {}
    lacking = [key for key in SETTINGS.get(kind, ()) if key not in settings]
    if lacking:
        raise ValueError(f"checkpoint {str(path)!r} has bad settings: a {kind} checkpoint needs "
                         f"{', '.join(lacking)}; {retrain}")
    ckpt["path"] = str(path)
    ckpt["state_dict"] = unpack(ckpt["state_dict"])
    return ckpt


def load_weights(module: torch.nn.Module, ckpt: dict) -> None:
    """``module.load_state_dict(ckpt["state_dict"])``, strict; a weight missing, unexpected or of another
    shape is a ``ValueError`` naming the file."""
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise ValueError(f"checkpoint {ckpt['path']!r} does not fit its {ckpt['kind']} drafter ({detail}); retrain "
                         f"it with `python -m experiments.train_drafter drafter={ckpt['kind']}`") from err


def pack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices to int8 rows with a float16 absmax scale each; other floats to float16."""
    out = {}
    for name, value in state.items():
        value = value.detach().cpu()
        if value.is_floating_point() and value.dim() == 2:
            scale = value.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127
            out[f"{name}::int8"] = (value.float() / scale).round().clamp(-127, 127).to(torch.int8)
            out[f"{name}::scale"] = scale.to(torch.float16)
        else:
            out[name] = value.to(torch.float16) if value.is_floating_point() else value
    return out


def unpack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack`, in float32."""
    out = {}
    for name, value in state.items():
        if name.endswith("::int8"):
            base = name.removesuffix("::int8")
            if f"{base}::scale" not in state:
                raise ValueError(f"checkpoint weight {base!r} has no scale ({base}::scale): the file is damaged")
            out[base] = value.float() * state[f"{base}::scale"].float()
        elif not name.endswith("::scale"):
            out[name] = value.float() if value.is_floating_point() else value
    return out


def check_target(ckpt: dict, target: PreTrainedModel) -> None:
    """Raise ``ValueError`` unless ``target`` is the model the checkpoint was trained for."""
    mine = fingerprint(target)
    if mine != ckpt["target_fingerprint"]:
        raise ValueError(
            f"drafter checkpoint {ckpt['path']!r} was trained for target {ckpt['target_name']!r} (fingerprint "
            f"{ckpt['target_fingerprint']}), but this target's fingerprint is {mine}: its heads read that target's "
            f"hidden states, so train one for this target with `python -m experiments.train_drafter "
            f"drafter={ckpt['kind']} model.name=<this model>`"
        )
