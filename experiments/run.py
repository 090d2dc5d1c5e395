"""Benchmark a drafter against model.generate() on a prompt set (the README's main command).

    python -m experiments.run                         # the default: embedded SmolLM2, Spec-Bench sample
    python -m experiments.run dataset.per_task=10 drafter.k=8
    python -m experiments.run +experiment=chain_vs_tree # more drafters in the same run
    python -m experiments.run +experiment=batch4        # batches of 4 prompts

Writes ``results.jsonl`` (one row per prompt and method), ``summary.csv`` and ``table.md``
to the run directory and prints the table.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from specdec import load_model
from specdec.benchmark import hf_generate, markdown_table, run_benchmark, specdec_generate, summarize
from specdec.data import SPEC_BENCH, load_prompts


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    prompts = load_prompts(cfg.dataset.path or SPEC_BENCH, per_task=cfg.dataset.per_task, seed=cfg.dataset.seed)
    drafter_cfg = OmegaConf.to_container(cfg.drafter, resolve=True)
    drafter_name = drafter_cfg.pop("name")
    drafter = instantiate(drafter_cfg)
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype)

    n = cfg.max_new_tokens
    methods = [hf_generate(model, n)]
    if cfg.hf_prompt_lookup_num_tokens:
        methods.append(hf_generate(model, n, "hf_prompt_lookup", prompt_lookup_num_tokens=cfg.hf_prompt_lookup_num_tokens))
    backend = cfg.attention_backend
    methods += [specdec_generate(model, None, n, "specdec_no_draft", backend),
                specdec_generate(model, drafter, n, f"specdec_{drafter_name}", backend)]
    for name, variant in cfg.variants.items():
        methods.append(specdec_generate(model, instantiate(variant), n, f"specdec_{name}", backend))
    eos = model.generation_config.eos_token_id
    rows = run_benchmark(methods, tokenizer, prompts, progress=cfg.progress, batch_size=cfg.batch_size,
                         eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []))
    summary = summarize(rows)

    out = Path(HydraConfig.get().runtime.output_dir)
    with (out / "results.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    title = (f"{cfg.model.name}, {cfg.dataset.name} ({len(prompts)} prompts), batch {cfg.batch_size}, greedy, "
             f"{n} new tokens, {cfg.threads} threads; speedup vs model.generate()")
    table = f"{title}\n\n{markdown_table(summary)}\n"
    (out / "table.md").write_text(table)
    print(table)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
