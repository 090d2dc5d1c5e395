"""Read logged runs back and draw the figures of a paper: used by ``experiments.report``, the
benchmark run itself and the notebooks.

A *job* is one run directory: ``results.jsonl`` (one row per prompt and method) beside
``.hydra/config.yaml`` and ``.hydra/overrides.yaml``; a sweep directory holds one job per
sub-directory. A job's *settings* are its overrides. Settings that differ across the jobs read
together are *swept*; the rest, with the resolved config, make the caption (model, data set,
prompts, new tokens, batch, sampling, threads).

Swept drafter settings (``drafter*``, ``tree*``, ``variants*``, ``min_verify_tokens``) become
*series*: each speculative method once per swept value, while the methods they cannot touch
(``model.generate``, transformers' assisted generation, the engine without a drafter) are drawn
once, pooled over those jobs. Any other swept setting (batch size, sampling, an experiment
overlay) becomes a *facet*, a panel of its own with its own baselines. Jobs with the same
settings are never pooled: each becomes a facet named by its directory.

Every figure gives the spread across prompts (error bars of one standard error, or the prompts
themselves as points), is titled with the caption, and is written as PNG and PDF.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure  # figures without pyplot: no global backend, nothing to close
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from specdec.tooling.benchmark import (BASELINE, markdown_table, pooled_position_acceptance, pooled_tau,
                                       question_speeds, summarize)
from specdec.tooling.manifest import headline

DRAFTER_KEYS = ("drafter", "tree", "variants", "min_verify_tokens")  # settings only speculative methods see
NOISE_KEYS = ("hydra", "progress", "logger")  # where and how a job logged: never a setting
NOT_SPECULATIVE = ("specdec_no_draft",)  # specdec_* methods that no drafter setting touches
FORMATS = ("png", "pdf")


@dataclass
class Job:
    """One run directory: its rows, its settings (overrides) and its resolved config."""

    path: Path
    label: str  # the directory, relative to what was read
    rows: list[dict]
    settings: dict[str, str]
    config: dict = field(default_factory=dict)


@dataclass
class Runs:
    """Jobs read together; every row carries ``job``, ``facet`` and ``series`` labels."""

    root: Path
    jobs: list[Job]
    rows: list[dict]
    swept: list[str]  # settings that differ across jobs
    caption: str  # what every job shares: model, data, prompts, tokens, batch, sampling

    @property
    def facets(self) -> list[str]:
        return list(dict.fromkeys(r["facet"] for r in self.rows))

    @property
    def series(self) -> list[str]:
        return list(dict.fromkeys(r["series"] for r in self.rows))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _drafter_setting(key: str) -> bool:
    return key.split(".")[0] in DRAFTER_KEYS


def _speculative(method: str) -> bool:
    return method.startswith("specdec_") and method not in NOT_SPECULATIVE


def _settings(run_dir: Path) -> dict[str, str]:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return {}
    lines = [line.strip().removeprefix("- ").strip("'\"") for line in overrides.read_text().splitlines()]
    pairs = [line.split("=", 1) for line in lines if "=" in line]
    return {k.lstrip("+~"): v for k, v in pairs if not k.lstrip("+~").startswith(NOISE_KEYS)}


def _config(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(path: str | Path = "outputs") -> Path:
    """``path`` if it exists; a relative path not found from here is looked up in each parent
    directory up to the project's root (the first with ``pyproject.toml`` or ``.git``), so
    ``"outputs"`` finds the repository's from ``notebooks/``."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    for parent in Path.cwd().resolve().parents:
        if (parent / path).exists():
            return parent / path
        if (parent / "pyproject.toml").is_file() or (parent / ".git").exists():
            break
    raise FileNotFoundError(f"no {str(path)!r} in {Path.cwd()} or its parents up to the project root: "
                            "give a run or sweep directory")


