"""The adjoint hook SuppliedSolve: the application's own solve of (dF/dx)^T u = v, verified by the core."""

import warnings

import pytest
import torch

from ift.implicit import ImplicitSolveError, ImplicitSolveWarning, SuppliedSolve, implicit_root

DT = torch.float64


def residual(x, M, c):
    """F(x) = M x + 0.2 sin(x) - c per problem (rows of x), M shared: dF/dx = M + 0.2 diag(cos x)."""
    return x @ M.T + 0.2 * torch.sin(x) - c


def solution(M, c, iters=60):
    with torch.no_grad():
        x = torch.zeros_like(c)
        for _ in range(iters):
            J = M + 0.2 * torch.diag_embed(torch.cos(x))
            x = x - torch.linalg.solve(J, residual(x, M, c).unsqueeze(-1)).squeeze(-1)
    return x


def data(batch=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = (torch.randn(n, n, dtype=DT, generator=g) / n**0.5 + 2 * torch.eye(n, dtype=DT)).requires_grad_()
    c = torch.randn(batch, n, dtype=DT, generator=g).requires_grad_()
    return M, c


def factor_of(M, x):
    """What a forward solver would keep: the LU factor of (dF/dx)^T at the solution, per problem."""
    J = M.detach() + 0.2 * torch.diag_embed(torch.cos(x))
    return torch.linalg.lu_factor(J.transpose(-1, -2))


def exact_inverse(M, x):
    LU, pivots = factor_of(M, x)
    return lambda v: torch.linalg.lu_solve(LU, pivots, v.unsqueeze(-1)).squeeze(-1)


def layer(M, c, solver_of):
    x = solution(M, c)
    return implicit_root(residual, x, M, c, batch_dims=1, linear_solver=solver_of(M, x))


def test_gradcheck_with_the_forward_factor():
    M, c = data()
    infos = []

    def fn(M, c):
        x = solution(M, c)
        return implicit_root(residual, x, M, c, batch_dims=1,
                             linear_solver=SuppliedSolve(exact_inverse(M, x)), on_solve=infos.append)

    assert torch.autograd.gradcheck(fn, (M, c))
    info = infos[-1]
    assert info.solver == "supplied" and info.all_converged and info.residual.shape == (3,)
    assert bool((info.iterations == 1).all()) and float(info.residual.max()) < 1e-13
    assert info.root_residual is not None and float(info.root_residual.max()) < 1e-12


def test_same_gradient_as_the_core_solvers_with_batch_dims_2():
    M, c = data(batch=6)
    c2 = c.detach().reshape(2, 3, 4).requires_grad_()

    def run(solver_of):
        x = solution(M, c2.reshape(6, 4)).reshape(2, 3, 4)
        out = implicit_root(residual, x, M, c2, batch_dims=2, linear_solver=solver_of(x))
        weights = torch.linspace(-1, 1, out.numel(), dtype=DT).reshape(out.shape)
        return torch.autograd.grad((out * weights).sum(), (M, c2))

    def supplied(x):
        inverse = exact_inverse(M, x.reshape(6, 4))
        return SuppliedSolve(inverse)  # v arrives flattened to (6, 4), one row per problem

    for got, want in zip(run(supplied), run(lambda x: "direct")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_wrong_solve_is_reported_not_converged():
    M, c = data()
    infos = []
    x = solution(M, c)
    stale = exact_inverse(M * 1.5, x)  # a factor of another matrix
    out = implicit_root(residual, x, M, c, batch_dims=1, linear_solver=SuppliedSolve(stale), on_solve=infos.append)
    with pytest.warns(ImplicitSolveWarning, match="did not converge"):
        out.sum().backward()
    info = infos[-1]
    assert not bool(info.converged.any()) and float(info.residual.min()) > 1e-3


def test_wrong_row_alone_is_flagged():
    M, c = data()
    infos = []
    x = solution(M, c)
    good = exact_inverse(M, x)

    def one_row_wrong(v):
        u = good(v)
        u[1] = 2 * u[1]
        return u

    out = implicit_root(residual, x, M, c, batch_dims=1, linear_solver=SuppliedSolve(one_row_wrong),
                        on_solve=infos.append)
    with pytest.warns(ImplicitSolveWarning):
        out.sum().backward()
    assert infos[-1].converged.tolist() == [True, False, True]


def test_refinement_recovers_a_stale_factor():
    """max_iter > 1: a nearby factor used as iterative refinement converges (each step verified)."""
    M, c = data()
    x = solution(M, c)
    infos = []
    nearby = exact_inverse(M * 1.05, x)
    out = implicit_root(residual, x, M, c, batch_dims=1, linear_solver=SuppliedSolve(nearby, max_iter=30),
                        on_solve=infos.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitSolveWarning)
        got = torch.autograd.grad(out.sum(), (M, c))
    assert infos[-1].all_converged and int(infos[-1].iterations.max()) > 1
    want = torch.autograd.grad(layer(M, c, lambda M, x: "direct").sum(), (M, c))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_ridge_is_verified_against_the_damped_system():
    M, c = data()
    x = solution(M, c)
    infos = []
    out = implicit_root(residual, x, M, c, batch_dims=1, linear_solver=SuppliedSolve(exact_inverse(M, x), ridge=0.5),
                        on_solve=infos.append)
    with pytest.warns(ImplicitSolveWarning):  # the undamped inverse does not solve (J + 0.5 I)^T u = v
        out.sum().backward()
    assert not infos[-1].all_converged


def test_bad_inverse_outputs():
    M, c = data()
    x = solution(M, c)
    with pytest.raises(TypeError, match="inverse must be a callable"):
        SuppliedSolve("lu")
    out = implicit_root(residual, x, M, c, batch_dims=1, linear_solver=SuppliedSolve(lambda v: v[:, :2]))
    with pytest.raises(ValueError, match="shaped like v"):
        out.sum().backward()
    out = implicit_root(residual, x, M, c, batch_dims=1, linear_solver=SuppliedSolve(lambda v: v * float("nan")))
    with pytest.raises(ImplicitSolveError, match="NaN/Inf"):
        out.sum().backward()


def test_correct_is_used_for_the_refinement_steps():
    M, c = data()
    x = solution(M, c)
    calls = []
    nearby = exact_inverse(M * 1.05, x)
    exact = exact_inverse(M, x)
    solver = SuppliedSolve(lambda v: calls.append("inverse") or nearby(v), max_iter=3,
                           correct=lambda r: calls.append("correct") or exact(r))
    infos = []
    out = implicit_root(residual, x, M, c, batch_dims=1, linear_solver=solver, on_solve=infos.append)
    out.sum().backward()
    assert calls == ["inverse", "correct"] and infos[-1].all_converged
    assert infos[-1].iterations.tolist() == [2, 2, 2]
    with pytest.raises(TypeError, match="correct must be a callable"):
        SuppliedSolve(exact, correct=3)
