"""Batched linear solvers against torch.linalg.solve, per-row stopping, settings and errors."""

import pytest
import torch

from ift.implicit import CG, GMRES, BiCGStab, Direct, LinearSolver, Neumann, get_linear_solver

DT = torch.float64


def spd_batch(batch: int, n: int, cond: float, seed: int = 0, eig: torch.Tensor | None = None) -> torch.Tensor:
    """Random SPD matrices with eigenvalues spread over [1, cond] (or the given ones)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=DT, generator=g))
    if eig is None:
        eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    return q @ torch.diag_embed(eig.expand(batch, n)) @ q.transpose(1, 2)


def nonsym_batch(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.eye(n, dtype=DT) + torch.randn(batch, n, n, dtype=DT, generator=g) / n**0.5


def as_matvec(A: torch.Tensor):
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("solver", [CG(), GMRES(), BiCGStab(), Direct(), Neumann(alpha="auto", max_iter=3000)])
def test_solvers_match_dense_solve_on_spd(solver):
    A = spd_batch(4, 12, cond=20.0)
    b = torch.randn(4, 12, dtype=DT)
    u, info = solver.solve(as_matvec(A), b)
    torch.testing.assert_close(u, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-8)
    assert info.all_converged and info.solver == solver.name
    assert info.residual.shape == (4,) and info.max_residual <= info.tol


@pytest.mark.parametrize("solver", [GMRES(), BiCGStab(), Direct(), GMRES(restart=3)])
def test_nonsymmetric_solvers_match_dense_solve(solver):
    A = nonsym_batch(3, 10)
    b = torch.randn(3, 10, dtype=DT)
    u, info = solver.solve(as_matvec(A), b)
    torch.testing.assert_close(u, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-8)
    assert info.all_converged


def test_gmres_on_symmetric_indefinite_kkt():
    # [[D, 1], [1^T, 0]]: the kind of system the softmax KKT backward produces.
    n = 6
    A = torch.zeros(n + 1, n + 1, dtype=DT)
    A[:n, :n] = -torch.diag(torch.linspace(1, 4, n, dtype=DT))
    A[:n, n] = A[n, :n] = 1.0
    b = torch.eye(n + 1, dtype=DT)  # every unit vector, one problem per row
    u, info = GMRES().solve(as_matvec(A.expand(n + 1, -1, -1)), b)
    torch.testing.assert_close(u, torch.linalg.inv(A).T, rtol=1e-8, atol=1e-9)
    assert info.all_converged


@pytest.mark.parametrize("cls", [CG, GMRES, BiCGStab, Neumann])
def test_batched_equals_one_by_one_with_own_iteration_counts(cls):
    # Rows with very different conditioning: each keeps its own step sizes and stopping test.
    two_values = torch.tensor([1.0] * 5 + [3.0] * 5, dtype=DT)  # Krylov methods finish in 2 steps
    A = torch.cat([spd_batch(1, 10, 1.5, seed=1), spd_batch(1, 10, 50.0, seed=2), spd_batch(1, 10, 0, 3, two_values)])
    b = torch.randn(3, 10, dtype=DT)
    solver = cls(max_iter=5000, alpha="auto") if cls is Neumann else cls()
    u, info = solver.solve(as_matvec(A), b)
    for i in range(3):
        u_i, info_i = solver.solve(as_matvec(A[i : i + 1]), b[i : i + 1])
        torch.testing.assert_close(u[i : i + 1], u_i, rtol=1e-9, atol=1e-10)
        assert info.iterations[i] == info_i.iterations[0]
    assert len(set(info.iterations.tolist())) > 1  # the rows really stopped at different times


@pytest.mark.parametrize("cls", [CG, GMRES, BiCGStab, Neumann])
def test_sparse_stopping_checks_keep_per_row_results(cls):
    # Asking the host "all rows stopped?" only every 7 iterations (the accelerator default is 8)
    # must not change any row's solution, iteration count or reported residual.
    A = torch.cat([spd_batch(1, 30, 2.0, seed=4), spd_batch(1, 30, 40.0, seed=5)])
    b = torch.randn(2, 30, dtype=DT, generator=torch.Generator().manual_seed(6))
    make = (lambda **kw: cls(max_iter=5000, alpha="auto", **kw)) if cls is Neumann else cls
    u1, info1 = make(check_every=1).solve(as_matvec(A), b)
    u7, info7 = make(check_every=7).solve(as_matvec(A), b)
    torch.testing.assert_close(u7, u1, rtol=1e-12, atol=1e-12)
    assert info7.iterations.tolist() == info1.iterations.tolist()
    torch.testing.assert_close(info7.residual, info1.residual, rtol=1e-6, atol=1e-16)
    assert info1.all_converged and info1.iterations[0] < info1.iterations[1]


def test_zero_rhs_row_stops_immediately():
    A = spd_batch(2, 5, 10.0)
    b = torch.randn(2, 5, dtype=DT)
    b[1] = 0
    u, info = CG().solve(as_matvec(A), b)
    assert info.iterations[1] == 0 and torch.all(u[1] == 0) and info.all_converged


def test_cg_handles_negative_definite():
    A = -spd_batch(2, 9, 10.0)
    b = torch.randn(2, 9, dtype=DT)
    u, info = CG().solve(as_matvec(A), b)
    torch.testing.assert_close(u, torch.linalg.solve(A, b))
    assert info.all_converged


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "direct", "neumann"])
def test_ridge_damping_solves_shifted_system(name):
    A = spd_batch(2, 6, 5.0)
    b = torch.randn(2, 6, dtype=DT)
    solver = get_linear_solver(name, ridge=0.5, max_iter=2000)
    if name == "neumann":
        solver = Neumann(ridge=0.5, alpha=0.15, max_iter=2000)  # 0.15 < 2 / (5 + 0.5)
    u, info = solver.solve(as_matvec(A), b)
    torch.testing.assert_close(u, torch.linalg.solve(A + 0.5 * torch.eye(6, dtype=DT), b))
    assert info.all_converged


def test_singular_system_is_reported_not_converged():
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT)).expand(2, 3, 3)
    b = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=DT)  # row 0 leaves the range of A
    for solver in [CG(), GMRES(), BiCGStab(), Direct(), Neumann(max_iter=50, alpha=0.5)]:
        u, info = solver.solve(as_matvec(A), b)
        assert info.converged.tolist() == [False, True], solver
        assert info.residual[0] > 0.1
        torch.testing.assert_close(u[1], torch.tensor([1.0, 0.5, 0.0], dtype=DT))


def test_float32_default_tolerance():
    A = spd_batch(3, 10, 10.0).float()
    b = torch.randn(3, 10)
    u, info = CG().solve(as_matvec(A), b)
    assert u.dtype == torch.float32 and info.tol == 1e-5 and info.all_converged
    torch.testing.assert_close(u, torch.linalg.solve(A.double(), b.double()).float(), rtol=1e-4, atol=1e-4)


def test_max_iter_limits_iterations_and_flags_nonconvergence():
    A = spd_batch(1, 30, 1e4)
    b = torch.randn(1, 30, dtype=DT)
    _, info = CG(max_iter=3).solve(as_matvec(A), b)
    assert info.max_iterations == 3 and not info.all_converged and "not converged" in info.summary()


def test_get_linear_solver_by_name_class_instance():
    assert isinstance(get_linear_solver("cg", tol=1e-3), CG)
    assert get_linear_solver(GMRES, max_iter=7).max_iter == 7
    inst = BiCGStab(tol=1e-4)
    assert get_linear_solver(inst) is inst
    with pytest.raises(ValueError, match="instance"):
        get_linear_solver(inst, tol=1e-3)
    with pytest.raises(ValueError, match="unknown linear_solver"):
        get_linear_solver("lu")
    with pytest.raises(TypeError):
        get_linear_solver(3)
    assert issubclass(CG, LinearSolver)


@pytest.mark.parametrize(
    "kwargs",
    [dict(tol=-1.0), dict(tol=0.0), dict(max_iter=0), dict(max_iter=2.5), dict(ridge=-1.0), dict(check_every=0)],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        CG(**kwargs)


def test_bad_shapes_and_limits_raise():
    with pytest.raises(ValueError, match="shape"):
        CG().solve(lambda v: v, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="max_dim"):
        Direct(max_dim=4).solve(lambda v: v, torch.ones(1, 5, dtype=DT))
    with pytest.raises(ValueError, match="alpha"):
        Neumann(alpha=0.0)
    with pytest.raises(ValueError, match="restart"):
        GMRES(restart=0)


def test_preconditioned_cg_with_the_exact_matrix_takes_one_iteration():
    from ift.implicit.linear_solvers import dense_preconditioner

    A = spd_batch(5, 16, cond=1e4)
    b = torch.randn(5, 16, dtype=DT)
    u, info = CG(tol=1e-10, preconditioner=dense_preconditioner(A)).solve(as_matvec(A), b)
    torch.testing.assert_close(u, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert info.all_converged and (info.iterations == 1).all()
    plain = CG(tol=1e-10).solve(as_matvec(A), b)[1]
    assert (plain.iterations > 10).all()


def test_preconditioned_cg_with_an_approximate_or_unusable_matrix_still_converges():
    from ift.implicit.linear_solvers import dense_preconditioner

    A = spd_batch(4, 12, cond=1e3, seed=2)
    b = torch.randn(4, 12, dtype=DT)
    M = A * (1 + 1e-4 * torch.randn(A.shape, dtype=DT, generator=torch.Generator().manual_seed(3)))
    M = 0.5 * (M + M.transpose(1, 2))
    M[1] = float("nan")          # not built: identity, plain CG on that row
    M[2] = -torch.eye(12, dtype=DT)  # not positive definite: identity too
    u, info = CG(tol=1e-10, preconditioner=dense_preconditioner(M)).solve(as_matvec(A), b)
    torch.testing.assert_close(u, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-9)
    assert info.all_converged and info.iterations[0] < info.iterations[1]
    with pytest.raises(TypeError, match="preconditioner must be a callable"):
        CG(preconditioner=A)
    with pytest.raises(ValueError, match=r"shape \(B, n, n\)"):
        dense_preconditioner(A[0])
