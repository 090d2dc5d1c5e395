"""Benchmark: methods and their baseline, interleaved in one process on the same prompts.

Spec-Bench's definitions (its ``evaluation/speed.py``): a question's *tokens/s* is its new tokens
over its wall time, summed over its turns, with prefill inside the timed region; a method's
*speedup* on a set of questions is its mean per-question tokens/s over that of the baseline
(``model.generate``); *tau* (mean accepted tokens) is the mean of every decoding step's accepted
length (tokens added), pooled over all steps of all questions of the task: never a mean of
per-question taus, which weights a short lucky question like a long one. Every prompt runs every
method back to back, in an order rotated per prompt, so slow drift of the machine hits all
methods alike.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.text import encode, left_pad
from specdec.tooling.data import Prompt
from specdec.drafters.base import Drafter
from specdec.generate import generate
from specdec.stats import SpecStats

BASELINE = "generate"
TAU_NOTE = ("Speedup: mean tokens/s over questions (prefill included) over that of `model.generate`; tau: mean "
            "accepted tokens per step, pooled over every step of every prompt (Spec-Bench's `speed.py`).")


@dataclass(frozen=True)
class Method:
    """A named way to decode: ``run(input_ids, attention_mask, streamer) -> (sequences, stats or None)``.

    Two optional hooks run outside the timed region: ``prepare(input_ids, attention_mask)`` before it
    (one-off work for this input, such as compiling for a new shape; its seconds are recorded as the
    row's ``untimed_s``), and ``finish() -> (stats or None, extra row fields)`` after it (what costs a
    round trip to read, such as a server's metrics; its stats replace ``run``'s).
    """

    name: str
    run: Callable[..., tuple[torch.Tensor, SpecStats | None]]
    prepare: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    finish: Callable[[], tuple[SpecStats | None, dict]] | None = None


class FirstTokenClock:
    """A streamer that only notes when the first new token arrives (time to first token)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(model: PreTrainedModel, max_new_tokens: int, name: str = BASELINE, sampling: dict | None = None,
                **kwargs) -> Method:
    """``model.generate`` (greedy unless ``sampling`` says otherwise), with extra ``kwargs``
    such as ``prompt_lookup_num_tokens=10``."""
    sampling = sampling or {"do_sample": False}

    def run(ids, mask, streamer=None):
        return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, streamer=streamer,
                              **sampling, **kwargs), None

    return Method(name, run)


RECOMPILE_LIMIT = 256  # hf_static_compiled: compiled shapes kept per function (dynamo's default is 8)


def hf_static_compiled(model: PreTrainedModel, max_new_tokens: int, name: str = "hf_static_compiled",
                       sampling: dict | None = None) -> Method:
    """``model.generate`` with a static cache and its decoding forward compiled by ``torch.compile``, as
    transformers documents it (``cache_implementation="static"``, ``compile_config``). The cache's shape
    follows the prompt's length, so ``prepare`` runs each new input shape once, untimed: the compiling
    is reported as the rows' ``untimed_s``, apart from the timed decoding."""
    from transformers import CompileConfig

    sampling = sampling or {"do_sample": False}
    config = CompileConfig()  # transformers' defaults
    config._compile_all_devices = True  # its switch to compile off accelerators (it compiles on GPUs by itself)
    seen: set[tuple[int, ...]] = set()

    def run(ids, mask, streamer=None):
        # one compiled graph per input shape: dynamo's default cap (8 per function) would leave the later
        # prompt lengths of a benchmark running eagerly, so the cap is raised for these calls only
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, streamer=streamer,
                                  cache_implementation="static", compile_config=config, **sampling), None

    def prepare(ids, mask) -> None:
        if tuple(ids.shape) not in seen:
            seen.add(tuple(ids.shape))
            run(ids, mask)

    return Method(name, run, prepare=prepare)


def specdec_generate(model: PreTrainedModel, drafter: Drafter | None, max_new_tokens: int, name: str,
                     attention_backend: str = "auto", sampling: dict | None = None, **kwargs) -> Method:
    """``specdec.generate`` with ``drafter`` (``None``: the engine alone), greedy unless ``sampling``;
    extra ``kwargs`` (e.g. ``min_verify_tokens=6``) go to ``generate``."""
    sampling = sampling or {"do_sample": False}

    def run(ids, mask, streamer=None):
        out = generate(model, ids, drafter, attention_mask=mask, max_new_tokens=max_new_tokens, streamer=streamer,
                       return_dict_in_generate=True, attention_backend=attention_backend, **sampling, **kwargs)
        return out.sequences, out.stats

    return Method(name, run)


