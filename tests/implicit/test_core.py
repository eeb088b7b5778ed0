"""implicit_root / implicit_argmin / implicit_fixed_point: gradcheck, batching, params, diagnostics, errors."""

import warnings

import pytest
import torch
from torch import nn

from ift.implicit import (
    CG,
    GMRES,
    Direct,
    ImplicitSolveError,
    ImplicitSolveWarning,
    Neumann,
    implicit_argmin,
    implicit_fixed_point,
    implicit_root,
)

DT = torch.float64
SOLVERS = ["cg", "gmres", "bicgstab", "direct", Neumann(alpha="auto", max_iter=5000)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- a strongly convex quadratic-plus-quartic problem, batched: f = sum_b f_b ---


def quartic_objective(x, A, c, scale):
    """sum_b [ x_b^T A x_b / 2 - c_b^T x_b + scale * sum x_b^4 / 4 ]; A shared, c per problem."""
    return 0.5 * torch.einsum("bi,ij,bj->", x, A, x) - (c * x).sum() + 0.25 * scale * x.pow(4).sum()


def quartic_minimiser(A, c, scale, iters=100):
    """Newton per problem: an independent solver; the implicit layers do not care which."""
    with torch.no_grad():
        x = torch.zeros_like(c)
        for _ in range(iters):
            g = x @ A - c + scale * x**3
            H = A + torch.diag_embed(3 * scale * x**2)
            step = torch.linalg.solve(H, g)
            x = x - step
            if bool(step.abs().max() <= 1e-15):
                break
    return x


def quartic_data(batch=3, n=4, dtype=DT):
    g = gen(1)
    M = torch.randn(n, n, dtype=dtype, generator=g)
    A = (M @ M.T / n + torch.eye(n, dtype=dtype)).requires_grad_()
    c = torch.randn(batch, n, dtype=dtype, generator=g).requires_grad_()
    scale = torch.tensor(0.7, dtype=dtype, requires_grad=True)
    return A, c, scale


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradcheck_implicit_argmin(solver):
    A, c, scale = quartic_data(batch=2, n=3)

    def fn(A, c, scale):
        A = (A + A.T) / 2
        x = quartic_minimiser(A, c, scale)
        return implicit_argmin(quartic_objective, x, A, c, scale, batch_dims=1, linear_solver=solver)

    assert torch.autograd.gradcheck(fn, (A, c, scale))


def cubic_system(x, W, b):
    """A coupled nonlinear root problem per row: x + 0.3 tanh(x W^T) - b = 0 (non-symmetric Jacobian)."""
    return x + 0.3 * torch.tanh(x @ W.T) - b


def cubic_system_solve(W, b):
    with torch.no_grad():
        x = b.clone()
        for _ in range(200):  # fixed-point iteration x = b - 0.3 tanh(W x), a contraction for small W
            x = b - 0.3 * torch.tanh(x @ W.T)
    return x


@pytest.mark.parametrize("solver", ["gmres", "bicgstab", "direct", Neumann(max_iter=2000)])
def test_gradcheck_implicit_root(solver):
    g = gen(2)
    W = (torch.randn(5, 5, dtype=DT, generator=g) / 3).requires_grad_()
    b = torch.randn(3, 5, dtype=DT, generator=g).requires_grad_()
    fn = lambda W, b: implicit_root(cubic_system, cubic_system_solve(W, b), W, b, batch_dims=1, linear_solver=solver)
    assert torch.autograd.gradcheck(fn, (W, b))


@pytest.mark.parametrize("solver", ["gmres", "bicgstab", "direct", Neumann(max_iter=2000)])
def test_gradcheck_implicit_fixed_point(solver):
    g = gen(3)
    W = (torch.randn(5, 5, dtype=DT, generator=g) / 3).requires_grad_()
    b = torch.randn(2, 5, dtype=DT, generator=g).requires_grad_()
    T = lambda x, W, b: b - 0.3 * torch.tanh(x @ W.T)
    fn = lambda W, b: implicit_fixed_point(T, cubic_system_solve(W, b), W, b, batch_dims=1, linear_solver=solver)
    assert torch.autograd.gradcheck(fn, (W, b))


def test_unbatched_matches_dense_ift_formula():
    # F(x, theta) = A x + x^3 - theta: dx/dtheta = (A + 3 diag(x^2))^{-1}, checked against a dense solve.
    g = gen(4)
    A = torch.randn(6, 6, dtype=DT, generator=g) / 4 + 2 * torch.eye(6, dtype=DT)
    theta = torch.randn(6, dtype=DT, generator=g, requires_grad=True)
    F = lambda x, theta: A @ x + x**3 - theta
    with torch.no_grad():
        x = torch.zeros(6, dtype=DT)
        for _ in range(50):
            x = x - torch.linalg.solve(A + torch.diag(3 * x**2), F(x, theta))
    J = torch.autograd.functional.jacobian(lambda t: implicit_root(F, x, t), theta)
    torch.testing.assert_close(J, torch.linalg.inv(A + torch.diag(3 * x**2)))


@pytest.mark.parametrize("solver", ["cg", "gmres", "bicgstab", "direct"])
def test_batched_equals_one_by_one(solver):
    A, c, scale = quartic_data(batch=4)
    x = quartic_minimiser(A.detach(), c.detach(), scale.detach())
    v = torch.randn(4, 4, dtype=DT, generator=gen(5))
    y = implicit_argmin(quartic_objective, x, A, c, scale, batch_dims=1, linear_solver=solver)
    gA, gc, gs = torch.autograd.grad((y * v).sum(), (A, c, scale))
    gA_sum, gs_sum, gc_rows = torch.zeros_like(A), torch.zeros_like(scale), []
    for i in range(4):
        c_i = c[i : i + 1]
        y_i = implicit_argmin(quartic_objective, x[i : i + 1], A, c_i, scale, batch_dims=1, linear_solver=solver)
        a, ci, s = torch.autograd.grad((y_i * v[i : i + 1]).sum(), (A, c_i, scale))
        gA_sum, gs_sum = gA_sum + a, gs_sum + s
        gc_rows.append(ci)
    torch.testing.assert_close(gc, torch.cat(gc_rows))
    torch.testing.assert_close(gA, gA_sum)
    torch.testing.assert_close(gs, gs_sum)


class Decoder(nn.Module):
    def __init__(self, d_latent=2, d_hidden=8, d_out=5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_latent, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))
        self.frozen = nn.Linear(d_out, d_out)  # registered but unused by f: gets no gradient
        self.net[0].bias.requires_grad_(False)  # a parameter that does not require grad


