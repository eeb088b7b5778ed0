"""Worked examples of the report as library code: each solves a problem iteratively (never with the
closed form), then differentiates the solution with the IFT. Tests compare them to closed forms.

- softmax as entropy-regularised argmax on the simplex (report section 3): KKT residual in
  ``(x, u)``, solved by mirror descent;
- sparsemax (the L2 variant): KKT residual in ``(x, tau)``, solved by Newton on the threshold;
- ridge regression's validation loss differentiated w.r.t. the L2 penalty (bilevel example);
- a batched cubic ``x^3 + a x = b`` per element, solved by Newton.
"""

from __future__ import annotations

import torch

from ift.implicit.core import implicit_argmin, implicit_root
from ift.implicit.operators import power_iteration


def _check_logits(theta: torch.Tensor, name: str) -> None:
    if not isinstance(theta, torch.Tensor) or not theta.is_floating_point() or theta.dim() < 1:
        raise TypeError(f"{name}: theta must be a floating-point tensor of shape (..., n)")
    if theta.shape[-1] < 1:
        raise ValueError(f"{name}: theta needs at least one item in its last dim, got shape {tuple(theta.shape)}")


# --- softmax: maximise x^T theta + H(x) subject to 1^T x = 1 (x > 0 is implied by the entropy) ---


