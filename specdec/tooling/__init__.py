"""Research tooling: the benchmark harness, reports and figures, loggers, prompt sets (the ``[experiments]`` extra)."""
