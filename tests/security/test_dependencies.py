"""Dependency floors stay above the releases with known remote-code or memory-safety bugs."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# package -> first release without the known advisories (see the comments in pyproject.toml)
FIXED = {"pillow": Version("12.1.1"), "keras": Version("3.14.0")}


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found: dict[str, Requirement] = {}
    for line in project["dependencies"] + [d for deps in project["optional-dependencies"].values() for d in deps]:
        req = Requirement(line)
        found.setdefault(req.name.lower(), req)
    return found


@pytest.mark.parametrize("package", sorted(FIXED))
def test_floor_excludes_vulnerable_releases(package: str) -> None:
    req = requirements()[package]
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= FIXED[package], f"{req}: allows releases before {FIXED[package]}"
    assert req.specifier.contains(version(package)), f"installed {package} {version(package)} is outside {req}"
