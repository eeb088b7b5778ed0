"""pyproject.toml's ranges, constraints.txt's exact versions and environment.yml agree, and the
running environment is the tested one."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover (Python 3.11+ has it)
    tomllib = None


def constraints() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {Requirement(line).name.lower(): str(Requirement(line).specifier)[2:]
            for line in lines if line and not line.startswith("#")}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_requires_python_allows_3_11_to_3_13():
    spec = Requirement(f"x{project()['requires-python']}").specifier
    assert all(spec.contains(v) for v in ("3.11.7", "3.12.1", "3.13.0"))


def test_every_dependency_is_a_range_its_tested_version_satisfies():
    pins = constraints()
    for text in [*project()["dependencies"], *project()["optional-dependencies"]["test"],
                 *project()["optional-dependencies"]["optuna"]]:
        req = Requirement(text)
        assert req.name.lower() in pins, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pins[req.name.lower()]), f"{req.name}=={pins[req.name.lower()]} vs {req}"
        if req.name not in ("hydra-optuna-sweeper",):
            assert not str(req.specifier).startswith("=="), f"{text}: an exact pin in pyproject.toml"


def test_environment_yml_pins_the_constraints_versions():
    pins = constraints()
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    exact = [Requirement(p) for p in pip if "==" in p]
    assert len(exact) >= 10
    for req in exact:
        assert str(req.specifier) == f"=={pins[req.name.lower()]}", req


@pytest.mark.parametrize("name", ["torch", "lightning", "hydra-core", "numpy"])
def test_this_environment_is_the_tested_one(name):
    assert version(name).split("+")[0] == constraints()[name]
