"""environment.yml (for conda users, not solvable here) must agree with pyproject.toml."""

from __future__ import annotations

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    return {r.replace(" ", "") for r in reqs}


def _environment_pip_requirements() -> tuple[set[str], list]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {r.replace(" ", "") for r in pip if not r.startswith("-e")}, env["dependencies"]


def test_environment_yml_lists_the_same_packages_and_bounds_as_pyproject():
    pip, deps = _environment_pip_requirements()
    assert pip == _pyproject_requirements()
    assert "python=3.11" in deps


def test_torch_caps_stay_within_what_is_on_local_disk():
    reqs = _pyproject_requirements()
    assert any(r.startswith("torch>") and r.endswith("<=2.14.1") for r in reqs)
    assert any(r.startswith("torchvision>") and r.endswith("<=0.29.1") for r in reqs)