def load_runs(path: str | Path) -> Runs:
    """Every job under ``path`` (a run or a sweep directory), labelled; see the module docstring."""
    root = find_runs(path)
    files = sorted(root.rglob("results.jsonl"), key=_natural)
    if not files:
        raise FileNotFoundError(f"no results.jsonl under {str(path)!r}: give a run or sweep directory")
    jobs = []
    for file in files:
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        label = str(file.parent.relative_to(root)) if file.parent != root else file.parent.name
        jobs.append(Job(file.parent, label, rows, _settings(file.parent), _config(file.parent)))
    seen: dict[tuple, Job] = {}
    for job in jobs:  # the same settings twice: keep both apart, named by their directories
        same = seen.setdefault(tuple(sorted(job.settings.items())), job)
        if same is not job:
            same.settings.setdefault("run", same.label)
            job.settings["run"] = job.label
    keys = list(dict.fromkeys(k for job in jobs for k in job.settings))
    swept = [k for k in keys if len({job.settings.get(k) for job in jobs}) > 1]
    rows = []
    for job in jobs:
        facet = ", ".join(f"{k}={job.settings.get(k, '-')}" for k in swept if not _drafter_setting(k))
        values = ", ".join(f"{k}={job.settings.get(k, '-')}" for k in swept if _drafter_setting(k))
        for row in job.rows:
            speculative = _speculative(row["method"])
            series = f"{row['method']} ({values})" if values and speculative else row["method"]
            rows.append(row | {"job": job.label, "facet": facet, "series": series})
    return Runs(root, jobs, rows, swept, _caption(jobs, rows, swept))


def _caption(jobs: list[Job], rows: list[dict], swept: list[str]) -> str:
    """Model, data set, prompts, new tokens, batch, sampling and threads: what the jobs share."""

    def shared(get, fmt):
        values = list(dict.fromkeys(get(job.config) for job in jobs))
        return fmt(values[0]) if len(values) == 1 and values[0] is not None else None

    def sampling(c):
        s = c.get("sampling") or {}
        if not s:
            return None
        if not s.get("do_sample"):
            return "greedy"
        knobs = [f"{k} {s[k]}" for k in ("temperature", "top_k", "top_p") if s.get(k) is not None]
        return "sampled" + (f" ({', '.join(knobs)})" if knobs else "")

    model = shared(lambda c: (c.get("model") or {}).get("name"), lambda v: Path(str(v)).name)
    dataset = shared(lambda c: (c.get("dataset") or {}).get("name"), str)
    prompts = {(r["job"], json.dumps(r["prompt_id"]), r.get("turn", 1)) for r in rows if r["method"] == BASELINE}
    per_job = {j: sum(1 for p in prompts if p[0] == j) for j in dict.fromkeys(p[0] for p in prompts)}
    counts = set(per_job.values())
    tasks = len({r["task"] for r in rows})
    n = (f"{(c := counts.pop())} prompt{'s' * (c != 1)}" if len(counts) == 1
         else "prompts per run: " + "/".join(map(str, per_job.values())))
    parts = [model, f"{dataset or 'prompts'} ({n}, {tasks} task{'s' * (tasks > 1)})",
             shared(lambda c: c.get("max_new_tokens"), lambda v: f"{v} new tokens"),
             shared(lambda c: c.get("batch_size"), lambda v: f"batch {v}"),
             shared(sampling, str),
             shared(lambda c: c.get("threads"), lambda v: f"{v} thread{'s' * (v > 1)}")]
    if len(jobs) > 1:
        parts.append(f"{len(jobs)} runs")
    return " · ".join(p for p in parts if p)


# --- statistics over prompts ---------------------------------------------------------------------


