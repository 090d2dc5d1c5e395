"""The architecture sweep of issue 12 as a Markdown table: every causal-LM family transformers knows,
as a tiny random float32 model, served by ``specdec.generate`` exactly, refused before decoding, or
neither (a failure).

    python -m experiments.arch_sweep                       # all of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    python -m experiments.arch_sweep --only llama falcon   # some of them

The models and the checks are ``tests/architectures.py``, the same code ``tests/test_architectures.py``
asserts on, plus short-window variants of learned-position models (``gpt2:window64``,
``opt:window64``): a prompt-lookup chain, a draft-model tree, an adversarial tree (the truth behind 12 wrong
siblings per level, with the verification logits of the accepted path compared to a no-cache
recompute) and a left-padded batch of two, each against ``model.generate(do_sample=False)``.
Outcomes: ``exact``, ``refused: <message>``, ``WRONG: <detail>``, ``ERROR: <exception>``,
``not buildable: <reason>``; where the cases differ, each case's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import architectures  # noqa: E402 - the sweep's one implementation lives beside its test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="these model types only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # per-model warnings would bury the table
    names = args.only or architectures.SWEEP
    unknown = sorted(set(names) - set(architectures.SWEEP))
    if unknown:
        parser.error(f"not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: {', '.join(unknown)}")

    t0 = time.perf_counter()
    print("| architecture | outcome | seconds |")
    print("|---|---|---:|")
    kinds = collections.Counter()
    for name in names:
        with contextlib.redirect_stdout(sys.stderr):  # some models print while generating
            report = architectures.check(name)
        outcome = report.outcome.replace("|", "\\|").replace("\n", " ")
        print(f"| {name} | {outcome} | {report.seconds:.2f} |", flush=True)
        if report.not_buildable is not None:
            kinds["not buildable"] += 1
        elif not report.ok:
            kinds["failing (WRONG or ERROR in some case)"] += 1
        elif all(o.kind == "exact" for o in report.cases.values()):
            kinds["exact"] += 1
        else:
            kinds["refused (in some or all cases, the rest exact)"] += 1
    summary = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    print(f"\n{len(names)} architectures in {time.perf_counter() - t0:.0f} s "
          f"({args.threads} thread{'s' if args.threads > 1 else ''}): {summary}")


if __name__ == "__main__":
    main()
