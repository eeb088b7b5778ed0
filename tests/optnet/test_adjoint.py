"""OptNet's backward through the implicit core's adjoint hook (SuppliedSolve with the forward's factor)."""

import warnings

import pytest
import torch

import ift.optnet.qp as qp
from ift.implicit import ImplicitSolveWarning, LinearSolveInfo, SuppliedSolve
from ift.optnet import solve_qp
from tests.optnet.test_qp import random_qp


@pytest.fixture
def reports(monkeypatch):
    """The LinearSolveInfo of each backward solve, as the core reports it."""
    seen: list[LinearSolveInfo] = []
    real = SuppliedSolve.solve

    def spy(self, matvec, b):
        u, info = real(self, matvec, b)
        seen.append(info)
        return u, info

    monkeypatch.setattr(SuppliedSolve, "solve", spy)
    return seen


@pytest.mark.parametrize("precision", ["mixed", "float64"])
def test_backward_is_verified_and_converged(reports, precision):
    args = [t.requires_grad_() for t in random_qp(6, 8, 10, 3, seed=21)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitSolveWarning)
        (solve_qp(*args, precision=precision) * torch.randn(6, 8, dtype=torch.float64)).sum().backward()
    (info,) = reports
    assert info.solver == "supplied" and info.all_converged and info.residual.shape == (6,)
    assert float(info.residual.max()) < 1e-13 and int(info.iterations.max()) == 1


def test_wrong_factor_is_not_reported_converged(reports, monkeypatch):
    """A stale or wrong factor: the core's true product catches it and warns, whatever the factor says."""
    real = qp._KKTAdjoint._solve
    monkeypatch.setattr(qp._KKTAdjoint, "_solve", staticmethod(lambda F, act, v, refine: 1.5 * real(F, act, v, refine)))
    args = [t.requires_grad_() for t in random_qp(4, 6, 6, 2, seed=22)]
    z = solve_qp(*args)
    with pytest.warns(ImplicitSolveWarning, match="did not converge"):
        z.sum().backward()
    assert not bool(reports[-1].converged.any())


def test_refinement_from_verified_residuals_fixes_a_slightly_wrong_factor(reports, monkeypatch):
    """The core refines with the application's unrefined corrections until the true residual is
    below tol: a first solve 1e-3 off still ends converged, at the reference gradient."""
    args = [t.requires_grad_() for t in random_qp(4, 6, 6, 2, seed=23)]
    want = torch.autograd.grad(solve_qp(*args).sum(), args)
    real = qp._KKTAdjoint.solve
    monkeypatch.setattr(qp._KKTAdjoint, "solve", lambda self, v, refine=True: real(self, v, refine) * (1 + 1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitSolveWarning)
        got = torch.autograd.grad(solve_qp(*args).sum(), args)
    assert reports[-1].all_converged and int(reports[-1].iterations.max()) > 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_double_backward_is_refused():
    args = [t.requires_grad_() for t in random_qp(2, 3, 4, 1, seed=24)]
    z = solve_qp(*args)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(z.sum(), args[1], create_graph=True)
