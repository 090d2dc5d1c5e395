"""specdec drafters out to, and in from, vLLM's ``speculators`` checkpoint format.

``speculators`` (PyPI, 0.9.0; the format vLLM and SGLang load) stores a drafter as a Hugging Face-style
directory: ``config.json`` (``speculators_model_type``, the draft layers' ``transformer_layer_config``, the
target as ``speculators_config.verifier``) and ``model.safetensors``. Its types in 0.9.0: ``eagle3``,
``peagle``, ``dflash``, ``dflash2``, ``dspark``, ``mtp``, ``xpress``; no Medusa, no EAGLE-1.

What maps (docs/export.md has the full table):

- **EAGLE-3 in the reference layout** (:class:`~specdec.drafters.eagle.ReferenceEagle3Head`) <-> ``eagle3``,
  exactly: ``fuse`` -> ``fc``, the head's layers -> ``layers.*`` (``hidden_norm`` in the first),
  ``body.norm`` -> ``norm``; the output rows of the reduced vocabulary -> ``lm_head`` with ``d2t`` (draft
  index -> target id offset: ``target = i + d2t[i]``) and ``t2d`` (the target ids kept); ``fused_layers``
  -> ``eagle_aux_hidden_state_layer_ids`` (both index the target's hidden states with 0 = the embeddings:
  vLLM collects id ``k`` as the state after layer ``k - 1``, which is Hugging Face's
  ``output_hidden_states[k]``). The target's input embedding goes in as ``embed_tokens`` so the directory
  loads without the target's weights.
- **EAGLE-3 in specdec's layout** (:class:`~specdec.drafters.eagle.EagleHead`, the shipped
  ``eagle-smollm2-135m``): refused. It projects ``[norm(g) ; norm(e)]`` with ``fc`` before a plain decoder
  layer whose input norm normalizes that mixture; ``eagle3`` feeds ``[norm(e) ; norm(g)]`` straight to
  2H-wide q/k/v with ``g`` as the residual. No ``eagle3`` weights give the same function.
- **Block drafter** (``block``) -> ``dflash``/``dspark``: refused; see :data:`BLOCK_GAP`.
- **Medusa**: refused, the format has no Medusa type.

Import (:func:`load_speculators`): an ``eagle3`` directory becomes an :class:`~specdec.drafters.eagle.Eagle`
drafter over a :class:`~specdec.drafters.eagle.ReferenceEagle3Head`, with the checkpoint's own ``lm_head``
rows (a head trained with its own output head keeps them).

Command line::

    python -m specdec.export <checkpoint name or .pt path> <out dir> --format speculators \\
        [--target NAME] [--verifier HF_ID_OR_DIR] [--dtype float32|bfloat16|float16]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoConfig, PreTrainedModel

from specdec.drafters.eagle import Eagle, EagleHead, ReferenceEagle3Head, default_fused_layers
from specdec.training.checkpoint import check_target, checkpoint_path, load_checkpoint

FORMATS = ("speculators",)
SPECULATORS_VERSION = "0.9.0"  # the release whose format this writes (config fields, weight names)
SPECULATORS_TYPES = ("eagle3", "peagle", "dflash", "dflash2", "dspark", "mtp", "xpress")  # registered in 0.9.0
LAYER_TYPES = ("llama", "qwen3")  # the decoder layers speculators' and vLLM's eagle3 build
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # specdec's embedded targets, by hub id

SPECDEC_LAYOUT_GAP = (
    "specdec's EAGLE-3 layout (EagleHead: fc([norm(g); norm(e)]) -> a plain decoder layer, whose input norm "
    "normalizes that mixture, with fc's output as the residual) is not the reference layout speculators' "
    "eagle3 stores (q/k/v read [input_layernorm(e); hidden_norm(g)] at 2H, the residual is g): no eagle3 "
    "weights compute the same function, since an RMSNorm of the projected pair is not linear in the pair. "
    "Train the head in the reference layout (ReferenceEagle3Head, same training interface) and export that"
)
BLOCK_GAP = (
    "the block drafter (BlockHead) does not map onto speculators' dflash/dspark: (1) dflash injects the fused "
    "target features into every draft layer's keys and values (k_proj(hidden_norm(fc(g))) beside the block's), "
    "while BlockHead feeds them as context tokens (feature_norm(fuse(g)), then each layer's input norm) that "
    "run through the layers and are cached: only a 1-layer head's keys could agree, and not with the two "
    "norms in a row; (2) dflash's masked slots are the embedding of a vocabulary token (mask_token_id), "
    "BlockHead's a learned vector outside the vocabulary; (3) speculators 0.9.0 builds dflash/dspark layers "
    "from Qwen3 only (q_norm/k_norm), this target is another architecture. Nothing is written"
)
MEDUSA_GAP = (f"speculators {SPECULATORS_VERSION} has no Medusa type (it registers {', '.join(SPECULATORS_TYPES)}): "
              "a Medusa checkpoint cannot be exported to it")


class UnsupportedExport(ValueError):
    """A drafter the format cannot hold exactly; the message states the mapping and the gap."""


# --- export -------------------------------------------------------------------------------------------------


def eagle3_state(head: ReferenceEagle3Head, lm_rows: Tensor, vocab: Tensor | None, embed: Tensor,
                 dtype: torch.dtype) -> dict[str, Tensor]:
    """The ``eagle3`` weights of ``head``: floats in ``dtype``, ``d2t`` int64 ``(N,)``, ``t2d`` bool ``(V,)``.

    ``lm_rows (N, H)``: the output rows of the ``vocab`` ids (all ``V`` rows when ``vocab`` is None);
    ``embed (V, H)``: the target's input embedding."""
    state = {"fc.weight": head.fuse.weight}
    for i, layer in enumerate(head.body.layers):
        state.update({f"layers.{i}.{name}": value for name, value in layer.state_dict().items()})
    state["layers.0.hidden_norm.weight"] = head.hidden_norm.weight
    state["norm.weight"] = head.body.norm.weight
    if head.fc_norm is not None:
        state.update({f"fc_norm.{i}.weight": norm.weight for i, norm in enumerate(head.fc_norm)})
    if head.input_norm is not None:
        state["input_norm.weight"] = head.input_norm.weight
    state["lm_head.weight"] = lm_rows
    state["embed_tokens.weight"] = embed
    state = {name: value.detach().to("cpu", dtype).contiguous() for name, value in state.items()}
    if vocab is not None:
        ids = vocab.long().cpu()
        state["d2t"] = ids - torch.arange(len(ids))  # target id = draft index + d2t[index]
        t2d = torch.zeros(embed.shape[0], dtype=torch.bool)
        t2d[ids] = True
        state["t2d"] = t2d
    return state


