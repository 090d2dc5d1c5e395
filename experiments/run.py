"""Benchmark a drafter against model.generate() on a prompt set (the README's main command).

From the checkout ``python -m experiments.run``; from an installed wheel ``specdec-run`` (or
``python -m specdec_experiments.run``), with the same arguments; ``--config-dir DIR`` adds your own
configs to the search path.

    python -m experiments.run                            # the default: embedded SmolLM2, Spec-Bench sample
    python -m experiments.run dataset.per_task=10 drafter=prompt_lookup drafter.k=8 logger=wandb
    python -m experiments.run +experiment=chain_vs_tree  # more drafters in the same run
    python -m experiments.run +experiment=batch4         # batches of 4 prompts
    python -m experiments.run --multirun drafter=prompt_lookup drafter.k=4,8  # a sweep, one run directory per job
    accelerate launch --multi_gpu --num_processes 2 -m experiments.run threads=1   # prompts sharded over 2
        processes (on a machine without GPUs they are CPU processes talking over gloo); the main
        process merges every shard's rows into one table

Writes ``results.jsonl`` (one row per prompt and method), ``summary.csv``, ``table.md``,
``report.md`` and its PNG figures, ``manifest.json`` (package versions, commit, CPU, threads, torch
flags, model and checkpoint hashes) and Spec-Bench's answer files (``model_answer/<method>.jsonl``,
which its ``evaluation/speed.py`` and ``equal.py`` read unchanged) to the run directory, prints the
table, and hands the rows to the configured logger (``logger=wandb`` by default: an offline W&B run
in the run directory, the manifest in its config).
"""

from __future__ import annotations

import csv
import json
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from specdec import load_model
from specdec.drafters import Distilled, PromptLookup
from specdec.tooling.benchmark import (hf_generate, hf_static_compiled, markdown_table, run_benchmark,
                                       specdec_generate, speedup_table, summarize)
from specdec.tooling.data import SPEC_BENCH, load_prompts
from specdec.tooling.loggers import NullLogger, make_logger
from specdec.tooling.manifest import headline, run_manifest
from specdec.tooling.peers import vllm_methods
from specdec.tooling.report import FIGURES, write_report
from specdec.tooling.spec_bench import export_answers

from . import CONFIG_DIR
from .schema import beside_prompt_lookup, register, validate

register()


