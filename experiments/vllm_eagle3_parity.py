"""Cross-engine tau: one specdec EAGLE-3 head (reference layout) exported to the speculators format, served by
vLLM and drafted by specdec, greedy, as a chain of the same depth ``k``, on the Spec-Bench sample. Per task it
prints vLLM's mean acceptance length beside specdec's pooled tau, and whether the two engines' outputs agree.

    python -m experiments.vllm_eagle3_parity --checkpoint eagle3-reference-smollm2-135m --k 3

One command, from the project's environment (.venv); vLLM runs in its own (.venv-vllm, ``make vllm-env``) as a
``vllm serve`` on loopback (:class:`specdec.tooling.peers.VllmServer`, with the CPU build's settings: tcmalloc
and Intel OpenMP preloaded, both cores). On a CUDA machine with a CUDA vLLM in ``--venv`` the same command runs.

- The prompts: ``--per-task`` of each task (seed 0, as ``dataset=spec_bench_sample``), first turn through the
  chat template (:func:`specdec.text.encode`), sent to both engines as the same token ids, one at a time.
- vLLM: ``{"method": "eagle3", "model": <export>, "num_speculative_tokens": k}``; per task, the change of
  ``vllm:spec_decode_num_drafts`` and ``..._num_accepted_tokens`` over its requests gives the mean acceptance
  length ``1 + accepted / drafts`` (one draft per target step after the prefill, the bonus token counted).
- specdec: the same exported directory imported (:func:`specdec.export.load_speculators`) as an ``Eagle`` chain
  of depth ``k``, the same ids, greedy, no goodput control (always ``k`` deep, as vLLM). Its tau pools every
  step of the task, as vLLM's number does: the tokens of the steps that verified a draft over those steps
  (the prefill's token, which no draft precedes in either engine, is left out of both).
- The verdict: ``ok`` when every task's gap is within 10% (exit 0; 1 otherwise). The JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TOLERANCE = 0.10


def task_prompts(tokenizer, per_task: int) -> list[dict]:
    from specdec.text import encode
    from specdec.tooling.data import load_prompts

    return [{"id": str(p.id), "task": p.task, "ids": encode(tokenizer, [{"role": "user", "content": p.turns[0]}])
             .reshape(-1).tolist()} for p in load_prompts(per_task=per_task, seed=0)]


def run_vllm(rows: list[dict], model, tokenizer, head_dir: Path, k: int, max_new_tokens: int, out: Path,
             venv: str) -> dict:
    """vLLM's mean acceptance length per task, and its outputs: each prompt through the benchmark's vLLM method
    (:func:`specdec.tooling.peers.vllm_method`, whose ``finish`` reads the request's draft counters)."""
    from specdec.tooling.peers import VllmServer, export_hf, peer_python, vllm_method

    launcher = peer_python(venv)
    if launcher is None:
        raise SystemExit(f"vllm_eagle3_parity: no {venv} here: `make vllm-env` makes it")
    model_dir = export_hf(model, tokenizer, out / "hf", "target").resolve()
    spec = {"method": "eagle3", "model": str(head_dir.resolve()), "num_speculative_tokens": k}
    server = VllmServer("eagle3", model_dir, launcher.absolute(), out / "vllm_eagle3.log", spec)
    tasks, outputs = {}, {}
    try:
        server.start()
        method = vllm_method(server, max_new_tokens, [tokenizer.eos_token_id])
        for row in rows:
            ids = torch.tensor([row["ids"]])
            sequences, _ = method.run(ids, torch.ones_like(ids))
            stats, extra = method.finish()
            task = tasks.setdefault(row["task"], {"drafts": 0, "draft_tokens": 0, "accepted": 0})
            task["drafts"] += extra["vllm_drafts"]
            task["draft_tokens"] += stats.drafted
            task["accepted"] += stats.accepted
            outputs[row["id"]] = sequences[0, ids.shape[1]:].tolist()
    finally:
        server.stop()
    for task in tasks.values():
        task["mean_acceptance_length"] = 1 + task["accepted"] / max(task["drafts"], 1)
    return {"tasks": tasks, "outputs": outputs, "startup_s": server.startup_s}


def run_specdec(rows: list[dict], model, head_dir: Path, k: int, max_new_tokens: int, eos: int) -> dict:
    """specdec's pooled tau per task over the steps that verified a draft, and its outputs."""
    import specdec
    from specdec.export import load_speculators

    drafter = load_speculators(head_dir, model, k=k)
    tasks, outputs = {}, {}
    for row in rows:
        ids = torch.tensor([row["ids"]])
        stats = (run := specdec.generate(model, ids, drafter, max_new_tokens=max_new_tokens, goodput=False,
                                         eos_token_id=eos, return_dict_in_generate=True)).stats
        drafted = stats.drafted_at[0] if stats.drafted_at else 0  # steps whose draft reached depth 1
        task = tasks.setdefault(row["task"], {"steps": 0, "tokens": 0, "all_steps": 0})
        task["steps"] += drafted
        task["tokens"] += stats.new_tokens - (stats.steps - drafted)  # a step without a draft adds one token
        task["all_steps"] += stats.steps
        outputs[row["id"]] = run.sequences[0, ids.shape[1]:].tolist()
    for task in tasks.values():
        task["pooled_tau"] = task["tokens"] / max(task["steps"], 1)
    return {"tasks": tasks, "outputs": outputs}


def table(theirs: dict, mine: dict, rows: list[dict], k: int) -> tuple[str, bool]:
    """The per-task markdown table and whether every gap is within ``TOLERANCE``."""
    ok = True
    lines = ["| task | vLLM mean acceptance length | specdec pooled tau | gap | outputs identical |",
             "|---|---|---|---|---|"]
    for task, row in mine["tasks"].items():
        v, s = theirs["tasks"][task]["mean_acceptance_length"], row["pooled_tau"]
        gap = abs(v - s) / s
        ok &= gap <= TOLERANCE
        ids = [r["id"] for r in rows if r["task"] == task]
        same = sum(theirs["outputs"][p] == mine["outputs"][p] for p in ids)
        lines.append(f"| {task} | {v:.3f} | {s:.3f} | {gap:.1%} | {same}/{len(ids)} |")
    lines.append(f"k={k}: {'within' if ok else 'NOT within'} {TOLERANCE:.0%} on every task")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.vllm_eagle3_parity")
    parser.add_argument("--checkpoint", default="eagle3-reference-smollm2-135m",
                        help="a specdec EAGLE-3 checkpoint in the reference layout (name or .pt)")
    parser.add_argument("--head", default=None, help="an exported speculators eagle3 directory instead")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--out", default="outputs/vllm_eagle3_parity")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--venv", default=".venv-vllm")
    args = parser.parse_args(argv)
    import specdec
    from specdec.export import export_checkpoint

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = specdec.load_model(args.target)[:2]
    head = Path(args.head) if args.head else export_checkpoint(args.checkpoint, out / "head", target=model)
    rows = task_prompts(tokenizer, args.per_task)
    mine = run_specdec(rows, model, head, args.k, args.max_new_tokens, tokenizer.eos_token_id)
    theirs = run_vllm(rows, model, tokenizer, head, args.k, args.max_new_tokens, out, args.venv)
    text, ok = table(theirs, mine, rows, args.k)
    print(text)
    (out / "parity.json").write_text(json.dumps({"k": args.k, "head": str(head), "vllm": theirs, "specdec": mine,
                                                 "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
