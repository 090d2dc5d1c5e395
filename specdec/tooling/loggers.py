"""Where an experiment's results go besides its run directory: nothing, a CSV, or Weights & Biases.

Every logger receives plain data (the resolved config as a dict, result rows, the summary),
so the library never sees a Hydra ``DictConfig``. W&B runs offline unless told otherwise:
``WANDB_MODE`` (if set) wins over ``mode``; an offline run is synced later with ``wandb sync``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Protocol

from specdec.tooling.benchmark import pooled_position_acceptance


class RunLogger(Protocol):
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_row(self, row: dict, step: int) -> None: ...
    def log_results(self, rows: list[dict], summary: list[dict], table: str,
                    figures: dict[str, Path] | None = None) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """Logs nothing (the run directory still gets results.jsonl, summary.csv and table.md)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_row(self, row: dict, step: int) -> None:
        pass

    def log_results(self, rows: list[dict], summary: list[dict], table: str,
                    figures: dict[str, Path] | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def _flat(row: dict) -> dict:
    """Lists (per-position acceptance, batched prompt ids) as JSON strings, for flat tables."""
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}


class CsvLogger(NullLogger):
    """Every result row, flat, in ``results.csv`` of the run directory."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / "results.csv"
        self.metrics_path = Path(out_dir) / "metrics.jsonl"

    def log_metrics(self, metrics: dict, step: int) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_results(self, rows: list[dict], summary: list[dict], table: str,
                    figures: dict[str, Path] | None = None) -> None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(_flat(r) for r in rows)


ROW_METRICS = ("tokens_per_s", "tau", "acceptance_rate", "ttft_s", "tpot_s", "new_tokens", "seconds")
SUMMARY_METRICS = ("tokens_per_s", "speedup", "tau", "acceptance_rate", "exact")


def acceptance_rows(rows: list[dict]) -> list[list]:
    """``[method, depth, acceptance, prompts]``: per-position acceptance pooled over every step of the
    prompts that drafted that deep, per method (the long format a line plot or a pivot wants)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r.get("drafted_at")]
        for d, acceptance in enumerate(pooled_position_acceptance(mine)):
            out.append([method, d + 1, acceptance, sum(len(r["drafted_at"]) > d for r in mine)])
    return out


class WandbLogger:
    """A W&B run: the resolved config (prompt ids, batch size and turns are config or table columns,
    never metrics), one history step per prompt with every method's tokens/s, tau and acceptance,
    then the results, summary and per-position acceptance as tables, an acceptance plot, the
    figures as images, and a summary keyed ``<task>/<method>/<metric>``. Sweeps pass a ``group``,
    ``tags`` and a ``job_type`` so two sweeps stay apart."""

    def __init__(self, out_dir: Path, config: dict, project: str = "specdec", mode: str = "offline",
                 name: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 job_type: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, dir=str(out_dir), config=config, name=name, group=group,
                              tags=tags, job_type=job_type, mode=os.environ.get("WANDB_MODE", mode))
        self._per_prompt: set[str] = set()

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_row(self, row: dict, step: int) -> None:
        """One method's numbers on one prompt; rows of the same prompt share ``step`` (one history row).
        They stay out of the run summary, which holds the aggregates of :meth:`log_results` only."""
        metrics = {f"{row['method']}/{k}": row[k] for k in ROW_METRICS if row.get(k) is not None}
        for key in metrics.keys() - self._per_prompt:
            self.run.define_metric(key, summary="none")
            self._per_prompt.add(key)
        self.run.log(metrics, step=step)

    def log_results(self, rows: list[dict], summary: list[dict], table: str,
                    figures: dict[str, Path] | None = None) -> None:
        wandb = self._wandb
        flat = [_flat(r) for r in rows]
        columns = list(dict.fromkeys(k for row in flat for k in row))
        acceptance = wandb.Table(columns=["method", "depth", "acceptance", "prompts"], data=acceptance_rows(rows))
        logged = {
            "results": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in flat]),
            "summary_table": wandb.Table(columns=list(summary[0]), data=[list(s.values()) for s in summary]),
            "position_acceptance": acceptance,
            "position_acceptance_plot": wandb.plot.line(acceptance, "depth", "acceptance", stroke="method",
                                                        title="Acceptance per draft depth"),
        }
        logged |= {f"figures/{name}": wandb.Image(str(path)) for name, path in (figures or {}).items()}
        self.run.log(logged)
        for s in summary:
            for key in SUMMARY_METRICS:
                if s[key] is not None:
                    self.run.summary[f"{s['task']}/{s['method']}/{key}"] = s[key]
        self.run.summary["table"] = table

    def finish(self) -> None:
        self.run.finish()


def make_logger(kind: str, out_dir: Path, config: dict, project: str = "specdec", mode: str = "offline",
                name: str | None = None, **wandb_args) -> RunLogger:
    """``"none"``, ``"csv"`` or ``"wandb"`` (``wandb_args``: group, tags, job_type)."""
    if kind == "none":
        return NullLogger()
    if kind == "csv":
        return CsvLogger(out_dir)
    if kind == "wandb":
        return WandbLogger(out_dir, config, project, mode, name, **wandb_args)
    raise ValueError(f"logger {kind!r} is not one of none, csv, wandb")