def write_outputs(out: Path, rows: list[dict], summary: list[dict], table: str) -> None:
    """results.jsonl, summary.csv and table.md in the run directory."""
    with (out / "results.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    (out / "table.md").write_text(table)


ENGINE_KEYS = ("min_verify_tokens", "linear_backend")  # engine settings a variant may override
NOT_ARGUMENTS = ("name", "train", *ENGINE_KEYS)


def build_drafter(node: DictConfig):
    """A drafter from its config; ``name``, the ``train`` block and a variant's engine settings
    (``ENGINE_KEYS``) are not constructor arguments."""
    return instantiate({k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                        if k not in NOT_ARGUMENTS})


def wandb_run(cfg: DictConfig, out: Path) -> dict:
    """A readable name, tags and job type for the W&B run; in a sweep also its group (the sweep
    directory) and a name made of the job's swept values, so two sweeps and their jobs stay apart."""
    hydra_cfg = HydraConfig.get()
    mode = "greedy" if not cfg.sampling.do_sample else "sampled"
    tags = [cfg.drafter.name, cfg.dataset.name, Path(str(cfg.model.name)).name, mode, f"batch{cfg.batch_size}"]
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {"name": f"{cfg.drafter.name} {out.parent.name}/{out.name}", "tags": tags, "job_type": "benchmark"}
    overrides = list(hydra_cfg.overrides.task)
    swept = _swept_keys(sys.argv[1:])
    label = " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept) or f"job {hydra_cfg.job.num}"
    return {"name": label, "group": f"sweep {hydra_cfg.sweep.dir}", "tags": [*tags, "sweep"], "job_type": "benchmark"}


def _swept_keys(argv: list[str]) -> set[str]:
    """Keys the command line sweeps (``tree.depth=4,8``); empty when it cannot be read (a launcher's
    worker process)."""
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except OverrideParseException:
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    validate(cfg, HydraConfig.get().overrides.task)  # before anything loads
    torch.set_num_threads(cfg.threads)
    state = PartialState(cpu=not torch.cuda.is_available())  # one process, or one of `accelerate launch`'s
    tasks = list(cfg.dataset.tasks) if cfg.dataset.tasks else None
    prompts = load_prompts(cfg.dataset.path or SPEC_BENCH, per_task=cfg.dataset.per_task, seed=cfg.dataset.seed,
                           tasks=tasks)
    shard = prompts[state.process_index :: state.num_processes]
    drafter = build_drafter(cfg.drafter)
    variants = {name: build_drafter(v) for name, v in cfg.variants.items()}
    sampling = {k: v for k, v in OmegaConf.to_container(cfg.sampling).items() if k != "name" and v is not None}
    out = [HydraConfig.get().runtime.output_dir]
    if state.num_processes > 1:
        broadcast_object_list(out)  # every process writes its shard next to the main process's results
    out = Path(out[0])
    logger = NullLogger()
    manifest = run_manifest(str(cfg.model.name), [OmegaConf.to_container(d, resolve=True)
                                                  for d in (cfg.drafter, *cfg.variants.values())])
    if state.is_main_process:
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        config = OmegaConf.to_container(cfg, resolve=True) | {"prompt_ids": [p.id for p in prompts],
                                                               "manifest": manifest}
        logger = make_logger(cfg.logger.kind, out, config, cfg.logger.project, cfg.logger.mode, **wandb_run(cfg, out))
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype)

    n, backend = cfg.max_new_tokens, cfg.attention_backend
    methods = [hf_generate(model, n, sampling=sampling)]
    if cfg.hf_prompt_lookup_num_tokens:
        methods.append(hf_generate(model, n, "hf_prompt_lookup", sampling=sampling,
                                   prompt_lookup_num_tokens=cfg.hf_prompt_lookup_num_tokens))
    if cfg.hf_assistant:  # transformers' own assisted generation, with our trained draft model as assistant
        assistant = Distilled.from_checkpoint(cfg.hf_assistant).draft_for(model)  # the draft LM built on the target
        methods.append(hf_generate(model, n, "hf_assisted", sampling=sampling, assistant_model=assistant))
    if cfg.hf_static_compiled:
        methods.append(hf_static_compiled(model, n, sampling=sampling))
    engine = {key: cfg[key] for key in ENGINE_KEYS}
    methods += [specdec_generate(model, None, n, "specdec_no_draft", backend, sampling,
                                 linear_backend=cfg.linear_backend),
                specdec_generate(model, drafter, n, f"specdec_{cfg.drafter.name}", backend, sampling, **engine)]
    if beside_prompt_lookup(cfg):  # the reference every drafter is read against
        lookup = PromptLookup(k=cfg.prompt_lookup_k, max_ngram=3, min_ngram=2)
        methods.append(specdec_generate(model, lookup, n, "specdec_prompt_lookup", backend, sampling, **engine))
    methods += [specdec_generate(model, d, n, f"specdec_{name}", backend, sampling,
                                 **{key: cfg.variants[name].get(key, value) for key, value in engine.items()})
                for name, d in variants.items()]
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    steps: dict[tuple, int] = {}  # one history step per prompt (and turn), shared by its methods

    def log_row(row: dict) -> None:
        logger.log_row(row, steps.setdefault((str(row["prompt_id"]), row["turn"]), len(steps)))

    with ExitStack() as servers:  # vLLM peers, if any: up for the whole run, stopped however it ends
        if cfg.vllm.methods and state.num_processes > 1:
            raise ValueError("config vllm.methods runs servers on this machine's cores: run it in one process")
        peers, peer_notes = vllm_methods(OmegaConf.to_container(cfg.vllm.methods, resolve=True), model, tokenizer,
                                         str(cfg.model.name), n, eos, out, servers, venv=cfg.vllm.venv,
                                         cache_dir=cfg.vllm.cache_dir, threads=cfg.threads,
                                         kv_cache_gib=cfg.vllm.kv_cache_gib,
                                         startup_timeout_s=cfg.vllm.startup_timeout_s)
        rows = run_benchmark(methods + peers, tokenizer, shard, progress=cfg.progress and state.is_main_process,
                             batch_size=cfg.batch_size, eos_token_ids=eos, on_row=log_row,
                             all_turns=cfg.dataset.all_turns)
    if state.num_processes > 1:
        (out / f"results.rank{state.process_index}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        state.wait_for_everyone()
        if not state.is_main_process:
            return
        rows = [json.loads(line) for rank in range(state.num_processes)
                for line in (out / f"results.rank{rank}.jsonl").read_text().splitlines()]
    greedy = not sampling.get("do_sample")
    summary = summarize(rows, greedy=greedy)
    mode = "greedy" if greedy else "sampled"
    processes = f", {state.num_processes} processes" if state.num_processes > 1 else ""
    title = (f"{cfg.model.name}, {cfg.dataset.name} ({len(prompts)} prompts), batch {cfg.batch_size}, {mode}, "
             f"{n} new tokens, {cfg.threads} threads{processes}; speedup vs model.generate()")
    notes = "".join(f"\n{line}" for line in peer_notes)
    table = (f"{title}\n\n{headline(manifest)}\n\n{markdown_table(summary)}{notes}\n\nSpeedup (tau) per task:\n\n"
             f"{speedup_table(summary)}\n")
    write_outputs(out, rows, summary, table)
    export_answers(rows, out)  # Spec-Bench's model_answer files
    write_report(out)  # report.md and the figures, beside the results
    logger.log_results(rows, summary, table, figures={name: out / f"{name}.png" for name in FIGURES})
    logger.finish()
    print(table)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