def _batches(prompts: Sequence[Prompt], batch_size: int) -> list[list[Prompt]]:
    """Consecutive prompts of one task, ``batch_size`` at a time."""
    out: list[list[Prompt]] = []
    for prompt in prompts:
        if out and len(out[-1]) < batch_size and out[-1][0].task == prompt.task:
            out[-1].append(prompt)
        else:
            out.append([prompt])
    return out


def _new_tokens(row: torch.Tensor, eos: set[int]) -> list[int]:
    """A row's generated tokens up to and including its first EOS (batch padding dropped)."""
    out = []
    for tok in row.tolist():
        out.append(tok)
        if tok in eos:
            break
    return out


def run_benchmark(
    methods: Sequence[Method], tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], progress: bool = True,
    batch_size: int = 1, eos_token_ids: Sequence[int] = (), on_row: Callable[[dict], None] | None = None,
    all_turns: bool = False,
) -> list[dict]:
    """Run every method on every prompt (or batch of prompts), interleaved; one result row per
    (batch, method), whose tokens/s counts every row's new tokens over the batch's wall time.

    The first method is the baseline: every row records whether its new tokens equal the baseline's.
    With batch size 1 a row also has time to first token (``ttft_s``, prefill included) and time
    per output token after it (``tpot_s``). ``on_row`` sees each finished row (for loggers).
    With ``all_turns`` a multi-turn prompt (MT-bench) is a conversation: turn t + 1 follows the
    user's turns and the baseline's answers so far, the same input for every method; each turn is
    a row of its own (``turn``).
    """
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names {names} must be distinct")
    eos = set(eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    warm = left_pad([encode(tokenizer, [{"role": "user", "content": prompts[0].turns[0]}])[:16]] * batch_size, pad)
    warm_prepare = {}  # the warm-up's preparation (compiling for its shape), added to the method's first row
    for method in methods:  # first calls pay one-off costs (allocations, lazy init, cost curves), at this batch size
        if method.prepare is not None:
            start = time.perf_counter()
            method.prepare(*warm)
            warm_prepare[method.name] = time.perf_counter() - start
        method.run(*warm, None)
        if method.finish is not None:
            method.finish()
    rows = []
    batches = _batches(prompts, batch_size)
    turns = [min(len(p.turns) for p in batch) if all_turns else 1 for batch in batches]
    bar = tqdm(total=sum(turns) * len(methods), desc="benchmark", disable=not progress)
    for i, batch in enumerate(batches):
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        history: list[list[dict]] = [[] for _ in batch]
        for turn in range(turns[i]):
            for h, prompt in zip(history, batch):
                h.append({"role": "user", "content": prompt.turns[turn]})
            ids, mask = left_pad([encode(tokenizer, h) for h in history], pad)
            outputs = {}
            for method in order:
                clock = FirstTokenClock() if len(batch) == 1 else None
                untimed = time.perf_counter()
                if method.prepare is not None:
                    method.prepare(ids, mask)
                start = time.perf_counter()
                sequences, stats = method.run(ids, mask, clock)
                seconds = time.perf_counter() - start
                extra = {}
                if method.finish is not None:
                    stats, extra = method.finish()
                new = [_new_tokens(r, eos) for r in sequences[:, ids.shape[1]:]]
                outputs[method.name] = new
                n_new = sum(map(len, new))
                prompt = batch[0]
                rows.append({
                    "prompt_id": prompt.id if len(batch) == 1 else [p.id for p in batch], "task": prompt.task,
                    "category": prompt.category,
                    "categories": [p.category for p in batch], "turn": turn + 1, "method": method.name, "batch_size": len(batch),
                    "prompt_tokens": int(mask.sum()), "new_tokens": n_new, "seconds": seconds,
                    "tokens_per_s": n_new / seconds,
                    "ttft_s": clock.first - start if clock and clock.first else None,
                    "tpot_s": (start + seconds - clock.first) / (n_new - 1) if clock and clock.first and n_new > 1
                    else None,
                    "row_new_tokens": [len(n) for n in new],
                    "texts": [tokenizer.decode(n, skip_special_tokens=True) for n in new],
                    "tau": stats.tau if stats else None,  # this prompt's own (its steps pooled over its rows)
                    "acceptance_rate": stats.acceptance_rate if stats and stats.drafted else None,
                    "drafted": stats.drafted if stats else None,
                    "accepted": stats.accepted if stats else None,
                    "drafted_at": stats.drafted_at if stats else None,
                    "accepted_at": stats.accepted_at if stats else None,
                    "position_acceptance": stats.position_acceptance if stats else None,
                    "accept_lengths": stats.accept_lengths if stats else None,  # per batch row, per step
                    "untimed_s": start - untimed + warm_prepare.pop(method.name, 0.0) if method.prepare is not None
                    else None,
                } | extra)
                bar.update()
                bar.set_postfix(prompt=prompt.id, turn=turn + 1, method=method.name)
            base = outputs[methods[0].name]
            for row in rows[-len(methods):]:
                row["matches_baseline"] = outputs[row["method"]] == base
                if on_row is not None:
                    on_row(row)
            for h, answer in zip(history, base):
                h.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
    bar.close()
    return rows


def question_speeds(rows: Sequence[dict], key=lambda row: json.dumps(row["prompt_id"])) -> dict:
    """Spec-Bench's per-question tokens/s, by ``key(row)``: new tokens over wall time, each summed over the
    question's turns (rows of one method; a batch of questions is one question here)."""
    totals: dict = {}
    for r in rows:
        n, seconds = totals.get(key(r), (0, 0.0))
        totals[key(r)] = (n + r["new_tokens"], seconds + r["seconds"])
    return {k: n / seconds for k, (n, seconds) in totals.items()}


def pooled_tau(rows: Sequence[dict]) -> float | None:
    """Spec-Bench's tau: the mean accepted length over every decoding step of every row, pooled
    (``None`` where no row has per-step accept lengths). A peer's row that has only totals (``steps``,
    no per-step lengths: vLLM's counters) adds its new tokens and steps to the pool."""
    lengths = [n for r in rows for row in (r.get("accept_lengths") or []) for n in row]
    totals = [(r["new_tokens"], r["steps"]) for r in rows if not r.get("accept_lengths") and r.get("steps")]
    steps = len(lengths) + sum(s for _, s in totals)
    return (sum(lengths) + sum(n for n, _ in totals)) / steps if steps else None


def pooled_acceptance(rows: Sequence[dict]) -> float | None:
    """Accepted draft tokens over drafted ones, pooled over every step of every row (``None`` when
    nothing was drafted)."""
    drafted = sum(r.get("drafted") or 0 for r in rows)
    return sum(r.get("accepted") or 0 for r in rows) / drafted if drafted else None


def pooled_position_acceptance(rows: Sequence[dict]) -> list[float]:
    """Per depth d: steps (of every row, pooled) accepting a token at depth d over steps drafting depth d;
    from each row's ``drafted_at`` / ``accepted_at`` counts."""
    rows = [r for r in rows if r.get("drafted_at")]
    out = []
    for d in range(max((len(r["drafted_at"]) for r in rows), default=0)):
        drafted = sum(r["drafted_at"][d] for r in rows if len(r["drafted_at"]) > d)
        accepted = sum(r["accepted_at"][d] for r in rows if len(r["accepted_at"]) > d)
        out.append(accepted / drafted if drafted else 0.0)
    return out


def summarize(rows: Sequence[dict], baseline: str = BASELINE, greedy: bool = True) -> list[dict]:
    """Per task (and ``overall``) and method: prompts, tokens/s (mean over questions), speedup over
    ``baseline``, tau and acceptance rate (pooled over steps), latencies (mean over prompts), and
    ``exact`` (share of prompts equal to the baseline; ``None`` when sampling, where outputs differ
    by design). The figures are Spec-Bench's: see the module docstring."""
    tasks = list(dict.fromkeys(r["task"] for r in rows)) + ["overall"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = []
    for task in tasks:
        mine = [r for r in rows if task in ("overall", r["task"])]
        base = statistics.mean(question_speeds([r for r in mine if r["method"] == baseline]).values())
        for method in methods:
            sel = [r for r in mine if r["method"] == method]
            speed = statistics.mean(question_speeds(sel).values())
            table.append({
                "task": task, "method": method, "prompts": len(sel), "tokens_per_s": speed,
                "speedup": speed / base, "tau": pooled_tau(sel), "acceptance_rate": pooled_acceptance(sel),
                "ttft_s": _mean(r.get("ttft_s") for r in sel), "tpot_s": _mean(r.get("tpot_s") for r in sel),
                "exact": sum(r["matches_baseline"] for r in sel) / len(sel) if greedy else None,
                "untimed_s": _sum(r.get("untimed_s") for r in sel),  # compiling/warm-up outside the timing
                "http_overhead_s": _mean(r.get("http_overhead_s") for r in sel),  # per request, not subtracted
            })
    return table


def speedup_table(summary: Sequence[dict]) -> str:
    """The summary with one row per method: speedup (tau) per task, then tokens/s and acceptance overall."""
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    lines = ["| method | " + " | ".join(tasks) + " | tok/s overall | acceptance overall |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for method in dict.fromkeys(r["method"] for r in summary):
        cells = []
        for task in tasks:
            r = next(r for r in summary if r["task"] == task and r["method"] == method)
            cells.append(f"{r['speedup']:.2f}x" + ("" if r["tau"] is None else f" ({r['tau']:.2f})"))
        overall = next(r for r in summary if r["task"] == "overall" and r["method"] == method)
        accepted = "-" if overall["acceptance_rate"] is None else f"{overall['acceptance_rate']:.2f}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {overall['tokens_per_s']:.1f} | {accepted} |")
    return "\n".join(lines)


def _sum(values) -> float | None:
    """Sum of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _mean(values) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def peer_notes(summary: Sequence[dict]) -> list[str]:
    """One line per method that did a second or more of work outside its timed region (compiling) or that
    pays an HTTP round trip per request (a peer server), from the summary's ``overall`` rows."""
    lines = []
    for r in summary:
        if r["task"] != "overall":
            continue
        if (r.get("untimed_s") or 0.0) >= 1.0:
            lines.append(f"{r['method']}: {r['untimed_s']:.1f} s of preparation outside the timed region (compiling "
                         "and a warm-up run per new input shape; a peer's CPU-time reading), not in its tokens/s.")
        if r.get("http_overhead_s") is not None:
            lines.append(f"{r['method']}: a request's HTTP overhead (round trip less the server's own latency) "
                         f"averaged {1000 * r['http_overhead_s']:.1f} ms; it is inside its timings, not subtracted.")
    return lines


def markdown_table(summary: Sequence[dict]) -> str:
    """The summary as a Markdown table: tasks as rows, tok/s / speedup / tau per method."""
    methods = list(dict.fromkeys(r["method"] for r in summary))
    head = "| task | " + " | ".join(f"{m} tok/s | {m} speedup" + (f" | {m} tau" if m != BASELINE else "")
                                    for m in methods) + " |"
    cells = sum((3 if m != BASELINE else 2 for m in methods), 0)
    lines = [head, "|---|" + "---|" * cells]
    for task in dict.fromkeys(r["task"] for r in summary):
        parts = []
        for m in methods:
            r = next(r for r in summary if r["task"] == task and r["method"] == m)
            parts += [f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x"]
            if m != BASELINE:
                parts.append("-" if r["tau"] is None else f"{r['tau']:.2f}")
        lines.append(f"| {task} | " + " | ".join(parts) + " |")
    lines.append("")
    lines.append(TAU_NOTE)
    lines += peer_notes(summary)
    if any(r["exact"] is None for r in summary):  # sampled: equality with the baseline means nothing
        lines.append("Sampled: outputs differ from `model.generate`'s by design (the distribution is the "
                     "target's); compare tau, acceptance and speed.")
    else:
        inexact = sorted({r["method"] for r in summary if r["exact"] < 1.0})
        lines.append("Greedy output identical to `model.generate` on every prompt: "
                     + ("yes" if not inexact else "no, for " + ", ".join(inexact)))
    return "\n".join(lines)