def proximal_objective(lam, x_obs, lam0, eta, *weights, decoder):
    """A SAVI-like inner objective per row: reconstruction + prior + proximal term, summed over rows."""
    params = dict(zip([n for n, _ in decoder.named_parameters()], weights))
    mu = torch.func.functional_call(decoder.net, {k[4:]: v for k, v in params.items() if k.startswith("net.")}, (lam,))
    recon = 0.5 * (mu - x_obs).pow(2).sum()
    return recon + 0.05 * lam.pow(2).sum() + 0.5 / eta * (lam - lam0).pow(2).sum()


def test_module_parameters_as_params_and_grad_flags():
    torch.manual_seed(0)
    dec = Decoder().double()
    x_obs = torch.randn(3, 5, dtype=DT)
    lam0 = torch.randn(3, 2, dtype=DT, requires_grad=True)
    weights = list(dec.parameters())
    f = lambda lam, x_obs, lam0, eta, *w: proximal_objective(lam, x_obs, lam0, eta, *w, decoder=dec)

    def solve():
        lam = lam0.detach().clone().requires_grad_()
        opt = torch.optim.LBFGS([lam], max_iter=200, tolerance_grad=1e-13, tolerance_change=0, line_search_fn="strong_wolfe")
        opt.step(lambda: (opt.zero_grad(), (loss := f(lam, x_obs, lam0.detach(), 0.5, *weights)), loss.backward())[1])
        return lam.detach()

    lam_star = solve()
    out = implicit_argmin(f, lam_star, x_obs, lam0, 0.5, *weights, batch_dims=1)
    loss = out.pow(2).sum()
    grads = torch.autograd.grad(loss, [lam0] + [w for w in weights if w.requires_grad], allow_unused=True)
    # Reference: the dense IFT with the full Hessian of the summed objective (block-diagonal by row).
    flat = lambda l: f(l.view(3, 2), x_obs, lam0, 0.5, *weights)
    H = torch.autograd.functional.hessian(flat, lam_star.reshape(-1))
    u = torch.linalg.solve(H, 2 * lam_star.reshape(-1))
    lam_var = lam_star.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(lam_var, x_obs, lam0, 0.5, *weights), lam_var, create_graph=True)
    wanted = [lam0] + [w for w in weights if w.requires_grad]
    ref = torch.autograd.grad(g.reshape(-1), wanted, grad_outputs=-u, allow_unused=True)
    for got, exp, w in zip(grads, ref, wanted):
        if w is dec.frozen.weight or w is dec.frozen.bias:
            assert got is None and exp is None
        else:
            torch.testing.assert_close(got, exp)
    assert dec.net[0].bias.grad is None


