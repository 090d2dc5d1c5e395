"""Where a decoding step's time goes, phase by phase, against the memory floor.

    python -m experiments.profile_step                                   # the default config's drafter and prompts
    python -m experiments.profile_step --run outputs/2026-12-05/08-42-09 # a run directory's settings
    python -m experiments.profile_step drafter=prompt_lookup dataset.per_task=1 max_new_tokens=64

Decodes every prompt of the config's prompt set (Spec-Bench's sample by default; ``--prompts N`` keeps
the first N) with no drafter and with the config's drafter, interleaved per prompt, in one process, with
the engine's phase clock on (``Options(profile=True)``, :class:`specdec.stats.StepTimes`), and prints the
mean milliseconds per step of each phase:

- **draft**: the proposer's draft, the depth policy's cap and trim, and the tree checks;
- **forward**: the target's verification forward, split into its linear products, its attention
  layers and the rest (norms, rotary embeddings, activations, the cache update, the modules' Python);
- **verify inputs and checks**: the forward's inputs (ids, positions, the tree mask) and the q checks;
- **logits processing and acceptance**: p from the logits, and the acceptance rule;
- **cache commit**: the accepted keys and values moved into place (and finished rows dropped);
- **engine bookkeeping**: the rest of the commit (tokens, EOS, stats, the proposer's commit).

Each column's phases are summed and set against the measured step time (the wall time of each decode's
loop of steps, measured around it, over its steps); the two agree when nothing outside the phases costs
time. The roofline
line gives the floor: the target's weight bytes over the machine's measured read bandwidth
(:mod:`experiments.roofline`). Overrides are Hydra's, on ``configs/config.yaml`` or on the run
directory's ``.hydra/config.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from specdec import load_model
from specdec.engine import NO_DRAFT, decode
from specdec.options import Options
from specdec.sampling import Sampling
from specdec.stats import StepTimes
from specdec.text import encode
from specdec.tooling.data import SPEC_BENCH, load_prompts

from . import CONFIG_DIR
from .roofline import floor_line
from .run import build_drafter
from .schema import register

ROWS = (  # (label, seconds per step from a StepTimes)
    ("draft", lambda t: t.propose),
    ("forward: linear products", lambda t: t.linear),
    ("forward: attention", lambda t: t.attention),
    ("forward: the rest", lambda t: t.forward - t.linear - t.attention),
    ("verify inputs and checks", lambda t: t.verify - t.forward),
    ("logits processing and acceptance", lambda t: t.accept),
    ("cache commit", lambda t: t.cache),
    ("engine bookkeeping", lambda t: t.commit - t.cache),
)


def config(run: str | None, overrides: list[str]):
    """The run directory's config (``run``) or ``configs/config.yaml``, with Hydra ``overrides``."""
    if run is not None:
        cfg = OmegaConf.load(Path(run) / ".hydra" / "config.yaml")
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def add(total: StepTimes, times: StepTimes) -> None:
    for name in vars(total):
        setattr(total, name, getattr(total, name) + getattr(times, name))


def profile(model, tokenizer, prompts, drafters: dict, cfg) -> dict[str, dict]:
    """Each drafter's summed :class:`StepTimes`, measured step seconds, steps and new tokens over ``prompts``."""
    eos = model.generation_config.eos_token_id
    eos = (eos,) if isinstance(eos, int) else tuple(eos or ())
    sampling = {k: v for k, v in OmegaConf.to_container(cfg.sampling).items() if k != "name" and v is not None}
    results = {name: {"times": StepTimes(), "measured": 0.0, "steps": 0, "tokens": 0} for name in drafters}
    for i, prompt in enumerate(prompts):
        ids = encode(tokenizer, [{"role": "user", "content": prompt.turns[0]}])[None]
        order = list(drafters.items())
        order = order[i % len(order):] + order[: i % len(order)]  # rotated per prompt, as the benchmark does
        for name, drafter in order:
            options = Options(max_new_tokens=cfg.max_new_tokens, sampling=Sampling(eos_token_ids=eos, **sampling),
                              attention_backend=cfg.attention_backend, linear_backend=cfg.linear_backend,
                              min_verify_tokens=cfg.min_verify_tokens if drafter is not NO_DRAFT else 1,
                              profile=True)
            generator = torch.Generator().manual_seed(i)
            out, stats = decode(model, ids, drafter, options, generator)
            result = results[name]
            add(result["times"], stats.times)
            result["measured"] += stats.times.wall
            result["steps"] += stats.times.steps
            result["tokens"] += len(out[0])
    return results


def table(results: dict[str, dict], floor: float) -> str:
    """Markdown: ms per step of each phase, per drafter; the sum against the measured step; the floor."""
    names = list(results)
    lines = ["| phase | " + " | ".join(f"{n} ms/step" for n in names) + " |", "|---|" + "---|" * len(names)]
    per = {n: results[n]["steps"] or 1 for n in names}
    for label, get in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{1e3 * get(results[n]['times']) / per[n]:.2f}" for n in names)
                     + " |")
    total = {n: results[n]["times"].total / per[n] for n in names}
    measured = {n: results[n]["measured"] / per[n] for n in names}
    tau = {n: results[n]["tokens"] / per[n] for n in names}
    lines += [
        "| **step, sum of the phases** | " + " | ".join(f"**{1e3 * total[n]:.2f}**" for n in names) + " |",
        "| step, measured (the decode loop's wall time) | " + " | ".join(f"{1e3 * measured[n]:.2f}" for n in names) + " |",
        "| sum / measured | " + " | ".join(f"{total[n] / measured[n]:.3f}" for n in names) + " |",
        "| step over the forward (ms) | " + " | ".join(
            f"{1e3 * (total[n] - (results[n]['times'].forward + results[n]['times'].propose) / per[n]):.2f}"
            for n in names) + " |",
        "| forward / floor | " + " | ".join(f"{results[n]['times'].forward / per[n] / floor:.2f}x" for n in names)
        + " |",
        "| tokens per step | " + " | ".join(f"{tau[n]:.2f}" for n in names) + " |",
        "| tokens/s (of the steps) | " + " | ".join(f"{tau[n] / measured[n]:.1f}" for n in names) + " |",
        "| tokens/s / floor's | " + " | ".join(f"{tau[n] / measured[n] * floor:.2f}x" for n in names) + " |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory: profile with its settings")
    parser.add_argument("--prompts", type=int, default=None, help="profile only the first N prompts")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. drafter=prompt_lookup max_new_tokens=64")
    args = parser.parse_args()
    cfg = config(args.run, args.overrides)
    torch.set_num_threads(cfg.threads)
    tasks = list(cfg.dataset.tasks) if cfg.dataset.tasks else None
    prompts = load_prompts(cfg.dataset.path or SPEC_BENCH, per_task=cfg.dataset.per_task, seed=cfg.dataset.seed,
                           tasks=tasks)[: args.prompts]
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype)
    floor, line = floor_line(model)
    drafters = {"no drafter": NO_DRAFT, cfg.drafter.name: build_drafter(cfg.drafter)}
    profile(model, tokenizer, prompts[:1], drafters, cfg)  # warm-up: packed weights, the cost curve, the build
    results = profile(model, tokenizer, prompts, drafters, cfg)
    print(f"{cfg.model.name}, {len(prompts)} prompts of {cfg.dataset.name}, {cfg.max_new_tokens} new tokens, "
          f"{cfg.threads} threads, linear_backend={cfg.linear_backend}: mean ms per step\n")
    print(line + "\n")
    print(table(results, floor))


if __name__ == "__main__":
    main()
