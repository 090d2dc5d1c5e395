"""Read logged runs back and draw the benchmark figures: used by ``experiments.report`` and the notebooks.

A run directory holds ``results.jsonl`` (one row per prompt and method); a sweep directory
holds one run directory per job, each with ``.hydra/overrides.yaml``. Every row read back
gets a ``variant``: the job's overrides joined (``drafter.k=4``), so methods of different
jobs stay apart.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure  # figures without pyplot: no global backend, nothing to close

from specdec.tooling.benchmark import markdown_table, summarize


def _variant(run_dir: Path) -> str:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return ""
    lines = [line.strip().removeprefix("- ").strip("'\"") for line in overrides.read_text().splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(("hydra", "dataset.path", "model.name", "progress")))


def load_runs(path: str | Path) -> list[dict]:
    """Every result row under ``path`` (a run or a sweep directory), each with its ``variant``."""
    path = Path(path)
    files = sorted(path.rglob("results.jsonl"))
    if not files:
        raise FileNotFoundError(f"no results.jsonl under {str(path)!r}: give a run or sweep directory")
    rows = []
    for file in files:
        variant = _variant(file.parent)
        for line in file.read_text().splitlines():
            row = json.loads(line)
            row["variant"] = variant
            if variant and row["method"] != "generate":
                row["method"] = f"{row['method']} [{variant}]"
            rows.append(row)
    return rows


def _summaries(rows: list[dict]) -> list[dict]:
    """Summaries per variant (each against its own interleaved baseline), concatenated."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        out += [s | {"variant": variant} for s in summarize([r for r in rows if r["variant"] == variant])]
    return out


def speedup_figure(rows: list[dict]):
    """Bars: speedup over model.generate per task, one bar per method."""
    summary = [s for s in _summaries(rows) if s["method"] != "generate"]
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    fig = Figure(figsize=(max(6, 0.6 * len(tasks) * len(methods)), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        values = [next((s["speedup"] for s in summary if s["task"] == t and s["method"] == method), 0) for t in tasks]
        ax.bar([t + m * width for t in range(len(tasks))], values, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("speedup over model.generate()")
    ax.legend(fontsize=7)
    return fig


def tau_figure(rows: list[dict]):
    """Bars: mean accepted tokens per step (tau), overall, per method."""
    summary = [s for s in _summaries(rows) if s["task"] == "overall" and s["tau"] is not None]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.barh([s["method"] for s in summary], [s["tau"] for s in summary])
    ax.set_xlabel("tau (tokens per decoding step)")
    return fig


def acceptance_figure(rows: list[dict]):
    """Curves: acceptance at each draft depth (mean over prompts), per method."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for method in dict.fromkeys(r["method"] for r in rows):
        curves = [r["position_acceptance"] for r in rows if r["method"] == method and r.get("position_acceptance")]
        if not curves:
            continue
        depth = max(map(len, curves))
        mean = [sum(c[d] for c in curves if len(c) > d) / sum(1 for c in curves if len(c) > d) for d in range(depth)]
        ax.plot(range(1, depth + 1), mean, marker="o", label=method)
    ax.set_xlabel("draft depth")
    ax.set_ylabel("acceptance")
    ax.legend(fontsize=7)
    return fig


def latency_figure(rows: list[dict]):
    """Box plots: time to first token and time per output token, per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("ttft_s", "tpot_s"), ("time to first token (s)", "time per output token (s)")):
        data = [[r[key] for r in rows if r["method"] == m and r.get(key) is not None] for m in methods]
        ax.boxplot([d or [0.0] for d in data])
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
    return fig


FIGURES = {"speedup": speedup_figure, "tau": tau_figure, "acceptance": acceptance_figure, "latency": latency_figure}


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """``report.md`` (a table per variant) and one PNG per figure, in ``out`` (default: ``path``)."""
    rows = load_runs(path)
    out = Path(out or path)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Report: {Path(path).resolve().name}", ""]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        parts += [f"## {variant or 'run'}", "", markdown_table(summarize(mine)), ""]
    for name, draw in FIGURES.items():
        fig = draw(rows)
        fig.savefig(out / f"{name}.png", dpi=100)
        parts.append(f"![{name}]({name}.png)")
    report = out / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report
