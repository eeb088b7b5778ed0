"""The report's worked examples through the IFT, against their closed forms."""

import pytest
import torch

from ift.implicit.examples import (
    cubic_newton,
    cubic_root,
    ridge_hypergradient,
    ridge_hypergradient_closed_form,
    softmax_ift,
    softmax_kkt_residual,
    softmax_mirror_descent,
    sparsemax_ift,
    sparsemax_newton,
)

DT = torch.float64
jacobian = torch.autograd.functional.jacobian


def sparsemax_reference(theta: torch.Tensor) -> torch.Tensor:
    """Martins & Astudillo's sort-based closed form, for comparison only."""
    z, _ = torch.sort(theta, dim=-1, descending=True)
    k = torch.arange(1, theta.shape[-1] + 1, dtype=theta.dtype)
    cumsum = z.cumsum(-1)
    support = (1 + k * z > cumsum).sum(dim=-1, keepdim=True)
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(theta.dtype)
    return torch.relu(theta - tau)


def test_softmax_solver_is_iterative_and_exact():
    theta = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    z = softmax_mirror_descent(theta)
    torch.testing.assert_close(z[..., :-1], torch.softmax(theta, -1), rtol=1e-12, atol=1e-14)
    assert softmax_kkt_residual(z, theta).abs().max() < 1e-12
    one_step = softmax_mirror_descent(theta, max_iter=1)[..., :-1]
    assert (one_step - torch.softmax(theta, -1)).abs().max() > 1e-3  # not the closed form in disguise


@pytest.mark.parametrize("solver", ["direct", "gmres"])
def test_softmax_jacobian_is_diag_minus_outer(solver):
    theta = torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(1))
    J = jacobian(lambda t: softmax_ift(t, linear_solver=solver), theta)
    x = torch.softmax(theta, -1)
    torch.testing.assert_close(J, torch.diag(x) - torch.outer(x, x), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(J, jacobian(lambda t: torch.softmax(t, -1), theta), rtol=1e-9, atol=1e-11)


def test_softmax_batched_gradients_match_torch_softmax():
    theta = torch.randn(3, 4, 5, dtype=DT, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    (g_ift,) = torch.autograd.grad((softmax_ift(theta) * w).sum(), theta)
    (g_ref,) = torch.autograd.grad((torch.softmax(theta, -1) * w).sum(), theta)
    torch.testing.assert_close(g_ift, g_ref)
    assert torch.autograd.gradcheck(softmax_ift, (theta[0, :2].detach().requires_grad_(),))


def test_softmax_float32():
    theta = torch.randn(2, 7, generator=torch.Generator().manual_seed(4), requires_grad=True)
    (g_ift,) = torch.autograd.grad(softmax_ift(theta, linear_solver="gmres")[:, 0].sum(), theta)
    (g_ref,) = torch.autograd.grad(torch.softmax(theta, -1)[:, 0].sum(), theta)
    assert g_ift.dtype == torch.float32
    torch.testing.assert_close(g_ift, g_ref, rtol=1e-4, atol=1e-5)


def test_sparsemax_solution_matches_closed_form():
    theta = 2 * torch.randn(6, 8, dtype=DT, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sparsemax_newton(theta)[..., :-1], sparsemax_reference(theta))


@pytest.mark.parametrize("solver", ["direct", "gmres"])
def test_sparsemax_jacobian_closed_form_on_support(solver):
    theta = torch.tensor([1.0, 0.8, -1.0, 0.1, 0.95], dtype=DT)
    s = (sparsemax_reference(theta) > 0).to(DT)
    assert 1 < s.sum() < theta.numel()  # a genuinely sparse case
    J = jacobian(lambda t: sparsemax_ift(t, linear_solver=solver), theta)
    torch.testing.assert_close(J, torch.diag(s) - torch.outer(s, s) / s.sum(), rtol=1e-9, atol=1e-11)


def test_sparsemax_gradcheck_batched():
    theta = 2 * torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(6))
    assert torch.autograd.gradcheck(sparsemax_ift, (theta.requires_grad_(),))


def ridge_data(n=40, d=15, seed=7):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, dtype=DT, generator=g), torch.randn(30, d, dtype=DT, generator=g)
    w = torch.randn(d, dtype=DT, generator=g)
    return X, X @ w + 0.5 * torch.randn(n, dtype=DT, generator=g), Xv, Xv @ w + 0.5 * torch.randn(30, dtype=DT, generator=g)


@pytest.mark.parametrize("lam", [0.1, 3.0])
def test_ridge_hypergradient_implicit_equals_closed_form(lam):
    X, y, Xv, yv = ridge_data()
    lam = torch.tensor(lam, dtype=DT)
    loss_ref, grad_ref = ridge_hypergradient_closed_form(X, y, Xv, yv, lam)
    loss, grad = ridge_hypergradient(X, y, Xv, yv, lam, iters=3000, method="implicit")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=0)
    # The closed form itself against central finite differences of the validation loss.
    h = 1e-6
    fd = (ridge_hypergradient_closed_form(X, y, Xv, yv, lam + h)[0] - ridge_hypergradient_closed_form(X, y, Xv, yv, lam - h)[0]) / (2 * h)
    torch.testing.assert_close(grad_ref, fd, rtol=1e-6, atol=0)


def test_ridge_unrolled_converges_to_the_same_hypergradient():
    X, y, Xv, yv = ridge_data()
    lam = torch.tensor(1.0, dtype=DT)
    _, grad_ref = ridge_hypergradient_closed_form(X, y, Xv, yv, lam)
    _, grad_short = ridge_hypergradient(X, y, Xv, yv, lam, iters=5, method="unrolled")
    _, grad_long = ridge_hypergradient(X, y, Xv, yv, lam, iters=3000, method="unrolled")
    assert (grad_short - grad_ref).abs() > 1e-3 * grad_ref.abs()  # truncated unrolling is biased
    torch.testing.assert_close(grad_long, grad_ref, rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="method"):
        ridge_hypergradient(X, y, Xv, yv, lam, iters=5, method="magic")


def test_cubic_root_values_and_closed_form_derivatives():
    g = torch.Generator().manual_seed(8)
    a = (torch.rand(2, 3, 4, dtype=DT, generator=g) + 0.2).requires_grad_()
    b = (3 * torch.randn(2, 3, 4, dtype=DT, generator=g)).requires_grad_()
    x = cubic_root(a, b)
    torch.testing.assert_close(x**3 + a * x, b)
    ga, gb = torch.autograd.grad(x.sum(), (a, b))
    denom = 3 * x.detach() ** 2 + a.detach()
    torch.testing.assert_close(gb, 1 / denom)
    torch.testing.assert_close(ga, -x.detach() / denom)


@pytest.mark.parametrize("solver", ["cg", "gmres", "direct"])
def test_cubic_root_gradcheck(solver):
    g = torch.Generator().manual_seed(9)
    a = (torch.rand(3, 2, dtype=DT, generator=g) + 0.5).requires_grad_()
    b = torch.randn(3, 2, dtype=DT, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cubic_root(a, b, linear_solver=solver), (a, b))


def test_cubic_rejects_nonpositive_a():
    with pytest.raises(ValueError, match="a must be > 0"):
        cubic_newton(torch.tensor([-1.0]), torch.tensor([0.0]))