def softmax_kkt_residual(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """KKT conditions of the softmax problem (report eq. 3, with v = 0 since x > 0).

    ``z = (x, u)`` stacks the primal ``x`` and the multiplier ``u`` of ``1^T x = 1``:
    stationarity ``theta - log x - 1 + u = 0`` and feasibility ``1^T x - 1 = 0``.
    """
    x, u = z[..., :-1], z[..., -1:]
    return torch.cat([theta - torch.log(x) - 1 + u, x.sum(dim=-1, keepdim=True) - 1], dim=-1)


@torch.no_grad()
def softmax_mirror_descent(
    theta: torch.Tensor, step: float = 0.5, tol: float | None = None, max_iter: int = 200
) -> torch.Tensor:
    """Solve the softmax problem by entropic mirror ascent; returns ``z* = (x*, u*)``.

    Each step is ``log x <- (1 - step) log x + step (theta - 1)`` renormalised on the simplex, so the
    error in ``log x`` shrinks by ``1 - step`` per iteration (``step = 1`` would be the closed form).
    """
    _check_logits(theta, "softmax_mirror_descent")
    if not 0 < step < 1:
        raise ValueError(f"softmax_mirror_descent: step must be in (0, 1), got {step}")
    tol = tol if tol is not None else 10 * torch.finfo(theta.dtype).eps
    log_x = torch.full_like(theta, -torch.log(torch.tensor(float(theta.shape[-1]))).item())
    for _ in range(max_iter):
        new = (1 - step) * log_x + step * (theta - 1)
        new = new - torch.logsumexp(new, dim=-1, keepdim=True)
        done = bool(((new - log_x).abs() <= tol).all())
        log_x = new
        if done:
            break
    u = (log_x - theta).mean(dim=-1, keepdim=True) + 1  # from stationarity, averaged over items
    return torch.cat([log_x.exp(), u], dim=-1)


def softmax_ift(theta: torch.Tensor, linear_solver="direct", **solver_kwargs) -> torch.Tensor:
    """Softmax of ``theta`` (..., n) computed as an argmax by an iterative solver, differentiable
    through the IFT on the KKT system; batched over all leading dims."""
    z_star = softmax_mirror_descent(theta.detach())
    z = implicit_root(
        softmax_kkt_residual, z_star, theta, batch_dims=theta.dim() - 1, linear_solver=linear_solver, **solver_kwargs
    )
    return z[..., :-1]


# --- sparsemax: minimise ||x - theta||^2 / 2 subject to x in the simplex ---


def sparsemax_kkt_residual(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """KKT conditions of sparsemax in ``z = (x, tau)``: ``x = relu(theta - tau)`` and ``1^T x = 1``.

    Eliminating the multipliers of ``x >= 0`` gives this piecewise-linear system; its Jacobian in
    ``z`` is ``[[I, s], [1^T, 0]]`` with ``s`` the support indicator, nonsingular when ``|S| >= 1``.
    """
    x, tau = z[..., :-1], z[..., -1:]
    return torch.cat([x - torch.relu(theta - tau), x.sum(dim=-1, keepdim=True) - 1], dim=-1)


@torch.no_grad()
def sparsemax_newton(theta: torch.Tensor, max_iter: int | None = None) -> torch.Tensor:
    """Threshold ``tau`` with ``sum relu(theta - tau) = 1`` by Newton's method; returns ``z* = (x*, tau*)``.

    ``g(tau) = sum relu(theta - tau) - 1`` is convex, decreasing and piecewise linear, so Newton
    started left of the root (``tau = max theta - 1``) increases monotonically and lands exactly on
    the root after at most ``n`` steps (one per change of support).
    """
    _check_logits(theta, "sparsemax_newton")
    max_iter = max_iter if max_iter is not None else theta.shape[-1] + 1
    tau = theta.max(dim=-1, keepdim=True).values - 1
    for _ in range(max_iter):
        support = (theta > tau).to(theta.dtype)
        g = (torch.relu(theta - tau)).sum(dim=-1, keepdim=True) - 1
        new_tau = tau + g / support.sum(dim=-1, keepdim=True)
        if bool((new_tau == tau).all()):
            break
        tau = new_tau
    return torch.cat([torch.relu(theta - tau), tau], dim=-1)


def sparsemax_ift(theta: torch.Tensor, linear_solver="direct", **solver_kwargs) -> torch.Tensor:
    """Sparsemax of ``theta`` (..., n) by Newton on the threshold, differentiable through the IFT."""
    z_star = sparsemax_newton(theta.detach())
    z = implicit_root(
        sparsemax_kkt_residual, z_star, theta, batch_dims=theta.dim() - 1, linear_solver=linear_solver, **solver_kwargs
    )
    return z[..., :-1]


# --- ridge regression hyperparameter gradient (bilevel optimisation) ---


def ridge_objective(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Inner training objective ``||X w - y||^2 / 2 + lam ||w||^2 / 2``."""
    return 0.5 * (X @ w - y).pow(2).sum() + 0.5 * lam * w.pow(2).sum()


def ridge_gradient_descent(X: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` steps of gradient descent on :func:`ridge_objective` from ``w = 0``.

    The step ``1 / (lambda_max(X^T X) + lam)`` is a constant (not differentiated). Run it under
    ``torch.no_grad()`` for the implicit route, or with grad enabled to differentiate it unrolled.
    """
    if iters < 0:
        raise ValueError(f"ridge_gradient_descent: iters must be >= 0, got {iters}")
    with torch.no_grad():
        gram = X.T @ X
        top, _ = power_iteration(lambda v: v @ gram, torch.ones(1, X.shape[1], dtype=X.dtype, device=X.device), iters=100)
        step = 1.0 / (top.squeeze() + lam.detach())
    Xty = X.T @ y
    w = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device)
    for _ in range(iters):
        w = w - step * (X.T @ (X @ w) - Xty + lam * w)
    return w


def ridge_validation_loss(w: torch.Tensor, X_val: torch.Tensor, y_val: torch.Tensor) -> torch.Tensor:
    return 0.5 * (X_val @ w - y_val).pow(2).sum()


def ridge_hypergradient(
    X: torch.Tensor,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
    lam: torch.Tensor,
    iters: int,
    method: str = "implicit",
    **solver_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation loss at the GD solution and its derivative w.r.t. ``lam``.

    ``method="implicit"``: GD without a graph, then the IFT (CG on the Hessian ``X^T X + lam I``).
    ``method="unrolled"``: backpropagation through all ``iters`` GD steps.
    """
    if method not in ("implicit", "unrolled"):
        raise ValueError(f"ridge_hypergradient: method must be 'implicit' or 'unrolled', got {method!r}")
    lam = lam.detach().requires_grad_(True)
    if method == "implicit":
        with torch.no_grad():
            w_star = ridge_gradient_descent(X, y, lam, iters)
        w = implicit_argmin(ridge_objective, w_star, X, y, lam, **solver_kwargs)
    else:
        with torch.enable_grad():
            w = ridge_gradient_descent(X, y, lam, iters)
    with torch.enable_grad():
        loss = ridge_validation_loss(w, X_val, y_val)
        (grad,) = torch.autograd.grad(loss, lam)
    return loss.detach(), grad


def ridge_hypergradient_closed_form(
    X: torch.Tensor, y: torch.Tensor, X_val: torch.Tensor, y_val: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(loss, dloss/dlam)``: ``w* = (A + lam I)^{-1} X^T y`` and ``dw*/dlam = -(A + lam I)^{-1} w*``."""
    A = X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype, device=X.device)
    w = torch.linalg.solve(A, X.T @ y)
    residual = X_val @ w - y_val
    dw = -torch.linalg.solve(A, w)
    return 0.5 * residual.pow(2).sum(), (X_val.T @ residual) @ dw


# --- a nonlinear batched root: x^3 + a x = b per element ---


def cubic_residual(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x**3 + a * x - b


@torch.no_grad()
def cubic_newton(a: torch.Tensor, b: torch.Tensor, tol: float | None = None, max_iter: int = 100) -> torch.Tensor:
    """Elementwise Newton for ``x^3 + a x = b`` with ``a > 0`` (one real root, ``F' > 0``)."""
    if bool((a <= 0).any()):
        raise ValueError("cubic_newton: a must be > 0 so that x^3 + a x = b has exactly one real root")
    tol = tol if tol is not None else 10 * torch.finfo(b.dtype).eps
    x = torch.zeros(torch.broadcast_shapes(a.shape, b.shape), dtype=b.dtype, device=b.device)
    for _ in range(max_iter):
        step = cubic_residual(x, a, b) / (3 * x**2 + a)
        x = x - step
        if bool((step.abs() <= tol * (1 + x.abs())).all()):
            break
    return x


def cubic_root(a: torch.Tensor, b: torch.Tensor, linear_solver="cg", **solver_kwargs) -> torch.Tensor:
    """Real root of ``x^3 + a x = b`` per element; every element is its own problem in the backward."""
    x_star = cubic_newton(a.detach(), b.detach())
    return implicit_root(cubic_residual, x_star, a, b, batch_dims=x_star.dim(), linear_solver=linear_solver, **solver_kwargs)
