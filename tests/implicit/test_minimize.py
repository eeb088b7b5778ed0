"""ift.implicit.minimize: the batched per-problem optimiser, against closed forms and exact Hessians."""

from __future__ import annotations

import math

import pytest
import torch

from ift.implicit import (
    MinimizeDivergenceWarning,
    batched_hessian,
    implicit_argmin,
    minimize,
    stationarity,
)



@pytest.fixture(autouse=True)
def float64_default():
    """Exact comparisons in float64 (restored after each test, so other modules are unaffected)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def quadratic_problem(batch=5, n=4, seed=0):
    """f_b(x) = 1/2 x^T A_b x - c_b^T x with A_b SPD: minimiser A_b^{-1} c_b."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, n, n, generator=gen)
    a = m @ m.transpose(1, 2) + 0.5 * torch.eye(n)
    c = torch.randn(batch, n, generator=gen)
    return a, c


def quad(a, c):
    return lambda x: 0.5 * (x.unsqueeze(1) @ a @ x.unsqueeze(-1)).flatten() - (c * x).sum(-1)


def double_well(x, c):
    """Row-wise nonconvex objective: sum_i (x_i^2 - 1)^2 + c . x; Hessian indefinite near 0."""
    return ((x.pow(2) - 1).pow(2)).sum(-1) + (c * x).sum(-1)


def test_newton_solves_quadratics_exactly():
    a, c = quadratic_problem()
    result = minimize(quad(a, c), torch.zeros(5, 4), method="newton", tol=1e-12)
    torch.testing.assert_close(result.x, torch.linalg.solve(a, c))
    assert result.converged.all() and not result.diverged.any()
    assert result.iterations.max() <= 4  # a damped first step, then pure Newton


def test_batched_hessian_equals_per_problem_autograd_hessian():
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    w = torch.randn(5, 5, generator=gen)
    f = lambda y: double_well(y, c) + torch.sin(y @ w).pow(2).sum(-1) * (1 + y[:, :1].pow(2)).squeeze(-1)  # noqa: E731
    value, grad, hess = batched_hessian(f, x)
    for b in range(3):
        fb = lambda yb: f(torch.cat([x[:b], yb[None], x[b + 1:]]))[b]  # noqa: E731
        torch.testing.assert_close(hess[b], torch.autograd.functional.hessian(fb, x[b]))
        torch.testing.assert_close(grad[b], torch.autograd.functional.jacobian(fb, x[b]))
    torch.testing.assert_close(value, f(x))


def test_newton_handles_indefinite_hessians_and_finds_minima():
    c = torch.tensor([[0.1, -0.2, 0.3], [0.02, 0.05, -0.05]])  # c != 0: x = 0 is not stationary
    x0 = torch.zeros(2, 3)  # near a local maximum of every coordinate: Hessian negative definite
    hess0 = batched_hessian(lambda x: double_well(x, c), x0)[2]
    assert (torch.linalg.eigvalsh(hess0) < 0).all()
    result = minimize(lambda x: double_well(x, c), x0, method="newton", tol=1e-12, max_iter=50)
    assert result.converged.all()
    hess = batched_hessian(lambda x: double_well(x, c), result.x)[2]
    assert (torch.linalg.eigvalsh(hess) > 0).all()  # a minimum, not the saddle/maximum it started at
    assert (result.value < double_well(x0, c)).all()


def test_each_problem_stops_on_its_own():
    a, c = quadratic_problem(batch=3)
    x0 = torch.zeros(3, 4)
    x0[1] = torch.linalg.solve(a[1], c[1])  # already optimal
    result = minimize(quad(a, c), x0, method="newton", tol=1e-10)
    assert result.iterations[1] == 0 and (result.iterations[[0, 2]] > 0).all()


@pytest.mark.parametrize("method,kwargs", [("sgd", dict(lr=10.0, momentum=0.5)), ("adam", dict(lr=0.1))])
def test_first_order_methods_converge_with_backtracking(method, kwargs):
    """lr far above 2/L: backtracking halves each problem's step until it descends."""
    a, c = quadratic_problem()
    result = minimize(quad(a, c), torch.zeros(5, 4), method=method, tol=1e-6, max_iter=5000, **kwargs)
    assert result.converged.all(), result.stationarity
    torch.testing.assert_close(result.x, torch.linalg.solve(a, c), rtol=1e-4, atol=1e-4)


def test_stationarity_is_relative_and_matches_the_result():
    a, c = quadratic_problem()
    f = quad(a, c)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    grad = (a @ x.unsqueeze(-1)).squeeze(-1) - c
    torch.testing.assert_close(stationarity(f, x), grad.norm(dim=-1) / (1 + f(x).abs()))
    result = minimize(f, x, method="newton", max_iter=1, tol=0)
    torch.testing.assert_close(result.stationarity, stationarity(f, result.x))
    scaled = minimize(lambda y: 1e4 * f(y), x, method="newton", max_iter=1, tol=0)
    # relative: a rescaled objective has (nearly) the same stationarity, unlike the raw gradient norm
    assert scaled.grad_norm.max() > 100 * result.grad_norm.max()


