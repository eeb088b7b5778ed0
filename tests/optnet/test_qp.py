"""solve_qp: solutions against exact / external references, gradients, bad input."""

import itertools
import warnings

import pytest
import torch

from ift.optnet import QPInfeasibleError, QPStatus, solve_qp, solve_qp_with_info


def random_qp(batch, n, m, p, dtype=torch.float64, seed=0):
    """Random strictly feasible QP as in the OptNet timing study: h = G z0 + s0, b = A z0."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(batch, n, n, generator=g, dtype=dtype)
    Q = M @ M.mT / n + 0.1 * torch.eye(n, dtype=dtype)
    q = torch.randn(batch, n, generator=g, dtype=dtype)
    G = torch.randn(batch, m, n, generator=g, dtype=dtype)
    z0 = torch.randn(batch, n, generator=g, dtype=dtype)
    s0 = torch.rand(batch, m, generator=g, dtype=dtype)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    A = torch.randn(batch, p, n, generator=g, dtype=dtype)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return Q, q, G, h, A, b


def active_set_reference(Q, q, G, h, A, b):
    """Exact solution of one small QP by enumerating active sets (KKT is sufficient: Q > 0)."""
    n, m, p = q.shape[0], h.shape[0], b.shape[0]
    for k in range(m + 1):
        for active in itertools.combinations(range(m), k):
            C = torch.cat([A, G[list(active)]])
            d = torch.cat([b, h[list(active)]])
            K = torch.zeros(n + len(d), n + len(d), dtype=q.dtype)
            K[:n, :n], K[:n, n:], K[n:, :n] = Q, C.T, C
            try:
                sol = torch.linalg.solve(K, torch.cat([-q, d]))
            except RuntimeError:  # dependent active constraints
                continue
            z, mult = sol[:n], sol[n:]
            lam = mult[p:]
            if (G @ z <= h + 1e-10).all() and (lam >= -1e-10).all():
                return z
    raise AssertionError("no KKT point found")


@pytest.mark.parametrize("p", [0, 2])
def test_matches_active_set_enumeration(p):
    Q, q, G, h, A, b = random_qp(6, 4, 6, p, seed=1)
    z = solve_qp(Q, q, G, h, A if p else None, b if p else None)
    for i in range(6):
        ref = active_set_reference(Q[i], q[i], G[i], h[i], A[i], b[i])
        torch.testing.assert_close(z[i], ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("p", [0, 5])
def test_matches_cvxpy(p):
    import cvxpy as cp  # a declared test dependency: a broken install must fail, not skip
    import numpy as np
    Q, q, G, h, A, b = random_qp(4, 10, 12, p, seed=2)
    z = solve_qp(Q, q, G, h, A if p else None, b if p else None)
    for i in range(4):
        x = cp.Variable(10)
        cons = [G[i].numpy() @ x <= h[i].numpy()]
        if p:
            cons.append(A[i].numpy() @ x == b[i].numpy())
        obj = 0.5 * cp.quad_form(x, cp.psd_wrap(Q[i].numpy())) + q[i].numpy() @ x
        cp.Problem(cp.Minimize(obj), cons).solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        np.testing.assert_allclose(z[i].numpy(), x.value, atol=1e-6)


def test_kkt_conditions_hold_at_solution():
    Q, q, G, h, A, b = random_qp(16, 8, 10, 3, seed=3)
    sol = solve_qp_with_info(Q, q, G, h, A, b)
    assert bool(sol.converged.all())
    z, lam, nu = sol.z, sol.lam, sol.nu
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    stationarity = mv(Q, z) + q + mv(G.mT, lam) + mv(A.mT, nu)
    assert stationarity.abs().max() < 1e-7
    assert (mv(G, z) - h).max() < 1e-8  # primal feasibility
    assert (mv(A, z) - b).abs().max() < 1e-8
    assert lam.min() >= 0  # dual feasibility
    assert (lam * (h - mv(G, z))).abs().max() < 1e-8  # complementary slackness


def test_float32_inputs_match_float64():
    Q, q, G, h, A, b = random_qp(8, 10, 10, 3, seed=4)
    z64 = solve_qp(Q, q, G, h, A, b)
    z32 = solve_qp(*(t.float() for t in (Q, q, G, h, A, b)))
    assert z32.dtype == torch.float32
    torch.testing.assert_close(z32.double(), z64, atol=1e-4, rtol=1e-4)


def test_float32_native_iteration_converges_on_small_problems():
    Q, q, G, h, A, b = random_qp(8, 5, 5, 0, dtype=torch.float32, seed=5)
    sol = solve_qp_with_info(Q, q, G, h, precision="input")
    ref = solve_qp(*(t.double() for t in (Q, q, G, h)))
    ok = sol.converged
    assert ok.float().mean() >= 0.5
    torch.testing.assert_close(sol.z[ok].double(), ref[ok], atol=5e-3, rtol=5e-3)


def test_unbatched_inputs_give_unbatched_output():
    Q, q, G, h, A, b = random_qp(1, 4, 5, 1, seed=6)
    z = solve_qp(Q[0], q[0], G[0], h[0], A[0], b[0])
    assert z.shape == (4,)
    torch.testing.assert_close(z, active_set_reference(Q[0], q[0], G[0], h[0], A[0], b[0]), atol=1e-7, rtol=0)


def _gradcheck_problem(seed):
    Q, q, G, h, A, b = random_qp(2, 3, 4, 1, seed=seed)
    return [t.clone().requires_grad_() for t in (Q, q, G, h, A, b)]


def test_gradcheck_all_six_arguments():
    args = _gradcheck_problem(seed=7)
    fn = lambda *a: solve_qp(*a, tol=1e-12)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


def test_duals_are_not_differentiable():
    args = _gradcheck_problem(seed=8)
    sol = solve_qp_with_info(*args)
    assert sol.z.requires_grad and not sol.lam.requires_grad and not sol.nu.requires_grad


def test_shared_parameter_gradients_sum_over_batch():
    Q, q, G, h, A, b = random_qp(5, 4, 6, 2, seed=9)
    Qs, Gs = Q[0].clone().requires_grad_(), G[0].clone().requires_grad_()
    z0 = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution  # A z0 = b
    h = (Gs.detach() @ z0).squeeze(-1) + 1.0  # strictly feasible for the shared G
    weights = torch.randn(5, 4, dtype=Q.dtype)
    (solve_qp(Qs, q, Gs, h, A, b) * weights).sum().backward()
    grad_Q = torch.zeros_like(Qs)
    grad_G = torch.zeros_like(Gs)
    for i in range(5):
        Qi, Gi = Qs.detach().clone().requires_grad_(), Gs.detach().clone().requires_grad_()
        (solve_qp(Qi, q[i], Gi, h[i], A[i], b[i]) * weights[i]).sum().backward()
        grad_Q += Qi.grad
        grad_G += Gi.grad
    torch.testing.assert_close(Qs.grad, grad_Q)
    torch.testing.assert_close(Gs.grad, grad_G)


def test_empty_shared_equalities_with_requires_grad_get_empty_gradients():
    """A shared A of shape (0, n) that requires grad (a layer with p = 0 learnable equalities)."""
    Q, q, G, h, _, _ = random_qp(4, 5, 6, 0, seed=3)
    A = torch.zeros(0, 5, dtype=Q.dtype, requires_grad=True)
    b = torch.zeros(0, dtype=Q.dtype, requires_grad=True)
    Qs = Q[0].clone().requires_grad_()
    solve_qp(Qs, q, G, h, A, b).sum().backward()
    assert A.grad.shape == (0, 5) and b.grad.shape == (0,)
    assert Qs.grad.shape == (5, 5) and torch.isfinite(Qs.grad).all()


def test_backward_reuses_the_forward_factorisation(monkeypatch):
    args = [t.requires_grad_() for t in random_qp(4, 6, 6, 2, seed=10)]
    z = solve_qp(*args)
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or real(*a, **k))
    z.sum().backward()
    assert calls == []  # only triangular solves with the saved factors
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in args)


def test_matches_ift_implicit_on_the_kkt_residual():
    from ift import implicit  # a broken core must fail this test, not skip it

    Q, q, G, h, A, b = random_qp(3, 4, 5, 2, seed=11)
    q = q.clone().requires_grad_()
    h = h.clone().requires_grad_()
    sol = solve_qp_with_info(Q, q, G, h, A, b, tol=1e-12)
    v = torch.randn_like(sol.z)
    gq, gh = torch.autograd.grad((sol.z * v).sum(), (q, h))

    n, m = 4, 5
    mv = lambda M, x: (M @ x.unsqueeze(-1)).squeeze(-1)  # noqa: E731

    def kkt_residual(y, q, h):  # stationarity, complementarity, equality feasibility
        z, lam, nu = y[..., :n], y[..., n : n + m], y[..., n + m :]
        return torch.cat(
            [mv(Q, z) + q + mv(G.mT, lam) + mv(A.mT, nu), lam * (mv(G, z) - h), mv(A, z) - b], dim=-1
        )

    y_star = torch.cat([sol.z, sol.lam, sol.nu], dim=-1).detach()
    y = implicit.implicit_root(kkt_residual, y_star, q, h, batch_dims=1, linear_solver="direct")
    rq, rh = torch.autograd.grad((y[..., :n] * v).sum(), (q, h))
    torch.testing.assert_close(gq, rq, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)


# --- qpth's known NaN cases -------------------------------------------------------------------


def test_trivial_problem_with_zero_constraints_solves_cleanly():
    # qpth issue #47: Q=[[1]], q=[1], G=[[0]], h=[0], A=[[0]], b=[0] returns NaN there.
    one = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    Q, q, G, h, A, b = one([[1.0]]), one([1.0]).requires_grad_(), one([[0.0]]), one([0.0]), one([[0.0]]), one([0.0])
    z = solve_qp(Q, q, G, h, A, b)
    torch.testing.assert_close(z, one([-1.0]), atol=1e-7, rtol=0)
    z.sum().backward()
    torch.testing.assert_close(q.grad, one([-1.0]), atol=1e-6, rtol=0)  # z = -q


def test_redundant_equality_constraints():
    # min 1/2 |z|^2 - z_1 s.t. z_1 + z_2 = 1 written twice (and once scaled), z >= -5.
    Q = torch.eye(2, dtype=torch.float64)
    q = torch.tensor([-1.0, 0.0], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    G, h = -torch.eye(2, dtype=torch.float64), torch.full((2,), 5.0, dtype=torch.float64)
    z = solve_qp(Q, q, G, h, A, b)
    torch.testing.assert_close(z, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-7, rtol=0)
    z[0].backward()
    # z = argmin on the line z1 + z2 = 1: z1 = (1 - q1 + q2) / 2, so dz1/dq = (-1/2, 1/2).
    torch.testing.assert_close(q.grad, torch.tensor([-0.5, 0.5], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("q0", [2.0, 0.0])  # strictly active bound, and weakly active (lam = 0)
def test_active_bound_at_the_optimum(q0):
    Q = torch.eye(3, dtype=torch.float64)
    q = torch.tensor([q0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    G, h = -torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)  # z >= 0
    z = solve_qp(Q, q, G, h)
    # At a degenerate vertex (s = lam = 0) an interior point method converges like sqrt(gap).
    atol = 1e-7 if q0 > 0 else 1e-4
    torch.testing.assert_close(z, torch.clamp(-q.detach(), min=0), atol=atol, rtol=0)
    z.sum().backward()
    assert torch.isfinite(q.grad).all()
    # z = relu(-q): gradient -1 on the free coordinate, 0 on the strictly active ones.
    assert q.grad[1].item() == pytest.approx(-1.0, abs=1e-6)
    assert q.grad[2].item() == pytest.approx(0.0, abs=1e-6)
    if q0 > 0:
        assert q.grad[0].item() == pytest.approx(0.0, abs=1e-6)


# --- infeasibility and bad input ----------------------------------------------------------------


def _infeasible_batch():
    # example 0: z <= -1 and z >= 1 (infeasible); example 1: z <= 1, z >= -1 (feasible)
    Q = torch.eye(1, dtype=torch.float64).expand(2, 1, 1)
    q = torch.zeros(2, 1, dtype=torch.float64)
    G = torch.tensor([[1.0], [-1.0]], dtype=torch.float64).expand(2, 2, 1)
    h = torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    return Q, q, G, h


def test_infeasible_problem_is_reported_not_nan():
    sol = solve_qp_with_info(*_infeasible_batch())
    assert sol.status.tolist() == [QPStatus.INFEASIBLE, QPStatus.CONVERGED]
    assert torch.isfinite(sol.z).all()
    assert sol.z[1].abs().item() < 1e-8


def test_infeasible_problem_raises_in_strict_mode():
    with pytest.raises(QPInfeasibleError, match="infeasible for batch elements \\[0\\]"):
        solve_qp(*_infeasible_batch())
    with pytest.raises(QPInfeasibleError):
        solve_qp_with_info(*_infeasible_batch(), strict=True)


def test_max_iter_is_reported_and_warned():
    # 2 steps and the active-set crossover do not solve these (10 x 10 ones they would).
    Q, q, G, h, A, b = random_qp(4, 30, 90, 0, seed=12)
    sol = solve_qp_with_info(Q, q, G, h, max_iter=2)
    assert (sol.status == QPStatus.MAX_ITER).all() and (sol.iterations == 2).all()
    with pytest.warns(RuntimeWarning, match=r"4 of 4 QPs did not converge \(4 MAX_ITER\)"):
        solve_qp(Q, q, G, h, max_iter=2)


def test_converged_solve_does_not_warn():
    Q, q, G, h, A, b = random_qp(4, 5, 5, 2, seed=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_qp(Q, q, G, h, A, b)


def test_not_positive_definite_Q_raises():
    Q, q, G, h, _, _ = random_qp(3, 4, 4, 0, seed=14)
    Q = Q.clone()
    Q[1] = -Q[1]
    with pytest.raises(ValueError, match=r"positive definite.*\[1\]"):
        solve_qp(Q, q, G, h)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(q=a["q"][:, :3]), ValueError, "dimension n of q"),
        (lambda a: a.update(h=a["h"][:, :2]), ValueError, "dimension m of h"),
        (lambda a: a.update(b=a["b"][:2]), ValueError, "batch sizes disagree"),
        (lambda a: a.update(G=a["G"][0, 0]), ValueError, "G must have shape"),
        (lambda a: a.update(q=a["q"].float()), TypeError, "one dtype"),
        (lambda a: a.update(h=a["h"].long()), TypeError, "one dtype"),
        (lambda a: a.update(Q=a["Q"].numpy()), TypeError, "Q must be a torch.Tensor"),
        (lambda a: a["q"].__setitem__((0, 0), float("nan")), ValueError, "q contains NaN"),
        (lambda a: a["G"].__setitem__((1, 0, 0), float("inf")), ValueError, "G contains NaN or infinite"),
        (lambda a: a.update(b=None), ValueError, "both A and b"),
    ],
)
def test_bad_input_raises(mutate, exc, match):
    args = dict(zip("Q q G h A b".split(), (t.clone() for t in random_qp(3, 4, 5, 2, seed=15))))
    mutate(args)
    with pytest.raises(exc, match=match):
        solve_qp(**args)


def test_bad_options_raise():
    Q, q, G, h, _, _ = random_qp(2, 3, 3, 0)
    with pytest.raises(ValueError, match="max_iter"):
        solve_qp(Q, q, G, h, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        solve_qp(Q, q, G, h, tol=-1.0)
    with pytest.raises(ValueError, match="m >= 1"):
        solve_qp(Q, q, G[:, :0], h[:, :0])


def test_nonsymmetric_Q_uses_its_symmetric_part():
    Q, q, G, h, _, _ = random_qp(2, 4, 4, 0, seed=16)
    skew = torch.randn(4, 4, dtype=Q.dtype)
    skew = skew - skew.T
    torch.testing.assert_close(solve_qp(Q + skew, q, G, h), solve_qp(Q, q, G, h))

