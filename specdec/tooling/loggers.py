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


class RunLogger(Protocol):
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_row(self, row: dict, step: int) -> None: ...
    def log_results(self, rows: list[dict], summary: list[dict], table: str) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """Logs nothing (the run directory still gets results.jsonl, summary.csv and table.md)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_row(self, row: dict, step: int) -> None:
        pass

    def log_results(self, rows: list[dict], summary: list[dict], table: str) -> None:
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

    def log_results(self, rows: list[dict], summary: list[dict], table: str) -> None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(_flat(r) for r in rows)


class WandbLogger:
    """A W&B run: the resolved config, one step per result row, a results table and a summary."""

    def __init__(self, out_dir: Path, config: dict, project: str = "specdec", mode: str = "offline",
                 name: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, dir=str(out_dir), config=config, name=name,
                              mode=os.environ.get("WANDB_MODE", mode))

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_row(self, row: dict, step: int) -> None:
        numbers = {f"{row['method']}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
        numbers["prompt_index"] = step
        self.run.log(numbers)

    def log_results(self, rows: list[dict], summary: list[dict], table: str) -> None:
        flat = [_flat(r) for r in rows]
        columns = list(dict.fromkeys(k for row in flat for k in row))
        self.run.log({
            "results": self._wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in flat]),
            "summary_table": self._wandb.Table(columns=list(summary[0]), data=[list(s.values()) for s in summary]),
        })
        for s in summary:
            for key in ("tokens_per_s", "speedup", "tau", "exact"):
                if s[key] is not None:
                    self.run.summary[f"{s['task']}/{s['method']}/{key}"] = s[key]
        self.run.summary["table"] = table

    def finish(self) -> None:
        self.run.finish()


def make_logger(kind: str, out_dir: Path, config: dict, project: str = "specdec", mode: str = "offline",
                name: str | None = None) -> RunLogger:
    """``"none"``, ``"csv"`` or ``"wandb"``."""
    if kind == "none":
        return NullLogger()
    if kind == "csv":
        return CsvLogger(out_dir)
    if kind == "wandb":
        return WandbLogger(out_dir, config, project, mode, name)
    raise ValueError(f"logger {kind!r} is not one of none, csv, wandb")