def _se(values: list[float]) -> float:
    """Standard error of the mean (NaN, which draws no error bar, for a single value)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def _speedups(rows: list[dict], series: str, task: str | None) -> tuple[float, list[float]] | None:
    """Spec-Bench speedup of ``series`` (mean per-question tokens/s, turns summed, over that of
    model.generate on the same questions) and the per-question ratios, over ``task`` (None: every task)."""
    mine = question_speeds([r for r in rows if r["series"] == series and task in (None, r["task"])], _question_key)
    base = question_speeds([r for r in rows if r["method"] == BASELINE], _question_key)
    pairs = [(speed, base[k]) for k, speed in mine.items() if k in base]
    if not pairs:
        return None
    value = statistics.mean(p[0] for p in pairs) / statistics.mean(p[1] for p in pairs)
    return value, [a / b for a, b in pairs]


def _question_key(row: dict) -> tuple:
    return row["job"], json.dumps(row["prompt_id"])


# --- figures -------------------------------------------------------------------------------------


def _colors(runs: Runs) -> dict[str, str]:
    """One color per series in every figure: greys for the baselines, a qualitative map for the rest."""
    greys = iter(["0.15", "0.45", "0.65", "0.8"] * 4)
    palette = iter([f"C{i}" for i in range(10)] + ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"] * 4)
    return {s: next(greys) if not _speculative(s.split(" (")[0]) else next(palette) for s in runs.series}


def _wrap(text: str, width_in: float, fontsize: float = 10) -> str:
    """``text`` in lines that fit ``width_in`` inches at ``fontsize`` points (about 0.7 em a character)."""
    return textwrap.fill(text, max(20, int(0.95 * width_in * 100 / fontsize)))


def _figure(runs: Runs, width: float, height: float, nrows: int, ncols: int, note: str, **kwargs):
    """A figure titled with the caption (wrapped to its width) and ``note`` (how to read it) below."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    fig.suptitle(_wrap(runs.caption, width, 10), fontsize=10)
    fig.supxlabel(_wrap(note, width, 8), fontsize=8, color="0.3")
    return fig, axes


def _label(series: str, width: int = 34) -> str:
    """A series name fit for a tick label: the method, then its swept values wrapped below."""
    method, _, values = series.partition(" (")
    return method if not values else method + "\n" + textwrap.fill(values.rstrip(")"), width)


def _facet_title(ax, facet: str) -> None:
    if facet:
        ax.set_title(facet, fontsize=9)


def speedup_figure(runs: Runs) -> Figure:
    """Grouped bars: speedup over model.generate() per task and overall, one bar per series, error bars
    over prompts; model.generate() is the line at 1."""
    tasks = list(dict.fromkeys(r["task"] for r in runs.rows)) + ["overall"]
    colors = _colors(runs)
    series = [s for s in runs.series if not s.startswith(BASELINE)]
    facets = runs.facets
    width = min(13.0, max(6.5, 1.2 + max(0.95, 0.16 * len(series)) * len(tasks))) + 2.0  # + the legend
    fig, axes = _figure(runs, width, 1.6 + 3.0 * len(facets) + 0.25 * math.ceil(len(series) / 3), len(facets), 1,
                        "bars: Spec-Bench speedup, mean tokens/s over that of model.generate() on the same prompts "
                        "(prefill included); error bars: ±1 standard error over prompts of the per-prompt speedup",
                        sharey=True)
    bar = 0.8 / max(1, len(series))
    for ax, facet in zip(axes[:, 0], facets):
        rows = [r for r in runs.rows if r["facet"] == facet]
        for i, name in enumerate(series):
            xs, values, errors = [], [], []
            for t, task in enumerate(tasks):
                got = _speedups(rows, name, None if task == "overall" else task)
                if got:
                    xs.append(t - 0.4 + bar * (i + 0.5))
                    values.append(got[0])
                    errors.append(_se(got[1]))
            if xs:
                ax.bar(xs, values, bar, yerr=errors, color=colors[name], label=_label(name, 28),
                       error_kw={"elinewidth": 0.8, "capsize": 1.5}, gid=name)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="model.generate() (= 1)")
        ax.set_xticks(range(len(tasks)), [textwrap.fill(t.replace("_", " "), 10, break_long_words=False) for t in tasks],
                      fontsize=9)  # level, wrapped at spaces: rotated labels collide and read badly
        ax.set_xlim(-0.5, len(tasks) - 0.5)
        ax.set_ylabel("speedup (×)")
        ax.grid(axis="y", linewidth=0.3)
        _facet_title(ax, facet)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    return fig


