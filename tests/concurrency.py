"""The thread and interrupt checks a drafter family's tests share: drafter objects used from several
threads at once, and calls cut short by a timer signal, give the single-threaded, uninterrupted outputs."""

from __future__ import annotations

import random
import signal
import sys
import threading

import torch

import specdec
from specdec.text import left_pad

from test_generate import reference

ROWS = [[5, 9, 13, 7, 5, 9, 13], [3, 4, 5, 3, 4], [12, 40, 41, 12, 40], [7, 7, 8, 9]]
MAX_NEW = 12


def new_tokens(model, rows, drafter, max_new: int = MAX_NEW) -> list[list[int]]:
    """Each left-padded row's new tokens from ``specdec.generate`` (no EOS)."""
    ids, mask = left_pad([torch.tensor(r) for r in rows], pad_id=0)
    out = specdec.generate(model, ids, drafter, attention_mask=mask, max_new_tokens=max_new, eos_token_id=None,
                           pad_token_id=0)
    return [out[i, ids.shape[1]:].tolist() for i in range(len(rows))]


def alone(model, row, max_new: int = MAX_NEW) -> list[int]:
    """``model.generate``'s new tokens for one row."""
    return reference(model, torch.tensor([row]), max_new_tokens=max_new, eos_token_id=None)[0, len(row):].tolist()


def thread_failures(target, drafters: dict, calls_per_thread: int) -> list:
    """Three threads, each making ``calls_per_thread`` calls with a random drafter on 1-2 random rows, switching
    often; the rows whose output differs from the reference (or a thread's exception)."""
    expected = {tuple(r): alone(target, r) for r in ROWS}
    rng = random.Random(0)
    jobs = [[(rng.choice(sorted(drafters)), rng.sample(ROWS, rng.choice([1, 2]))) for _ in range(calls_per_thread)]
            for _ in range(3)]
    failures = []

    def worker(calls):
        for name, rows in calls:
            try:
                for row, new in zip(rows, new_tokens(target, rows, drafters[name])):
                    if new != expected[tuple(row)]:
                        failures.append((name, row, new))
            except Exception as err:  # a crash in a thread must fail the test too
                failures.append((name, rows, repr(err)))

    interleaved(worker, jobs)
    return failures


def interleaved(worker, jobs) -> None:
    """``worker(job)`` for each of ``jobs``, each in its own thread, with the interpreter switching threads every
    10 microseconds (so they interleave inside the engine's steps); returns when all have finished."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)


def interrupted_calls(target, drafters: dict, calls: int) -> int:
    """``calls`` calls with a random drafter, each cut by a timer signal (KeyboardInterrupt) at a random moment
    within 30 ms; how many were cut."""
    rng = random.Random(1)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    interrupted = 0
    try:
        for _ in range(calls):
            name = rng.choice(sorted(drafters))
            try:
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0, 0.03))
                try:
                    new_tokens(target, rng.sample(ROWS, rng.choice([1, 2])), drafters[name])
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except KeyboardInterrupt:
                interrupted += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return interrupted
