"""Check an exported EAGLE-3 head against the real ``speculators`` library, in its own environment.

Two halves, two interpreters (``speculators`` 0.9.0 pins transformers<=5.19.0, below specdec's):

1. ``prepare`` (specdec's ``.venv``): export the head (:func:`specdec.export.export_speculators`), run the
   target over the tokens for its fused features, and run specdec's head over them for ``steps`` draft
   steps (EAGLE-3's training-time test, :func:`specdec.training.train.ttt_unroll`: step ``s`` reads
   ``x_{j+1+s}`` and its own step ``s - 1`` output, attending to the true prefix and its own earlier steps);
   save the inputs and specdec's draft logits over the draft vocabulary.
2. ``compare`` (``.venv-speculators``; imports nothing of specdec): load the directory with
   ``SpeculatorModel.from_pretrained``, unchanged, run its own ``forward`` (its training-time test, teacher
   forced with the same tokens, ``ttt_steps = steps``) on the same inputs, catch each step's logits at its
   ``lm_head``, and compare: top-1 at every position of every step, and the largest logit difference.

``python -m specdec.tooling.speculators_check smollm`` runs both on SmolLM2-135M with a head started from the
target (:meth:`~specdec.drafters.eagle.ReferenceEagle3Head.from_target`, every weight perturbed so nothing
is an identity) and the shipped head's reduced vocabulary, or with ``--checkpoint`` a trained head (the shipped
``eagle3-reference-smollm2-135m``) and its own; it prints one JSON line and exits 1 on a
mismatch, 3 when ``.venv-speculators`` is missing (``make speculators-env`` makes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SPEC_PYTHON = ROOT / ".venv-speculators" / "bin" / "python"
MISSING = "speculators check: skipped, no .venv-speculators here (make speculators-env makes it)"
RTOL = 1e-4  # float32: the largest logit difference may be at most this fraction of the largest logit


def perturbed(head, scale: float = 0.05, seed: int = 0):
    """``head`` with every weight moved by ``scale`` of its own spread (seeded): no identity, no zero block."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in head.parameters():
            spread = param.float().std() if param.numel() > 1 else param.float().abs().mean()
            noise = torch.randn(param.shape, generator=gen) * (scale * float(spread.clamp(min=1e-2)))
            param.add_(noise.to(param.dtype))
    return head


def prepare(target, head, vocab, tokens, out_dir: Path, steps: int = 3, verifier: str | None = None) -> Path:
    """Export ``head`` to ``out_dir/head`` and write ``out_dir/inputs.pt`` (inputs and specdec's logits).

    ``tokens (1, n + 1)``: the sequence; index ``j`` of the check pairs the target's fused features of
    ``x_j`` with ``x_{j+1}``. Returns ``out_dir``."""
    from specdec.drafters.eagle import Eagle, ttt_mask
    from specdec.drafters.vocab import ReducedHead
    from specdec.export import export_speculators
    from specdec.training.train import ttt_unroll

    out_dir = Path(out_dir)
    export_speculators(Eagle(head, vocab, k=steps), target, out_dir / "head", verifier=verifier)
    n = tokens.shape[1] - 1
    positions = torch.arange(n + 1)[None]
    with torch.no_grad():
        hidden = target(tokens, output_hidden_states=True).hidden_states
        fused = torch.cat([hidden[layer] for layer in head.fused_layers], dim=-1)  # (1, n + 1, F)
        states = ttt_unroll(head, target.get_input_embeddings(), fused, tokens, positions,
                            torch.ones_like(tokens, dtype=torch.bool), steps, mask=ttt_mask)
        lm = ReducedHead(target.get_output_embeddings(), vocab)
        logits = torch.stack([lm.reduced(head.logit_states(s))[0] for s in states])  # (steps, n, N)
    torch.save({"hidden_states": fused[:, :n].float(), "input_ids": tokens[:, 1:], "position_ids": positions[:, :n],
                "logits": logits.float(), "vocab": None if vocab is None else vocab.long(), "steps": steps},
               out_dir / "inputs.pt")
    return out_dir