def test_non_tensor_params_and_no_grad_params():
    theta = torch.randn(4, dtype=DT, requires_grad=True)
    frozen = torch.randn(4, dtype=DT)
    F = lambda x, theta, frozen, power, name: x * power - theta - frozen if name == "lin" else None
    x = ((theta + frozen) / 3.0).detach()
    y = implicit_root(F, x, theta, frozen, 3.0, "lin", linear_solver="cg")
    (g,) = torch.autograd.grad(y.sum(), theta)
    torch.testing.assert_close(g, torch.full_like(theta, 1 / 3))


def test_output_equals_x_star_and_history_is_cut():
    theta = torch.tensor([2.0, 3.0], dtype=DT, requires_grad=True)
    x_with_history = theta.sqrt()  # "solver" ran with grad: its graph must be ignored
    y = implicit_root(lambda x, t: x**2 - t, x_with_history, theta)
    assert torch.equal(y, x_with_history.detach())
    (g,) = torch.autograd.grad(y.sum(), theta)
    torch.testing.assert_close(g, 0.5 / theta.detach().sqrt())


def test_float32():
    A, c, scale = (t.detach().float() for t in quartic_data())
    c.requires_grad_()
    x = quartic_minimiser(A, c, scale)
    y = implicit_argmin(quartic_objective, x, A, c, scale, batch_dims=1)
    (g,) = torch.autograd.grad((y * torch.arange(4.0)).sum(), c)
    H = A + torch.diag_embed(3 * scale * x**2)
    expected = torch.linalg.solve(H, torch.arange(4.0).expand(3, 4))  # d x*/d c = H^{-1}
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)


def test_torch_func_grad_and_vjp_but_not_vmap():
    theta = torch.tensor([1.5, 4.0, 9.0], dtype=DT)

    def sqrt_ift(t):
        with torch.no_grad():
            x = t.sqrt()
        return implicit_root(lambda x, t: x**2 - t, x, t, batch_dims=1, linear_solver="cg")

    torch.testing.assert_close(torch.func.grad(lambda t: sqrt_ift(t).sum())(theta), 0.5 / theta.sqrt())
    torch.testing.assert_close(torch.func.vjp(sqrt_ift, theta)[1](torch.ones(3, dtype=DT))[0], 0.5 / theta.sqrt())
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.jacrev(sqrt_ift)(theta)
    A, c, scale = (t.detach() for t in quartic_data())
    loss = lambda c: implicit_argmin(quartic_objective, quartic_minimiser(A, c, scale), A, c, scale, batch_dims=1).sum()
    c.requires_grad_()
    torch.testing.assert_close(torch.func.grad(loss)(c.detach()), torch.autograd.grad(loss(c), c)[0])


def test_higher_order_is_refused():
    theta = torch.tensor([4.0, 9.0], dtype=DT, requires_grad=True)
    y = implicit_root(lambda x, t: x**2 - t, theta.detach().sqrt(), theta)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(y.sum(), theta, create_graph=True)

    def inner(t):
        with torch.no_grad():
            x = t.sqrt()
        return implicit_root(lambda x, t: x**2 - t, x, t).pow(2).sum()

    with pytest.raises(RuntimeError, match="first-order"):
        torch.func.grad(lambda s: torch.func.grad(inner)(s).sum())(theta.detach())


