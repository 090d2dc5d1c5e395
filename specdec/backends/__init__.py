"""Backends the engine installs on a model once: the CPU linear products (:mod:`specdec.backends.cpu_linear`)."""
