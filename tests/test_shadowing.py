"""No folder or module of the checkout shadows an installed distribution.

``python -m ...`` and ``python -m pytest`` put the repo root first on ``sys.path``, and pytest also puts
each test folder first (its default ``prepend`` import mode). A regular package or a module there under
the import name of an installed distribution wins over site-packages: transformers 5.25 imports the PyPI
package ``kernels`` while ``import transformers`` runs, and the repo's ``kernels/`` (then a regular
package) broke every command. A folder without ``__init__.py`` is only a namespace portion, which
loses to an installed regular package; the subprocess check below proves where each name resolves.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[1]
OWN = {"specdec"}  # our own distribution (an editable install maps its packages from the checkout)
FIRST_ON_PATH = (ROOT, ROOT / "tests", ROOT / "tests" / "kernels")


def importable_names(folder: Path) -> dict[str, str]:
    """Top-level import names a folder offers when it is on ``sys.path``: ``{name: "package" | "module" |
    "namespace"}``."""
    out = {}
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_dir() and entry.name.isidentifier():
            out[entry.name] = "package" if (entry / "__init__.py").exists() else "namespace"
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            out[entry.stem] = "module"
    return out


def installed_names() -> dict[str, list[str]]:
    """Import name -> the installed distributions (not ours) that provide it."""
    out: dict[str, list[str]] = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = sorted({d for d in dists if d.lower().replace("_", "-") not in OWN})
        if others and name.isidentifier():
            out[name] = others
    return out


def shadows(folders, installed: dict[str, list[str]]) -> list[str]:
    """Regular packages or modules in ``folders`` named like an installed distribution's import name."""
    return [f"{folder / (name + '.py' if kind == 'module' else name)} ({kind}) shadows {name!r} of {', '.join(installed[name])}"
            for folder in folders for name, kind in importable_names(folder).items()
            if kind != "namespace" and name in installed]


def test_no_folder_first_on_the_path_shadows_an_installed_distribution():
    assert not shadows(FIRST_ON_PATH, installed_names())


def test_the_check_finds_a_shadowing_package(tmp_path):
    """The check fails on the layout that broke transformers 5.25: a regular package ``kernels/``."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "tree").mkdir()  # a namespace folder: not a shadow
    (tmp_path / "numpy.py").write_text("")
    found = shadows([tmp_path], {"kernels": ["kernels"], "numpy": ["numpy"], "tree": ["dm-tree"]})
    assert len(found) == 2
    assert any("kernels" in f and "(package)" in f for f in found)
    assert any("numpy.py" in f for f in found)


RESOLVE = """
import importlib.util, json, sys
out = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    out[name] = [spec.origin or ""] + list(spec.submodule_search_locations or [])
print(json.dumps(out))
"""


def test_every_colliding_name_resolves_outside_the_checkout():
    """From the repo root, as ``python -m`` runs, each name that a top-level folder shares with an
    installed distribution (``kernels`` with transformers >= 5.25) is found in site-packages."""
    installed = installed_names()
    names = sorted(set(importable_names(ROOT)) & set(installed))
    if not names:
        return
    done = subprocess.run([sys.executable, "-c", RESOLVE, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    where = json.loads(done.stdout)
    inside = {name: paths for name, paths in where.items() if any(_in_checkout(p) for p in paths)}
    assert not inside, f"from the repo root these resolve into the checkout: {inside}"


def _in_checkout(path: str) -> bool:
    """Inside the checkout's own files (a virtual environment kept in it, such as ``.venv``, is not)."""
    return bool(path) and Path(path).resolve().is_relative_to(ROOT) and "site-packages" not in Path(path).parts


def test_transformers_specdec_and_the_experiment_config_work_from_the_repo_root():
    """What the README's commands do first: import transformers (which imports ``kernels``), import
    specdec and compose the default experiment, all with the checkout first on ``sys.path``."""
    done = subprocess.run([sys.executable, "-c", "import transformers, specdec, specdec_kernels; print('ok')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "experiments.run", "--cfg", "job"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "drafter:" in done.stdout and "model:" in done.stdout
