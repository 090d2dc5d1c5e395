"""Packages of the wheel: every ``specdec`` subpackage (found, so a new one cannot be left out) and the
top-level folders that pyproject.toml's ``package-dir`` maps into packages, with their sub-folders
(setuptools warns about any folder under a package it is not told about). Everything else is in
pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup


def mapped(package: str, folder: str) -> list[str]:
    """``package`` (the repo's ``folder``) and one package per sub-folder, which holds data only."""
    root = Path(__file__).resolve().parent / folder
    subs = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_dir() and "__pycache__" not in p.parts)
    return [package] + [".".join((package, *sub.parts)) for sub in subs]


setup(packages=find_packages(include=["specdec", "specdec.*"]) + ["specdec.checkpoints"]  # data: the .pt files
      + mapped("specdec_kernels", "kernels/specdec_kernels")
      + mapped("specdec_experiments", "experiments") + mapped("specdec_experiments.configs", "configs")
      + mapped("specdec.tooling.prompt_sets", "data"))
