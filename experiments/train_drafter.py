"""Train a drafter for the target on its own outputs, log to W&B, save a checkpoint (installed: ``specdec-train``).

    python -m experiments.train_drafter drafter=eagle          # also: pard, medusa, early_exit, draft_model
    python -m experiments.train_drafter drafter=medusa drafter.train.heads=3 logger=csv
    accelerate launch --multi_gpu --num_processes 2 -m experiments.train_drafter drafter=eagle threads=1   # CPU: gloo

1. builds (or reads from the cache) the self-distillation set: the target's greedy answers to chat,
   writing, coding, extraction, qa, summarising, translation and GSM8K prompts
   (:mod:`specdec.training.distill`; ``python -m specdec.training.distill`` builds it alone), and
   refuses a set too small for one training batch;
2. runs the target once over it for hidden states and greedy labels;
3. trains the drafter (:mod:`specdec.training.train`), logging loss and per-depth top-1 accuracy;
4. saves the checkpoint where ``drafter=<name>`` loads it (``specdec/checkpoints/<checkpoint>.pt``,
   or ``output=path.pt``), with its settings and the target's fingerprint;
5. decodes a few held-out prompts with it and logs acceptance per depth and tau.

Everything is seeded: the same command rebuilds the same checkpoint on the same machine.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from specdec import generate, load_model
from specdec.training.checkpoint import SHIPPED, save_checkpoint
from specdec.training.distill import DistillSettings, distill_set
from specdec.tooling.benchmark import pooled_position_acceptance, pooled_tau
from specdec.tooling.loggers import NullLogger, make_logger
from specdec.training.train import TrainSettings, drafter_layers, module_settings, resolved, train, trained_weights

from . import CONFIG_DIR
from .schema import register, validate_training

register()


def checkpoint_file(cfg: DictConfig) -> Path:
    """Where the checkpoint goes: ``output``, else where the drafter config loads it from."""
    if cfg.output:
        return Path(cfg.output)
    name = str(cfg.drafter.checkpoint)
    return Path(name) if name.endswith(".pt") else SHIPPED / f"{name}.pt"


def held_out_decode(drafter_cfg: dict, path: Path, model, tokenizer, sequences, prompt_lens, n: int,
                    max_new_tokens: int) -> dict:
    """Acceptance of the trained drafter when decoding ``n`` held-out prompts greedily: tau and acceptance
    per depth pooled over every step of every prompt, as Spec-Bench pools tau."""
    drafter = hydra.utils.instantiate({**drafter_cfg, "checkpoint": str(path)})
    rows = []
    for seq, plen in zip(sequences[-n:], prompt_lens[-n:]):
        out = generate(model, seq[None, :plen], drafter, max_new_tokens=max_new_tokens, do_sample=False,
                       return_dict_in_generate=True)
        rows.append(out.stats.as_dict())
    return {"decode/tau": pooled_tau(rows)} | {
        f"decode/acceptance_depth{d + 1}": a for d, a in enumerate(pooled_position_acceptance(rows))}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train_drafter")
def main(cfg: DictConfig) -> None:
    settings = validate_training(cfg)  # before anything loads
    torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    logger = NullLogger()
    if accelerator.is_main_process:
        logger = make_logger(cfg.logger.kind, out_dir, OmegaConf.to_container(cfg, resolve=True), cfg.logger.project,
                             cfg.logger.mode, name=f"train {cfg.drafter.name} {out_dir.name}",
                             tags=[cfg.drafter.name, "train"], job_type="train")
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype)
    data_settings = DistillSettings(**{k: v for k, v in OmegaConf.to_container(cfg.data).items()
                                       if k != "teacher_layers"})
    settings = resolved(cfg.drafter.name, model, settings)  # EAGLE-3's layers for this target, PARD's from init_from
    layers = tuple(sorted(set(cfg.data.teacher_layers) | drafter_layers(cfg.drafter.name, settings)))
    with accelerator.main_process_first():  # one process builds the cached set, the others read it
        data = distill_set(model, tokenizer, data_settings, layers)
    data.check_enough(settings.batch_size, settings.seq_len, settings.holdout, accelerator.num_processes)
    module, vocab, metrics = train(cfg.drafter.name, model, data, settings, logger.log_metrics, accelerator)
    if accelerator.is_main_process:
        path = checkpoint_file(cfg)
        kind = cfg.drafter.name
        save_checkpoint(path, kind, trained_weights(kind, module), module_settings(kind, model, settings), model,
                        vocab, cfg.model.name, metrics | {"train": dataclasses.asdict(settings)})
        drafter_cfg = {k: v for k, v in OmegaConf.to_container(cfg.drafter, resolve=True).items()
                       if k not in ("name", "train")}
        if cfg.decode_prompts:
            metrics |= held_out_decode(drafter_cfg, path, model, tokenizer, data.sequences, data.prompt_lens,
                                       cfg.decode_prompts, cfg.decode_max_new_tokens)
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)}, 10**9)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(json.dumps({k: v for k, v in metrics.items() if k != "rank_accuracy"}, indent=1))
        print(f"checkpoint: {path}")
    logger.finish()


if __name__ == "__main__":
    main()