def tau_figure(runs: Runs) -> Figure:
    """Horizontal bars: Spec-Bench's tau (mean accepted tokens per step, pooled over every step of every
    prompt) per series; each prompt's own tau as a point, the spread over prompts."""
    colors = _colors(runs)
    series = [s for s in runs.series if _speculative(s.split(" (")[0])
              and any(r["tau"] is not None for r in runs.rows if r["series"] == s)]
    facets = runs.facets
    fig, axes = _figure(runs, 7.0, 1.6 + 0.45 * max(1, len(series)) * len(facets), len(facets), 1,
                        "bars: tau, Spec-Bench's mean accepted tokens per step, pooled over every step of every "
                        "prompt; points: each prompt's own tau (the spread over prompts, not an error bar)",
                        sharex=True)
    for ax, facet in zip(axes[:, 0], facets):
        rows = [r for r in runs.rows if r["facet"] == facet and r["tau"] is not None]
        names = [s for s in series if any(r["series"] == s for r in rows)]
        for y, name in enumerate(names):
            mine = [r for r in rows if r["series"] == name]
            taus = [r["tau"] for r in mine]
            pooled = pooled_tau(mine)
            ax.barh(y, statistics.mean(taus) if pooled is None else pooled, 0.6, color=colors[name], alpha=0.85,
                    gid=name)
            jitter = [y + 0.18 * ((k * 0.618) % 1 - 0.5) for k in range(len(taus))]
            ax.scatter(taus, jitter, s=6, color="black", zorder=3, linewidths=0)
        ax.set_yticks(range(len(names)), [_label(n) for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.grid(axis="x", linewidth=0.3)
        _facet_title(ax, facet)
        if not names:
            ax.text(0.5, 0.5, "no speculative method", transform=ax.transAxes, ha="center")
    axes[-1, 0].set_xlabel("tau (tokens per step)")
    return fig


def acceptance_figure(runs: Runs) -> Figure:
    """Curves: acceptance at each draft depth, pooled over every step of every prompt, with a band of
    ±1 standard error of the per-prompt values (a spread over prompts), per series."""
    colors = _colors(runs)
    facets = runs.facets
    fig, axes = _figure(runs, 9.0, 1.6 + 3.0 * len(facets), len(facets), 1,
                        "acceptance at depth d: share of all steps (of every prompt, pooled) whose draft reached "
                        "depth d that accepted its token there; band: ±1 standard error of the per-prompt values "
                        "(a spread over prompts)", sharex=True, sharey=True)
    for ax, facet in zip(axes[:, 0], facets):
        rows = [r for r in runs.rows if r["facet"] == facet and r.get("position_acceptance")]
        names = list(dict.fromkeys(r["series"] for r in rows))
        for i, name in enumerate(names):
            mine = [r for r in rows if r["series"] == name]
            curves = [r["position_acceptance"] for r in mine]
            pooled = pooled_position_acceptance(mine) if all(r.get("drafted_at") for r in mine) else []
            dodge = 0.06 * (i - (len(names) - 1) / 2)  # equal curves side by side, not hidden behind each other
            depths, means, errors = [], [], []
            for d in range(max(map(len, curves))):
                at = [c[d] for c in curves if len(c) > d]
                depths.append(d + 1 + dodge)
                means.append(pooled[d] if len(pooled) > d else statistics.mean(at))
                errors.append(_se(at))
            ax.plot(depths, means, marker="osD^v<>"[i % 7], markersize=3.5, color=colors[name], label=_label(name, 28),
                    gid=name)
            ax.fill_between(depths, [m - e for m, e in zip(means, errors)], [m + e for m, e in zip(means, errors)],
                            color=colors[name], alpha=0.15, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("acceptance")
        ax.grid(linewidth=0.3)
        _facet_title(ax, facet)
        if not rows:
            ax.text(0.5, 0.5, "no drafted tokens", transform=ax.transAxes, ha="center")
    axes[-1, 0].set_xlabel("draft depth")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    return fig


def latency_figure(runs: Runs) -> Figure:
    """Box plots with the prompts as points: time to first token and time per output token, per series
    (batch size 1 only: a batch has no single first token)."""
    colors = _colors(runs)
    series = runs.series
    facets = runs.facets
    fig, axes = _figure(runs, 10.0, 1.6 + 0.42 * len(series) * len(facets), len(facets), 2,
                        "boxes: quartiles over prompts, whiskers 1.5 IQR; points: the prompts; "
                        "time to first token includes prefill", sharey="row")
    for row_axes, facet in zip(axes, facets):
        rows = [r for r in runs.rows if r["facet"] == facet]
        names = [s for s in series if any(r["series"] == s for r in rows)]
        for ax, key, label in zip(row_axes, ("ttft_s", "tpot_s"),
                                  ("time to first token (ms)", "time per output token (ms)")):
            data = [[1000 * r[key] for r in rows if r["series"] == n and r.get(key) is not None] for n in names]
            if not any(data):
                ax.text(0.5, 0.5, "not measured (batch size > 1)", transform=ax.transAxes, ha="center")
            for y, (name, values) in enumerate(zip(names, data)):
                if not values:
                    continue
                box = ax.boxplot([values], positions=[y], orientation="horizontal", widths=0.55, showfliers=False,
                                 patch_artist=True)
                box["boxes"][0].set(facecolor=colors[name], alpha=0.5)
                ax.scatter(values, [y + 0.15 * ((k * 0.618) % 1 - 0.5) for k in range(len(values))], s=6,
                           color="black", zorder=3, linewidths=0)
            ax.set_yticks(range(len(names)), [_label(n) for n in names], fontsize=8)
            ax.set_ylim(len(names) - 0.5, -0.5)
            ax.set_xlabel(label)
            if key == "ttft_s" and any(data):
                ax.set_xscale("log")  # prefill spans orders of magnitude across prompt lengths
                ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 100, 1000: not 10^2
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(axis="x", which="both", linewidth=0.3)
            _facet_title(ax, facet)
    return fig


FIGURES = {"speedup": speedup_figure, "tau": tau_figure, "acceptance": acceptance_figure, "latency": latency_figure}


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """``report.md`` (the caption, a table per job) and every figure as PNG and PDF, in ``out``
    (default: ``path``)."""
    runs = load_runs(path)
    out = Path(out or runs.root)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Report: {runs.root.resolve().name}", "", runs.caption, ""]
    if runs.swept:
        parts += ["Swept: " + ", ".join(f"`{k}`" for k in runs.swept), ""]
    for job in runs.jobs:
        greedy = not (job.config.get("sampling") or {}).get("do_sample", False)
        title = ", ".join(f"{k}={job.settings[k]}" for k in runs.swept if k in job.settings) or "run"
        parts += [f"## {title}", "", f"`{job.label}`", ""]
        if (job.path / "manifest.json").is_file():  # what the job ran on
            parts += [headline(json.loads((job.path / "manifest.json").read_text())), ""]
        parts += [markdown_table(summarize(job.rows, greedy=greedy)), ""]
    for name, draw in FIGURES.items():
        fig = draw(runs)
        for fmt in FORMATS:
            fig.savefig(out / f"{name}.{fmt}", dpi=150)
        parts.append(f"![{name}]({name}.png) ([PDF]({name}.pdf))")
    report = out / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report