def layer_config_dict(target: PreTrainedModel, layers: int) -> dict:
    """The ``transformer_layer_config``: the target's text config with the head's layer count, untied."""
    config = target.config.get_text_config().to_dict()
    for key in ("architectures", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
                "id2label", "label2id", "output_hidden_states", "return_dict", "output_attentions",
                "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "_attn_implementation"):
        config.pop(key, None)
    config.update(num_hidden_layers=layers, tie_word_embeddings=False)
    return config


def export_speculators(drafter: Eagle, target: PreTrainedModel, out_dir: str | Path, verifier: str | None = None,
                       dtype: torch.dtype = torch.float32, source: dict | None = None) -> Path:
    """Write ``drafter`` (an EAGLE-3 head in the reference layout) as a speculators ``eagle3`` directory.

    Args:
        drafter: the :class:`Eagle` drafter; its ``k`` becomes the greedy proposal's ``speculative_tokens``.
        target: the model it drafts for (its input embedding, and its output head's rows unless the drafter
            has its own).
        out_dir: the directory to write (made if missing; ``config.json``, ``model.safetensors``,
            ``specdec.json`` with where it came from are overwritten).
        verifier: ``speculators_config.verifier.name_or_path``: a hub id or a local Hugging Face directory of
            the target (``None``: the target's hub id where specdec knows it, else its ``name_or_path``).
        dtype: the weights' dtype in the file (and ``config.json``'s ``dtype``).
        source: provenance for ``specdec.json`` (checkpoint path, target fingerprint).

    Raises:
        UnsupportedExport: a head the format cannot hold exactly (the message says why).
    """
    head = drafter.head if isinstance(drafter, Eagle) else drafter
    if not isinstance(head, EagleHead):
        name = type(drafter).__name__
        raise UnsupportedExport(BLOCK_GAP if "Block" in name else MEDUSA_GAP if "Medusa" in name else
                                f"{name} has no speculators type: only EAGLE-3 heads export (Eagle drafters)")
    if not head.eagle3:
        raise UnsupportedExport("an EAGLE-1 head (fused_layers=None) has no speculators type (its eagle3 reads "
                                "three fused layers; vLLM's method 'eagle' reads SafeAILab's EAGLE-1 files, not "
                                "this format): train an EAGLE-3 head in the reference layout")
    if not isinstance(head, ReferenceEagle3Head):
        raise UnsupportedExport(SPECDEC_LAYOUT_GAP)
    text = target.config.get_text_config()
    layer_type = head.body.config.model_type
    if layer_type not in LAYER_TYPES:
        raise UnsupportedExport(f"the head's layers are {layer_type!r}; speculators {SPECULATORS_VERSION} and vLLM "
                                f"build eagle3 layers for {', '.join(LAYER_TYPES)} only")
    if text.hidden_size != head.fuse.out_features or max(head.fused_layers) > text.num_hidden_layers:
        raise ValueError(f"the head (hidden {head.fuse.out_features}, fused layers {list(head.fused_layers)}) does "
                         f"not fit target {text.model_type} (hidden {text.hidden_size}, {text.num_hidden_layers} "
                         "layers): give the target it was trained for")
    if max(head.fused_layers) == text.num_hidden_layers:
        raise UnsupportedExport(f"fused layer {text.num_hidden_layers} is Hugging Face's last hidden state, after the "
                                "final norm; vLLM's aux id of that number is the state before it: they differ")
    out = target.get_output_embeddings().weight
    vocab = drafter.vocab if isinstance(drafter, Eagle) else None
    own = getattr(drafter, "lm_head", None)
    rows = own if own is not None else (out if vocab is None else out[vocab.long().to(out.device)])
    state = eagle3_state(head, rows, vocab, target.get_input_embeddings().weight, dtype)
    name_or_path = verifier or HUB_IDS.get(getattr(target, "name_or_path", ""), None)
    if name_or_path is None and source is not None:
        name_or_path = HUB_IDS.get(source.get("target_name", ""), source.get("target_name"))
    config = {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "dtype": str(dtype).removeprefix("torch."),
        "draft_vocab_size": int(rows.shape[0]),
        "eagle_aux_hidden_state_layer_ids": list(head.fused_layers),
        "target_hidden_size": None,
        "embed_requires_grad": False,
        **head.options,  # vLLM assumes norm_before_residual=True when absent: always written
        "tie_word_embeddings": False,
        "transformer_layer_config": layer_config_dict(target, len(head.body.layers)),
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(getattr(drafter, "k", 4)),
                                  "accept_tolerance": 0.0, "verifier_accept_k": 1}],
            "verifier": {"name_or_path": name_or_path,
                         "architectures": list(target.config.architectures or [type(target).__name__])},
        },
    }
    config["transformer_layer_config"]["vocab_size"] = int(state["embed_tokens.weight"].shape[0])
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "specdec.json").write_text(json.dumps({"exported_by": "specdec.export", **(source or {})}, indent=2) + "\n")
    return path


