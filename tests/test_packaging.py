"""Packaging: compatible ranges in pyproject.toml, the exact versions in constraints.txt, and the
README's install and test commands being the ones CI runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _requirements() -> list[Requirement]:
    project = _project()
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [req for req in map(Requirement, lines) if canonicalize_name(req.name) != "qwen-export"]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_dependencies_are_ranges_and_constraints_pin_each_within_it() -> None:
    pins = _constraints()
    for req in _requirements():
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req} is an exact pin"
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req}"
    assert pins["torch"] == "2.13.0"  # the CPU build; a newer torch would be a multi-GB CUDA download


def test_readme_install_and_test_commands_are_what_ci_runs() -> None:
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text(encoding="utf-8").splitlines()]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Set up and test.*?```sh\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    ran = [line for line in ci if line.startswith(("python3 -m venv", ".venv/bin/python -m pytest"))]
    # CI runs the README's two commands as written, then the matrix and extended tiers (README says so)
    assert ran[:2] == commands and len(commands) == 2
    rest = f'{commands[1]} -m "matrix or extended"'
    assert ran[2:] == [rest] and rest in readme
    assert "-c constraints.txt" in commands[0]


def test_readme_documents_every_extra() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Extras", 1)[1].split("\n## ", 1)[0]
    for extra in _project()["optional-dependencies"]:
        assert f"`[{extra}]`" in section, f"README's Extras section does not describe [{extra}]"