def test_singular_problem_warns_and_reports():
    # F(x, theta) = A x - theta with A singular: dF/dx violates IFT condition 3.
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    theta = torch.tensor([1.0, 1.0, 0.0], dtype=DT, requires_grad=True)
    x = torch.tensor([1.0, 0.5, 0.0], dtype=DT)
    seen = []
    for solver in ["cg", "gmres", "direct"]:
        y = implicit_root(lambda x, t: A @ x - t, x, theta, linear_solver=solver, on_solve=seen.append)
        with pytest.warns(ImplicitSolveWarning, match="did not converge"):
            torch.autograd.grad(y.sum(), theta)
        info = seen[-1]
        assert info.solver == solver
        assert not info.all_converged and info.max_residual > 0.1
        assert float(info.root_residual) == 0.0


def test_converged_solve_does_not_warn_and_reports():
    theta = torch.tensor([4.0, 9.0], dtype=DT, requires_grad=True)
    seen = []
    y = implicit_root(lambda x, t: x**2 - t, theta.detach().sqrt(), theta, batch_dims=1, on_solve=seen.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitSolveWarning)
        torch.autograd.grad(y.sum(), theta)
    (info,) = seen
    assert info.all_converged and info.iterations.tolist() == [1, 1] and info.max_residual <= info.tol


def test_ridge_damps_the_solve():
    theta = torch.tensor([4.0], dtype=DT, requires_grad=True)
    y = implicit_root(lambda x, t: x**2 - t, theta.detach().sqrt(), theta, linear_solver="cg", ridge=1.0)
    (g,) = torch.autograd.grad(y.sum(), theta)
    torch.testing.assert_close(g, torch.tensor([1 / (4.0 + 1.0)], dtype=DT))  # 1 / (dF/dx + ridge)


def test_nonfinite_residual_raises():
    theta = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    y = implicit_root(lambda x, t: torch.log(x) - t, torch.tensor([-1.0, 1.0], dtype=DT), theta)
    with pytest.raises(ImplicitSolveError, match="NaN/Inf"):
        torch.autograd.grad(y.sum(), theta)


def test_nonfinite_incoming_gradient_propagates_nan():
    theta = torch.tensor([4.0], dtype=DT, requires_grad=True)
    y = implicit_root(lambda x, t: x**2 - t, theta.detach().sqrt(), theta)
    with pytest.warns(ImplicitSolveWarning, match="incoming gradient"):
        (g,) = torch.autograd.grad(y, theta, grad_outputs=torch.tensor([float("inf")], dtype=DT))
    assert torch.isnan(g).all()


def test_diverging_linear_solve_raises():
    # Neumann with a step far too large diverges to Inf: an error, not a number.
    theta = torch.tensor([4.0], dtype=DT, requires_grad=True)
    y = implicit_root(lambda x, t: x**2 - t, theta.detach().sqrt(), theta, linear_solver=Neumann(alpha=100.0, max_iter=500))
    with pytest.raises(ImplicitSolveError, match="NaN/Inf"):
        torch.autograd.grad(y.sum(), theta)


def test_input_validation():
    theta = torch.ones(3, dtype=DT, requires_grad=True)
    F = lambda x, t: x - t
    with pytest.raises(TypeError, match="callable"):
        implicit_root(3, theta.detach(), theta)
    with pytest.raises(TypeError, match="floating-point"):
        implicit_root(F, torch.ones(3, dtype=torch.long), theta)
    with pytest.raises(ValueError, match="batch_dims"):
        implicit_root(F, theta.detach(), theta, batch_dims=2)
    with pytest.raises(ValueError, match="unknown linear_solver"):
        implicit_root(F, theta.detach(), theta, linear_solver="qr")
    with pytest.raises(ValueError, match="instance"):
        implicit_root(F, theta.detach(), theta, linear_solver=CG(), tol=1e-3)
    with pytest.raises(TypeError, match="on_solve"):
        implicit_root(F, theta.detach(), theta, on_solve="log")
    y = implicit_root(lambda x, t: (x - t).sum(), theta.detach(), theta)
    with pytest.raises(ValueError, match="shaped like x"):
        y.sum().backward()
    y = implicit_argmin(lambda x, t: (x - t).pow(2), theta.detach(), theta)
    with pytest.raises(ValueError, match="scalar"):
        y.sum().backward()


def test_solver_objects_and_classes_accepted():
    theta = torch.tensor([4.0, 9.0], dtype=DT, requires_grad=True)
    for spec in [GMRES(tol=1e-12), Direct, CG]:
        y = implicit_root(lambda x, t: x**2 - t, theta.detach().sqrt(), theta, batch_dims=1, linear_solver=spec)
        (g,) = torch.autograd.grad(y.sum(), theta)
        torch.testing.assert_close(g, 0.5 / theta.detach().sqrt())


