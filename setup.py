"""Packages of the wheel: every ``specdec`` subpackage (found, so a new one cannot be left out) and the
top-level folders that pyproject.toml's ``package-dir`` maps into packages. Everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

MAPPED = [
    "specdec_kernels", "specdec_kernels.tree_attention",  # kernels/
    "specdec_experiments", "specdec_experiments.configs",  # experiments/, configs/
    "specdec.tooling.prompt_sets",  # data/
]

setup(packages=find_packages(include=["specdec", "specdec.*"]) + MAPPED)