def test_float32_reaches_a_relative_tolerance_an_absolute_one_could_not():
    """A large-scale float32 objective: the gradient norm floors well above 1e-5, yet the relative
    stationarity reaches 1e-5."""
    a, c = quadratic_problem(batch=64, n=16)
    a, c = (2000 * a).float(), (2000 * c).float()
    result = minimize(lambda x: quad(a, c)(x) + 5e4, torch.zeros(64, 16, dtype=torch.float32), method="newton",
                      tol=1e-5)
    assert result.converged.all()
    assert result.grad_norm.max() > 1e-5


def test_divergence_falls_back_to_x0_with_a_warning():
    a, c = quadratic_problem(batch=3)

    shift = torch.tensor([0.0, 5.0, 0.0])

    def f(x):  # row 1 is NaN from the start (sqrt of a negative number), the others are fine
        return quad(a, c)(x) + torch.sqrt(x[:, 0].pow(2) + 1 - shift)

    x0 = torch.ones(3, 4)
    for method in ("newton", "sgd"):
        with pytest.warns(MinimizeDivergenceWarning, match="fall back to x0"):
            result = minimize(f, x0, method=method, max_iter=20, lr=0.01)
        assert result.diverged.tolist() == [False, True, False]
        torch.testing.assert_close(result.x[1], x0[1])
        assert not result.converged[1]


def test_compaction_gives_the_same_result():
    c = torch.randn(16, 3, generator=torch.Generator().manual_seed(4))
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(5))
    plain = minimize(double_well, x0, method="newton", tol=1e-10, max_iter=50, args=(c,))
    compact = minimize(double_well, x0, method="newton", tol=1e-10, max_iter=50, args=(c,), compact=True)
    torch.testing.assert_close(compact.x, plain.x)
    assert torch.equal(compact.iterations, plain.iterations)
    assert plain.iterations.min() < plain.iterations.max()  # problems did stop at different times


@pytest.mark.parametrize("method,kwargs", [("newton", {}), ("sgd", dict(lr=0.05, momentum=0.5)),
                                           ("adam", dict(lr=0.05))])
@pytest.mark.parametrize("compact", [False, True])
def test_sparse_host_checks_give_the_same_result(method, kwargs, compact):
    """Reading the stopping flags every 8 iterations (the accelerator default) only delays the
    "all stopped" exit: stopped problems are masked, so points, counts and flags are unchanged."""
    c = torch.randn(16, 3, generator=torch.Generator().manual_seed(4))
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(5))
    run = lambda every: minimize(double_well, x0, method=method, tol=1e-8, max_iter=300, args=(c,),  # noqa: E731
                                 compact=compact, check_every=every, **kwargs)
    every_step, sparse = run(1), run(8)
    torch.testing.assert_close(sparse.x, every_step.x, rtol=0, atol=0)
    assert torch.equal(sparse.iterations, every_step.iterations)
    assert torch.equal(sparse.converged, every_step.converged) and every_step.converged.any()
    assert every_step.iterations.min() < every_step.iterations.max()


