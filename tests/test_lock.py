"""The lock (requirements.lock) is what a fresh machine installs: exact pins only, no path of this
checkout, the CPU torch, and versions that pyproject's ranges (the promise to `pip install specdec`
users) admit."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def locked() -> dict[str, Version]:
    """Name -> version of every pin; raises on a line that is not ``name==version`` (a URL, a path)."""
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock line {line!r} is not an exact pin: a fresh machine cannot install it"
        out[canonicalize_name(match[1])] = Version(match[2])
    return out


def test_the_lock_pins_exactly_with_no_local_path():
    pins = locked()
    assert "specdec" not in pins  # installed editable from the checkout, never pinned by path
    assert pins["torch"] == Version("2.13.0+cpu") and "pip" in pins and "transformers" in pins


def test_pyprojects_ranges_admit_every_locked_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra
                     if not r.startswith("specdec")]
    pins = locked()
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject) is not in the lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} outside {req}"