def export_checkpoint(name_or_path: str | Path, out_dir: str | Path, format: str = "speculators",
                      target: str | PreTrainedModel | None = None, verifier: str | None = None,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Export a specdec checkpoint (shipped name or ``.pt`` path) to ``out_dir`` in ``format``.

    The int8 rows of specdec's storage are dequantized (exactly as specdec drafts with them) to ``dtype``.
    ``target``: the model it was trained for (a name for :func:`specdec.load_model`, or the model; default:
    the checkpoint's ``target_name``), checked against the checkpoint's fingerprint.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {list(FORMATS)}")
    path = checkpoint_path(name_or_path)
    try:
        kind = torch.load(path, map_location="cpu", weights_only=True).get("kind")
    except Exception:  # not a readable checkpoint: load_checkpoint below says so, naming the file
        kind = "eagle"
    if kind == "block":
        raise UnsupportedExport(f"{str(path)!r}: {BLOCK_GAP}")
    if kind == "medusa":
        raise UnsupportedExport(f"{str(path)!r}: {MEDUSA_GAP}")
    if kind != "eagle":
        raise UnsupportedExport(f"{str(path)!r} holds a {kind!r} drafter; the speculators format holds EAGLE-3 heads "
                                "(kind 'eagle') only, of what specdec trains")
    ckpt = load_checkpoint(path, "eagle")
    drafter = Eagle.from_loaded(ckpt)
    if not isinstance(drafter.head, ReferenceEagle3Head) and drafter.head.eagle3:
        raise UnsupportedExport(f"{str(path)!r}: {SPECDEC_LAYOUT_GAP}")  # before loading a target for nothing
    if target is None or isinstance(target, str):
        from specdec.models import load_model

        target = load_model(target or ckpt["target_name"])[0]
    check_target(ckpt, target)
    source = {"checkpoint": str(path), "kind": kind, "target_name": ckpt["target_name"],
              "target_fingerprint": ckpt["target_fingerprint"], "stored": "int8 rows + float16 scales, dequantized"}
    return export_speculators(drafter, target, out_dir, verifier, dtype, source)


# --- import -------------------------------------------------------------------------------------------------


def read_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of a directory's ``model.safetensors`` (or its shards, by ``model.safetensors.index.json``)."""
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{str(path / name)!r} is missing: a speculators directory holds its weights "
                                    "in model.safetensors (or shards listed in model.safetensors.index.json)")
        with safe_open(str(path / name), "pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})
    return state


def load_speculators(path: str | Path, target: PreTrainedModel | None = None, **kwargs) -> Eagle:
    """A speculators ``eagle3`` directory as a specdec :class:`Eagle` drafter (float32 head).

    Args:
        path: the directory (``config.json`` and ``model.safetensors``).
        target: the model it drafts for, if at hand: its size is checked now, and it gives the fused layers
            when the config leaves them to the verifier's default. Otherwise the check happens when the
            drafter is bound to a target.
        kwargs: :class:`Eagle`'s (``k``, ``top_k``, ``tree``, ``quantize``, ...); ``k`` defaults to the
            config's greedy ``speculative_tokens``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: give a speculators checkpoint directory")
    config = json.loads((path / "config.json").read_text())
    kind = config.get("speculators_model_type")
    if kind != "eagle3":
        raise ValueError(f"{str(path)!r} is a speculators {kind!r} checkpoint; specdec imports 'eagle3' only"
                         if kind else f"{str(path)!r} is not a speculators checkpoint (no speculators_model_type "
                         "in config.json): convert it with speculators' own converters first")
    layer = dict(config["transformer_layer_config"])
    layer_config = AutoConfig.for_model(layer.pop("model_type"), **layer)
    hidden, vocab_size = layer_config.hidden_size, layer_config.vocab_size
    if config.get("target_hidden_size") not in (None, hidden):
        raise ValueError(f"{str(path)!r}: target_hidden_size {config['target_hidden_size']} != the head's hidden "
                         f"size {hidden}; specdec's heads are as wide as their target")
    if target is not None:
        text = target.config.get_text_config()
        if (text.hidden_size, text.vocab_size) != (hidden, vocab_size):
            raise ValueError(f"{str(path)!r} drafts for hidden {hidden} / vocab {vocab_size}, but the target has "
                             f"hidden {text.hidden_size} / vocab {text.vocab_size}: give the target it was made for "
                             f"({config['speculators_config']['verifier'].get('name_or_path')})")
    fused = config.get("eagle_aux_hidden_state_layer_ids")
    if not fused:
        if target is None:
            raise ValueError(f"{str(path)!r} leaves its fused layers to the verifier's default: pass target=")
        fused = default_fused_layers(target.config.get_text_config().num_hidden_layers)
    if config.get("embed_requires_grad"):
        raise ValueError(f"{str(path)!r} trained its own embedding (embed_requires_grad); specdec's Eagle drafts "
                         "with the target's embedding")
    if target is not None:
        target_config = target.config.get_text_config()
    else:  # the target's depth is unknown here: the fused layers are checked against it when bound
        target_config = copy.deepcopy(layer_config)
        target_config.num_hidden_layers = max(fused)
    head = ReferenceEagle3Head(target_config, fused, layers=layer_config.num_hidden_layers, layer_config=layer_config,
                               norm_before_residual=bool(config.get("norm_before_residual", False)),
                               norm_output=bool(config.get("norm_output", False)),
                               fc_norm=bool(config.get("fc_norm", False)),
                               norm_before_fc=bool(config.get("norm_before_fc", False)))
    weights = {name.replace("midlayer.", "layers.0."): value for name, value in read_weights(path).items()}
    state, rows, vocab = {}, weights.pop("lm_head.weight", None), None
    if rows is None:
        raise ValueError(f"{str(path)!r} has no lm_head.weight: the file is incomplete")
    d2t, t2d = weights.pop("d2t", None), weights.pop("t2d", None)
    if d2t is not None:
        vocab = d2t.long() + torch.arange(len(d2t))
        if t2d is not None and not torch.equal(t2d.bool().nonzero().flatten(), vocab.sort().values):
            raise ValueError(f"{str(path)!r}: d2t and t2d name different target ids: the file is damaged")
    for name in ("embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight"):
        weights.pop(name, None)  # the target's own: Eagle drafts with the target's embedding
    for name, value in weights.items():
        if name == "fc.weight":
            state["fuse.weight"] = value
        elif name == "layers.0.hidden_norm.weight":
            state["hidden_norm.weight"] = value
        elif name.startswith("layers.") or name == "norm.weight":
            state[f"body.{name}"] = value
        else:  # fc_norm.*, input_norm.weight: the same names on the head
            state[name] = value
    state["body.embed_tokens.weight"] = head.body.embed_tokens.weight  # a 1-row stub, never read
    mine = head.state_dict()
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    bad = [n for n in set(mine) & set(state) if mine[n].shape != state[n].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{str(path)!r} does not fit an eagle3 head of its own config: missing {missing}, "
                         f"unexpected {unexpected}, other shapes {bad}")
    head.load_state_dict({name: value.float() for name, value in state.items()})
    if "k" not in kwargs:
        methods = config.get("speculators_config", {}).get("proposal_methods") or [{}]
        kwargs["k"] = int(methods[0].get("speculative_tokens", 4))
    return Eagle(head, vocab, None, lm_head=rows.float(), **kwargs)


# --- command line -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a shipped checkpoint's name or a .pt path")
    parser.add_argument("out_dir")
    parser.add_argument("--format", default="speculators", choices=FORMATS)
    parser.add_argument("--target", default=None, help="the target to load (default: the checkpoint's target_name)")
    parser.add_argument("--verifier", default=None,
                        help="speculators_config.verifier.name_or_path: a hub id or a local HF directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.format, args.target, args.verifier,
                                getattr(torch, args.dtype))
    except UnsupportedExport as err:
        print(f"specdec.export: not exported: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # a bad checkpoint, path or target: the message says which
        print(f"specdec.export: error: {err}", file=sys.stderr)
        return 1
    config = json.loads((out / "config.json").read_text())
    size = (out / "model.safetensors").stat().st_size
    print(f"specdec.export: wrote {out} ({args.format} eagle3, {args.dtype}, {size / 2**20:.1f} MiB): fused layers "
          f"{config['eagle_aux_hidden_state_layer_ids']}, draft vocab {config['draft_vocab_size']}, "
          f"verifier {config['speculators_config']['verifier']['name_or_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