def test_host_reads_happen_only_every_check_every_iterations(monkeypatch):
    """Each bool()/int() of a tensor is a device synchronisation on a GPU: count them in the loop."""
    reads = []
    for name in ("__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, _f=original: reads.append(1) or _f(t))
    a, c = quadratic_problem(batch=8)
    for every, expected_max in ((1, 2 * 64), (8, 2 * 64 // 8)):
        reads.clear()
        minimize(quad(a, c), torch.zeros(8, 4), method="sgd", lr=1e-3, tol=0, max_iter=64, check_every=every)
        in_loop = len(reads) - 2  # _finish asks whether a last step is undone and whether any diverged
        assert in_loop <= expected_max, (every, len(reads))
    assert in_loop >= 64 // 8  # and the sparse loop still checks


@pytest.mark.parametrize("method", ["newton", "sgd"])
def test_unrolled_and_checkpointed_gradients_equal_the_ift(method):
    """Unrolling to convergence, with or without checkpointing, gives the implicit gradient."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(3, 3, generator=gen, requires_grad=True)
    c = torch.randn(4, 3, generator=gen, requires_grad=True)

    def f(x, c_):
        return 0.5 * x.pow(2).sum(-1) + 0.3 * torch.tanh(x @ w).pow(2).sum(-1) - (c_ * x).sum(-1)

    kwargs = dict(method=method, tol=1e-13, max_iter=400 if method == "sgd" else 30, lr=0.5, momentum=0.3)
    x0 = torch.zeros(4, 3)
    grads = {}
    for name, extra in {"unrolled": {}, "checkpointed": {"checkpoint_segments": 5},
                        "compact": {"compact": True}}.items():
        result = minimize(f, x0, create_graph=True, args=(c,), **extra, **kwargs)
        assert result.converged.all()
        w.grad = c.grad = None
        result.x.pow(3).sum().backward()  # (checkpointed segments support .backward(), not autograd.grad)
        grads[name] = (w.grad.clone(), c.grad.clone())
    solved = minimize(f, x0, args=(c,), **kwargs).x
    x_star = implicit_argmin(lambda x, w_, c_: 0.5 * x.pow(2).sum() + 0.3 * torch.tanh(x @ w_).pow(2).sum()
                             - (c_ * x).sum(), solved, w, c, batch_dims=1, tol=1e-12)
    ift = torch.autograd.grad(x_star.pow(3).sum(), (w, c))
    for name, g in grads.items():
        for a, b in zip(g, ift):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("method", ["sgd", "adam", "newton"])
def test_checkpointed_equals_unrolled_at_a_fixed_budget(method):
    """lr 1 overshoots (backtracking undoes steps, also across segment boundaries)."""
    a, c = quadratic_problem()
    c = c.clone().requires_grad_(True)
    out = []
    for segments in (None, 3, 10):
        r = minimize(lambda x, c_: quad(a, c_)(x), torch.zeros(5, 4), method=method, lr=1.0, momentum=0.5,
                     tol=0, max_iter=10, create_graph=True, checkpoint_segments=segments, args=(c,))
        c.grad = None
        r.x.sum().backward()
        out.append((r.x.detach(), c.grad.clone(), r.iterations))
    for x, g, it in out[1:]:
        torch.testing.assert_close(x, out[0][0])
        torch.testing.assert_close(g, out[0][1])
        assert torch.equal(it, out[0][2])
    if method == "sgd":
        assert (out[0][2] < 10).any()  # some steps were undone


def test_curvature_callable_is_used():
    a, c = quadratic_problem()
    calls = []

    def curvature(x):
        calls.append(1)
        return a

    result = minimize(quad(a, c), torch.zeros(5, 4), method="newton", curvature=curvature, tol=1e-12)
    assert calls and result.converged.all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="lbfgs"), "method='lbfgs' is unknown"),
    (dict(max_iter=-1), "max_iter"),
    (dict(tol=-1.0), "tol"),
    (dict(checkpoint_segments=2), "checkpoint_segments needs create_graph"),
    (dict(damping=0.0), "damping"),
    (dict(check_every=0), "check_every"),
])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    a, c = quadratic_problem()
    with pytest.raises(ValueError, match=match):
        minimize(quad(a, c), torch.zeros(5, 4), **kwargs)
    with pytest.raises(ValueError, match=r"shape \(B, n\)"):
        minimize(quad(a, c), torch.zeros(4))


def test_max_iter_zero_only_evaluates():
    a, c = quadratic_problem()
    result = minimize(quad(a, c), torch.ones(5, 4), max_iter=0)
    assert (result.iterations == 0).all()
    torch.testing.assert_close(result.x, torch.ones(5, 4))
    assert math.isclose(float(result.tol), 1e-5)


def test_newton_trusts_its_model_below_the_objectives_rounding_noise():
    """A quadratic inside large cancelling terms (like the ELBO's): in float32 its value is noise at
    the 1e-3 level, so small true decreases cannot be confirmed by evaluating it."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(64, 6, 6, generator=gen)
    a = (m @ m.transpose(1, 2) + torch.eye(6)).float()
    c = torch.randn(64, 6, generator=gen).float()

    def f(x):
        return (2e4 + 0.5 * (x.unsqueeze(1) @ a @ x.unsqueeze(-1)).flatten() - (c * x).sum(-1)) - 2e4

    result = minimize(f, torch.zeros(64, 6, dtype=torch.float32), method="newton", tol=1e-5, max_iter=30)
    assert result.converged.all(), result.stationarity.max()
    torch.testing.assert_close(result.x, torch.linalg.solve(a, c), rtol=1e-3, atol=1e-4)


def test_newton_returns_the_last_hessian_it_built():
    """Without a curvature callable the converged problems' Hessian is the one at x; with one, the
    converged step skips the build (the Hessian is from the iterate before); NaN where none was built."""
    gen = torch.Generator().manual_seed(3)
    c = 0.3 * torch.randn(6, 3, generator=gen)
    f = lambda x: double_well(x, c)  # noqa: E731
    result = minimize(f, torch.full((6, 3), 0.4), method="newton", tol=1e-10, max_iter=20)
    assert result.converged.all()
    torch.testing.assert_close(result.hessian, batched_hessian(f, result.x)[2])
    hess_calls = []

    def curvature(x, a_, c_):
        hess_calls.append(x.shape[0])
        return a_

    a, b = quadratic_problem(batch=4)
    x0 = torch.zeros(4, 4)
    x0[2] = torch.linalg.solve(a[2], b[2])  # already optimal: no Hessian is ever built for it
    result = minimize(lambda x, a_, c_: quad(a_, c_)(x), x0, method="newton", tol=1e-10, curvature=curvature,
                      args=(a, b), compact=True)
    assert result.converged.all() and torch.isnan(result.hessian[2]).all()
    keep = [0, 1, 3]
    torch.testing.assert_close(result.hessian[keep], a[keep])  # a constant Hessian
    assert hess_calls[0] == 3  # built only for the problems that step
    assert minimize(f, torch.zeros(6, 3), method="sgd").hessian is None
