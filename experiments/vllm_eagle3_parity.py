"""Cross-engine tau: one exported EAGLE-3 head, vLLM's mean acceptance length per Spec-Bench task against
specdec's pooled tau, greedy, chain drafting of the same depth ``k``. Prepared for a CUDA machine; not run on
this CPU (docs/export.md says why and what was run here).

Four steps, each one command; files go to ``--out``:

    python -m experiments.vllm_eagle3_parity prompts --out parity                  # .venv: the sample's token ids
    python experiments/vllm_eagle3_parity.py vllm --out parity --target HF_DIR --head SPEC_DIR --k 3   # vLLM env
    python -m experiments.vllm_eagle3_parity specdec --out parity --target smollm2-135m --head SPEC_DIR --k 3
    python -m experiments.vllm_eagle3_parity compare --out parity                  # the table; exit 1 past 10%

- ``prompts``: the Spec-Bench sample (``per_task`` prompts of each task, seed 0, as ``dataset=spec_bench_sample``),
  first turn through the chat template (:func:`specdec.text.encode`), as token ids: both engines get the same ids.
- ``vllm`` (imports only vLLM; run it with the vLLM environment's python): ``LLM(target, speculative_config=
  {"method": "eagle3", "model": head, "num_speculative_tokens": k})``, greedy, ``max_tokens``; per task the change
  of ``vllm:spec_decode_num_drafts`` / ``..._num_accepted_tokens`` gives its mean acceptance length
  ``1 + accepted / drafts`` (a draft per target step, the bonus token counted, as specdec's tau counts it).
- ``specdec``: the same directory imported (:func:`specdec.export.load_speculators`) as an ``Eagle`` chain of depth
  ``k``, the same ids, greedy, no goodput control (always ``k`` deep, as vLLM); tau pooled over every step of the
  task (docs/DESIGN's definition).
- ``compare``: per task, both numbers and the relative gap; ``ok`` when every gap is within 10%; also whether the
  two engines' outputs were token-identical per prompt (both are greedy over the same target: they should be,
  up to float ties).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOLERANCE = 0.10


def prompts(out: Path, per_task: int, max_new_tokens: int, target: str) -> None:
    from specdec import load_model
    from specdec.text import encode
    from specdec.tooling.data import load_prompts

    tokenizer = load_model(target)[1]
    rows = [{"id": p.id, "task": p.task, "ids": encode(tokenizer, [{"role": "user", "content": p.turns[0]}]).tolist()}
            for p in load_prompts(per_task=per_task, seed=0)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps({"max_new_tokens": max_new_tokens, "eos": tokenizer.eos_token_id,
                                                  "rows": rows}))


def counters(llm) -> dict[str, float]:
    wanted = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens",
              "vllm:spec_decode_num_draft_tokens")
    return {m.name: float(m.value) for m in llm.get_metrics() if m.name in wanted}


def run_vllm(out: Path, target: str, head: str, k: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    data = json.loads((out / "prompts.json").read_text())
    llm = LLM(model=target, dtype="float32", seed=0, disable_log_stats=False,
              speculative_config={"method": "eagle3", "model": head, "num_speculative_tokens": k})
    params = SamplingParams(temperature=0.0, max_tokens=data["max_new_tokens"], stop_token_ids=[data["eos"]])
    tasks: dict[str, dict] = {}
    outputs = {}
    for task in dict.fromkeys(r["task"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["task"] == task]
        before = counters(llm)
        done = llm.generate([TokensPrompt(prompt_token_ids=r["ids"]) for r in rows], params)
        after = counters(llm)
        delta = {name.split("num_")[-1]: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
        tasks[task] = {**delta, "mean_acceptance_length": 1 + delta["accepted_tokens"] / max(delta["drafts"], 1)}
        outputs.update({str(r["id"]): list(o.outputs[0].token_ids) for r, o in zip(rows, done)})
    (out / "vllm.json").write_text(json.dumps({"k": k, "head": head, "tasks": tasks, "outputs": outputs}, indent=1))


def run_specdec(out: Path, target: str, head: str, k: int) -> None:
    import torch

    import specdec
    from specdec.export import load_speculators

    data = json.loads((out / "prompts.json").read_text())
    model = specdec.load_model(target)[0]
    drafter = load_speculators(head, model, k=k)
    tasks: dict[str, dict] = {}
    outputs = {}
    for row in data["rows"]:
        ids = torch.tensor([row["ids"]])
        run = specdec.generate(model, ids, drafter, max_new_tokens=data["max_new_tokens"], goodput=False,
                               return_dict_in_generate=True)
        lengths = [n for per_row in run.stats.accept_lengths for n in per_row]
        task = tasks.setdefault(row["task"], {"steps": 0, "tokens": 0})
        task["steps"] += len(lengths)
        task["tokens"] += sum(lengths)
        outputs[str(row["id"])] = run.sequences[0, ids.shape[1]:].tolist()
    for task in tasks.values():
        task["pooled_tau"] = task["tokens"] / max(task["steps"], 1)
    result = {"k": k, "head": head, "tasks": tasks, "outputs": outputs}
    (out / "specdec.json").write_text(json.dumps(result, indent=1))


def compare(out: Path) -> int:
    theirs, mine = (json.loads((out / f"{name}.json").read_text()) for name in ("vllm", "specdec"))
    if theirs["k"] != mine["k"]:
        print(f"depths differ: vLLM k={theirs['k']}, specdec k={mine['k']}: rerun one of them")
        return 2
    ok = True
    print("| task | vLLM mean acceptance length | specdec pooled tau | gap | outputs identical |\n|---|---|---|---|---|")
    for task, row in mine["tasks"].items():
        v, s = theirs["tasks"][task]["mean_acceptance_length"], row["pooled_tau"]
        gap = abs(v - s) / s
        ok &= gap <= TOLERANCE
        ids = [pid for pid in mine["outputs"] if pid in theirs["outputs"]]
        same = sum(mine["outputs"][p] == theirs["outputs"][p] for p in ids)
        print(f"| {task} | {v:.3f} | {s:.3f} | {gap:.1%} | {same}/{len(ids)} |")
    print(f"k={mine['k']}: {'within' if ok else 'NOT within'} {TOLERANCE:.0%} on every task")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.vllm_eagle3_parity")
    parser.add_argument("step", choices=("prompts", "vllm", "specdec", "compare"))
    parser.add_argument("--out", default="outputs/vllm_eagle3_parity")
    parser.add_argument("--target", default="smollm2-135m", help="vllm: a Hugging Face directory of the target")
    parser.add_argument("--head", help="the exported speculators eagle3 directory")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.step == "prompts":
        prompts(out, args.per_task, args.max_new_tokens, args.target)
    elif args.step == "vllm":
        run_vllm(out, args.target, args.head, args.k)
    elif args.step == "specdec":
        run_specdec(out, args.target, args.head, args.k)
    else:
        return compare(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
