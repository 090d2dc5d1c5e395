"""Prompt sets for benchmarks: Spec-Bench (and any JSONL of the same schema).

Rows are ``{"question_id", "category", "turns": [...]}``. Spec-Bench's six tasks are
the *task* of a prompt: its eight MT-bench labels (writing, roleplay, ...) form the
one task ``mt_bench``, as in Spec-Bench's own reports. The files are ``data/`` in the
checkout and ``specdec/tooling/prompt_sets/`` in a wheel (:data:`DATA_DIR` is either).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MT_BENCH_LABELS = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def _data_dir() -> Path:
    """The prompt sets: ``data/`` at the top of the checkout, which a wheel installs as
    ``specdec/tooling/prompt_sets/`` (pyproject.toml's package-dir)."""
    here = Path(__file__).resolve().parent
    installed, checkout = here / "prompt_sets", here.parents[1] / "data"
    return installed if (installed / "spec_bench").is_dir() else checkout


DATA_DIR = _data_dir()
SPEC_BENCH = DATA_DIR / "spec_bench" / "question.jsonl"


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: its id, Spec-Bench task, original category and turns."""

    id: int
    task: str
    category: str
    turns: tuple[str, ...]


def load_prompts(path: str | Path = SPEC_BENCH, per_task: int | None = None, seed: int = 0,
                 tasks: list[str] | None = None) -> list[Prompt]:
    """Read a JSONL prompt file; only ``tasks`` if given; with ``per_task``, a fixed random sample of
    that many per task.

    The sample depends only on the file and ``seed``, so every run compares the same prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    prompts = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            turns = row.get("turns") or ([row["prompt"]] if "prompt" in row else None)
            if not turns:
                raise ValueError(f"{path}:{line_no} has no 'turns' (or 'prompt'): each row needs the prompt text")
            category = row.get("category", "default")
            task = "mt_bench" if category in MT_BENCH_LABELS else category
            if tasks is None or task in tasks:
                prompts.append(Prompt(int(row.get("question_id", line_no)), task, category, tuple(turns)))
    if not prompts:
        raise ValueError(f"no prompts in {path} for tasks {tasks}: check the task names")
    if per_task is None:
        return prompts
    if per_task < 1:
        raise ValueError(f"per_task={per_task} must be >= 1 (or None for every prompt)")
    rng = random.Random(seed)
    by_task: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_task.setdefault(prompt.task, []).append(prompt)
    sample = []
    for task in by_task:  # file order of first appearance
        group = by_task[task]
        sample += sorted(rng.sample(group, min(per_task, len(group))), key=lambda p: p.id)
    return sample
