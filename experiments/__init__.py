"""The experiments: thin Hydra entry points over :mod:`specdec` and :mod:`specdec.tooling`.

In the repository this is ``experiments/`` (``python -m experiments.run``) and its configs are
``configs/`` beside it; a wheel installs the same files as ``specdec_experiments`` with the configs
inside it (``specdec-run`` or ``python -m specdec_experiments.run``). :data:`CONFIG_DIR` is whichever
of the two this copy has. A config directory of your own joins the search path with Hydra's
``--config-dir``: ``specdec-run --config-dir my_configs drafter=my_drafter``.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _config_dir() -> Path:
    for candidate in (_HERE / "configs", _HERE.parent / "configs"):  # installed, then the checkout
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no configs/config.yaml beside {_HERE}: reinstall specdec[experiments]")


CONFIG_DIR = str(_config_dir())
