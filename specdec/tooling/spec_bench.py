"""A benchmark run in Spec-Bench's own answer format, so its ``evaluation/speed.py`` and
``evaluation/equal.py`` read a specdec run unchanged.

One ``model_answer`` jsonl per method (``model_answer/<method>.jsonl`` in the run directory, the
method named as the run's table names it: ``generate.jsonl`` is the ``model.generate`` baseline). Each
line is one question, as Spec-Bench's inference scripts write it::

    {"question_id": 81, "category": "writing", "model_id": "specdec_eagle", "answer_id": "...",
     "choices": [{"index": 0, "turns": ["..."], "new_tokens": [128], "wall_time": [4.2],
                  "accept_lengths": [1, 3, 2, ...], "decoding_steps": [61]}], "tstamp": ...}

``turns`` is each turn's text, ``new_tokens`` and ``wall_time`` each turn's count and seconds
(prefill included), and ``accept_lengths`` every decoding step's tokens added, all turns in order:
methods without a drafter add one token a step (``model.generate`` writes ``[1] * new_tokens``, as
Spec-Bench's baseline does). In a batch of questions each question gets the batch's wall time: where
every batch is full, the speedups ``speed.py`` computes are then the run's own and its tokens/s is the
run's divided by the batch size (a smaller last batch weighs a little differently).

Differences from ``speed.py`` to know: it counts the *baseline's* tokens by re-tokenizing its text
less one (Vicuna's BOS); the run's table counts them as generated, as ``speed.py`` does for every
other method. ``new_tokens`` here is exactly what was generated, and ``tests/test_experiments.py``
recomputes the table from ``new_tokens`` on both sides.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path

ANSWER_DIR = "model_answer"


def answers(rows: Sequence[dict], method: str) -> list[dict]:
    """``method``'s rows as Spec-Bench answer records, one per question (its turns in order)."""
    questions: dict[int, dict] = {}
    for r in rows:
        if r["method"] != method:
            continue
        ids = r["prompt_id"] if isinstance(r["prompt_id"], list) else [r["prompt_id"]]
        categories = r.get("categories") or [r["category"]] * len(ids)
        for b, (qid, category) in enumerate(zip(ids, categories)):
            n_new = r["row_new_tokens"][b]
            accept = r["accept_lengths"][b] if r.get("accept_lengths") else [1] * n_new
            record = questions.setdefault(qid, {
                "question_id": qid, "category": category, "answer_id": uuid.uuid4().hex, "model_id": method,
                "choices": [{"index": 0, "turns": [], "new_tokens": [], "wall_time": [], "accept_lengths": [],
                             "decoding_steps": []}],
            })
            choice = record["choices"][0]
            choice["turns"].append(r["texts"][b])
            choice["new_tokens"].append(n_new)
            choice["wall_time"].append(r["seconds"])
            choice["accept_lengths"].extend(accept)
            choice["decoding_steps"].append(len(accept))
    return list(questions.values())


def export_answers(rows: Sequence[dict], out: str | Path) -> Path:
    """Write every method's ``model_answer/<method>.jsonl`` under ``out``; returns that folder."""
    folder = Path(out) / ANSWER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for method in dict.fromkeys(r["method"] for r in rows):
        with (folder / f"{method}.jsonl").open("w") as f:
            f.writelines(json.dumps(a) + "\n" for a in answers(rows, method))
    return folder

