"""The core's settings types: MinimizeConfig maps onto minimize's arguments, one non-stationarity policy,
one-line errors for bad, unknown and renamed keys and values under the application's group; and the
core names no application."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from ift.implicit import IFTConfig, MinimizeConfig, NonStationary, minimize, reject_renamed

CORE = Path(__file__).resolve().parents[2] / "src" / "ift" / "implicit"


@dataclass(frozen=True)
class AppInner(MinimizeConfig):
    group: ClassVar[str] = "app.inner"
    renamed: ClassVar[dict[str, str]] = {**MinimizeConfig.renamed, "steps": "max_iter"}
    renamed_values: ClassVar[dict[str, dict[str, str]]] = {"nonstationary": {"skip": "drop"}}


def test_minimize_kwargs_are_minimizes_arguments_and_give_the_same_result():
    cfg = MinimizeConfig.from_dict({"method": "sgd", "max_iter": 50, "tol": 1e-6, "lr": 0.3, "momentum": 0.5,
                                    "betas": [0.8, 0.9], "clip": 2.0, "max_abs": 10.0})
    assert cfg.betas == (0.8, 0.9) and cfg.nonstationary is NonStationary.DROP and cfg.nonstationary == "drop"
    f = lambda x: (x - 1).pow(2).sum(-1)  # noqa: E731
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    direct = minimize(f, x0, method="sgd", max_iter=50, tol=1e-6, lr=0.3, momentum=0.5, betas=(0.8, 0.9), clip=2.0,
                      max_abs=10.0)
    via = minimize(f, x0, **cfg.minimize_kwargs())
    assert torch.equal(direct.x, via.x) and torch.equal(direct.iterations, via.iterations)
    assert MinimizeConfig().minimize_kwargs() == {"method": "newton", "max_iter": 20, "tol": 1e-5, "damping": 1e-3,
                                                  "lr": 1.0, "momentum": 0.0, "betas": (0.9, 0.999), "clip": None,
                                                  "max_abs": float("inf")}


@pytest.mark.parametrize("values,message", [
    ({"method": "lbfgs"}, "app.inner.method must be one of newton, sgd, adam, got 'lbfgs'"),
    ({"max_iter": -1}, "app.inner.max_iter must be an int >= 0, got -1"),
    ({"tol": -1e-3}, "app.inner.tol must be a number >= 0, got -0.001"),
    ({"clip": 0.0}, "app.inner.clip must be a number > 0 or null, got 0.0"),
    ({"nonstationary": "amortized"}, "app.inner.nonstationary must be one of drop, ift, error, got 'amortized'"),
    ({"tolerance": 1.0}, r"app.inner has unknown keys \['tolerance'\]"),
    ({"rtol": 1e-3}, r"app.inner.rtol was renamed app.inner.tol \(the core's name\)"),
    ({"steps": 3}, r"app.inner.steps was renamed app.inner.max_iter \(the core's name\)"),
    ({"nonstationary": "skip"}, r"app.inner.nonstationary=skip was renamed app.inner.nonstationary=drop"),
])
def test_bad_and_renamed_settings_are_one_line_under_the_applications_group(values, message):
    with pytest.raises(ValueError, match=message) as err:
        AppInner.from_dict(values)
    assert "\n" not in str(err.value)


def test_ift_config_group_and_renames():
    assert IFTConfig.from_dict({"max_iter": 7}).solver_kwargs() == {"linear_solver": "cg", "tol": None, "max_iter": 7,
                                                                     "ridge": 0.0}
    with pytest.raises(ValueError, match=r"^ift.maxiter was renamed ift.max_iter \(the core's name\)"):
        IFTConfig.from_dict({"maxiter": 7})
    with pytest.raises(ValueError, match=r"^ift.linear_solver: unknown linear_solver 'qr'"):
        IFTConfig.from_dict({"linear_solver": "qr"})


def test_reject_renamed_takes_full_keys_across_groups():
    with pytest.raises(ValueError, match=r"^a.ift.policy was renamed a.inner.policy \(the core's name\)"):
        reject_renamed({"policy": "drop"}, {"policy": "a.inner.policy"}, "a.ift")
    reject_renamed({"max_iter": 3}, {"maxiter": "max_iter"}, "g")  # the new key passes


def test_the_core_names_no_application():
    apps = re.compile(r"savi|imaml|maml|optnet|saliency|QPSolution|\bmodel\.|elbo", re.IGNORECASE)
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(CORE.glob("*.py")) if p.name != "examples.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if apps.search(line)]
    assert not hits, hits