def compare(out_dir: Path, attn: str | None = None) -> dict:
    """In the speculators environment: its forward on the saved inputs against specdec's logits."""
    from speculators import SpeculatorModel, SpeculatorModelConfig

    out_dir = Path(out_dir)
    data = torch.load(out_dir / "inputs.pt", weights_only=True)
    config = None
    if attn is not None:  # the attention implementation is a run-time choice, not part of the checkpoint
        config = SpeculatorModelConfig.from_pretrained(str(out_dir / "head"))
        config.transformer_layer_config._attn_implementation = attn
    model = SpeculatorModel.from_pretrained(str(out_dir / "head"), config=config)
    model = model.float().eval()
    caught = []
    model.lm_head.register_forward_hook(lambda module, args, output: caught.append(output.detach()))
    with torch.no_grad():
        model(hidden_states=data["hidden_states"], input_ids=data["input_ids"],
              document_ids=torch.zeros_like(data["input_ids"]), position_ids=data["position_ids"],
              ttt_steps=data["steps"])
    theirs = torch.stack([c[0].float() for c in caught])  # (steps, n, N)
    mine = data["logits"]
    if theirs.shape != mine.shape:
        return {"ok": False, "error": f"speculators gave logits {tuple(theirs.shape)}, specdec {tuple(mine.shape)}"}
    diff = (theirs - mine).abs()
    scale = float(mine.abs().max())
    top_equal = theirs.argmax(-1) == mine.argmax(-1)  # (steps, n)
    d2t = getattr(model, "d2t", None)
    ids = mine.argmax(-1)
    mapped = ids if d2t is None else ids + d2t.to(ids.device)[ids]
    vocab = data["vocab"]
    return {
        "ok": bool(top_equal.all()) and float(diff.max()) <= RTOL * max(scale, 1.0),
        "class": type(model).__name__,
        "attn": model._attn_impl,
        "steps": int(data["steps"]), "positions": int(mine.shape[1]), "draft_vocab": int(mine.shape[2]),
        "top1_equal": f"{int(top_equal.sum())}/{top_equal.numel()}",
        "top1_equal_per_step": [f"{int(row.sum())}/{row.numel()}" for row in top_equal],
        "max_abs_diff": float(diff.max()), "max_abs_logit": scale,
        "max_abs_diff_per_step": [float(d.max()) for d in diff],
        "d2t_maps_to_specdec_ids": None if vocab is None else bool(torch.equal(mapped, vocab[ids])),
    }


def run_compare(out_dir: Path, attn: str | None = None, timeout: int = 600) -> dict:
    """``compare`` in ``.venv-speculators`` (``-I``: nothing of this checkout on its path); its JSON line."""
    if not SPEC_PYTHON.exists():
        raise FileNotFoundError(MISSING)
    command = [str(SPEC_PYTHON), "-I", str(Path(__file__).resolve()), "compare", str(out_dir)]
    if attn is not None:
        command += ["--attn", attn]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode not in (0, 1) or not lines:
        raise RuntimeError(f"the speculators half failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m specdec.tooling.speculators_check")
    sub = parser.add_subparsers(dest="command")
    cmp_ = sub.add_parser("compare", help="(in .venv-speculators) compare a prepared directory")
    cmp_.add_argument("out_dir")
    cmp_.add_argument("--attn", default=None, help="speculators' attention implementation (default: its own)")
    real = sub.add_parser("smollm", help="(in .venv) prepare on SmolLM2-135M, then compare in .venv-speculators")
    real.add_argument("--out", default="outputs/speculators_check")
    real.add_argument("--steps", type=int, default=3)
    real.add_argument("--tokens", type=int, default=128, help="greedy tokens after the prompt (the check keeps "
                      "a multiple of 128 positions)")
    real.add_argument("--attn", default=None)
    real.add_argument("--checkpoint", default=None, help="check this trained reference-layout EAGLE-3 checkpoint "
                      "(a shipped name or .pt) with its own vocabulary, instead of a perturbed untrained head")
    args = parser.parse_args(argv)
    if args.command == "compare":
        result = compare(Path(args.out_dir), args.attn)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    if not SPEC_PYTHON.exists():
        print(MISSING)
        return 3
    from specdec import load_model
    from specdec.drafters.eagle import ReferenceEagle3Head, default_fused_layers
    from specdec.text import encode
    from specdec.training.checkpoint import load_checkpoint

    target, tokenizer = load_model("smollm2-135m")
    if args.checkpoint:  # a trained head, as specdec drafts with it (its int8 rows dequantized)
        from specdec.drafters.eagle import Eagle

        ckpt = load_checkpoint(args.checkpoint, "eagle")
        head, vocab = Eagle.from_loaded(ckpt).head, ckpt["vocab"].long()
        if not isinstance(head, ReferenceEagle3Head):
            print(f"speculators check: {args.checkpoint!r} is not a reference-layout head (specdec.export refuses it)")
            return 2
        fused = list(head.fused_layers)
    else:
        vocab = load_checkpoint("eagle-smollm2-135m", "eagle")["vocab"].long()  # the shipped head's 8192 ids
        fused = default_fused_layers(target.config.num_hidden_layers)
        head = perturbed(ReferenceEagle3Head.from_target(target, fused))
    prompt = encode(tokenizer, [{"role": "user", "content": "Explain in three sentences why the sky is blue."}])[None]
    with torch.no_grad():
        tokens = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False)  # long enough to cut as below
    # speculators' default flex attention extends its block mask by whole 128-blocks per step: a multiple of 128
    tokens = tokens[:, : 128 * max(1, (tokens.shape[1] - 1) // 128) + 1]
    out = prepare(target, head, vocab, tokens, Path(args.out), args.steps, verifier=target.name_or_path)
    result = {"target": "smollm2-135m", "head": args.checkpoint or "perturbed from_target",
              "fused_layers": list(fused), "sequence": int(tokens.shape[1]),
              **run_compare(out, args.attn)}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
