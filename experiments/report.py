"""Turn a run or sweep directory into report.md (tables) and figures (PNG and PDF).

    python -m experiments.report outputs/2026-11-25/12-00-00          # installed: specdec-report ...
    python -m experiments.report multirun/2026-11-25/12-00-00 --out reports/sweep1

Swept drafter settings become series, other swept settings panels, shared settings the title
(see :mod:`specdec.tooling.report`); runs with the same settings are kept apart, never pooled.
"""

from __future__ import annotations

import argparse

from specdec.tooling.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run directory (with results.jsonl) or a sweep directory of them")
    parser.add_argument("--out", default=None, help="where report.md and the figures go (default: path)")
    args = parser.parse_args()
    print(write_report(args.path, args.out))


if __name__ == "__main__":
    main()