def test_argmin_sign_convention_maximum_and_minimum_agree():
    # x* maximises g(x) = -(x - t)^2 - x^4 / 4: same gradient via implicit_argmin(g) and (-g).
    t = torch.tensor([0.3, -1.2], dtype=DT, requires_grad=True)
    g = lambda x, t: -((x - t) ** 2).sum() - 0.25 * x.pow(4).sum()
    with torch.no_grad():
        x = t.clone()
        for _ in range(50):
            x = x - (-2 * (x - t) - x**3) / (-2 - 3 * x**2)
    grads = []
    for obj in [g, lambda x, t: -g(x, t)]:
        y = implicit_argmin(obj, x, t, batch_dims=1, linear_solver="cg")
        grads.append(torch.autograd.grad(y.sum(), t)[0])
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], 2 / (2 + 3 * x**2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    A, c, scale = (t.detach() for t in quartic_data())
    results = []
    for device in ["cpu", "cuda"]:
        Ad, cd, sd = A.to(device), c.to(device).requires_grad_(), scale.to(device)
        x = quartic_minimiser(Ad, cd.detach(), sd)
        for solver in ["cg", "gmres", "direct", "neumann"]:
            y = implicit_argmin(quartic_objective, x, Ad, cd, sd, batch_dims=1, linear_solver=solver, max_iter=2000)
            results.append((device, solver, torch.autograd.grad(y.sum(), cd)[0].cpu()))
    half = len(results) // 2
    for (_, s, cpu), (_, _, gpu) in zip(results[:half], results[half:]):
        torch.testing.assert_close(cpu, gpu, msg=s)


# --- mixed precision: the backward solves in float32 at least ---


def _bf16_quadratic(batch=4, n=64):
    """SPD quadratics f_b = x^T A_b x / 2 - c_b^T x (matmuls run in bf16 under CPU autocast)."""
    g = gen(7)
    M = torch.randn(batch, n, n, dtype=DT, generator=g)
    A = M @ M.transpose(1, 2) / n + 0.5 * torch.eye(n, dtype=DT)
    c, w = torch.randn(batch, n, dtype=DT, generator=g), torch.randn(batch, n, dtype=DT, generator=g)

    def f(x, A, c):
        return 0.5 * (x.unsqueeze(1) @ A @ x.unsqueeze(-1)).sum() - (c * x).sum()

    return f, A, c, w


def test_backward_under_bf16_autocast_solves_in_float32():
    # Without disabling autocast in the backward the HVPs run in bf16 and CG stalls near 5e-3.
    f, A64, c64, w = _bf16_quadratic()
    A, c = A64.float().requires_grad_(), c64.float().requires_grad_()
    x_star = torch.linalg.solve(A64, c64).float()
    infos = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitSolveWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = implicit_argmin(f, x_star, A, c, batch_dims=1, on_solve=infos.append)
            (gc,) = torch.autograd.grad((x * w.float()).sum(), c)
    (info,) = infos
    assert info.tol == 1e-5 and info.all_converged and info.max_residual <= 1e-5
    assert gc.dtype == torch.float32
    exact = torch.linalg.solve(A64, w)  # d x*/dc = A^{-1}, symmetric
    assert float((gc.double() - exact).norm() / exact.norm()) < 1e-4


def test_bf16_params_get_bf16_gradients_from_a_float32_solve():
    f, A64, c64, w = _bf16_quadratic()
    A, c = A64.bfloat16().requires_grad_(), c64.bfloat16().requires_grad_()
    x_star = torch.linalg.solve(A.detach().double(), c.detach().double()).bfloat16()
    infos = []
    x = implicit_argmin(f, x_star, A, c, batch_dims=1, on_solve=infos.append)
    gA, gc = torch.autograd.grad((x * w.bfloat16()).sum(), (A, c))
    assert (gA.dtype, gc.dtype) == (torch.bfloat16, torch.bfloat16)
    assert infos[0].tol == 1e-5 and infos[0].all_converged
    exact = torch.linalg.solve(A.detach().double(), w)
    assert float((gc.double() - exact).norm() / exact.norm()) < 1e-2  # bf16 rounding of x*, A and the result
