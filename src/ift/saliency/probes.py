"""Gradient-norm and Hessian-norm probes of a classifier's score w.r.t. its input, and the
Proposition A.1 bound on the gradient's Lipschitz constant for bias-free Softplus MLPs.

Appendix A.2-A.3 of Yeh et al.: a smaller input Hessian bounds both the infidelity and the
sensitivity of the gradient explanation, and adversarial training lowers it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ift.implicit.operators import hvp, power_iteration


def input_gradient_norm(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``||grad_x s(x_b)||_2`` per example, for ``score_fn(x) -> (B,)``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(score_fn(x).sum(), x)
    return g.flatten(1).norm(dim=1)


def input_hessian_norm(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int = 50,
                       tol: float = 1e-5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Spectral norm of the input Hessian ``d^2 s(x_b) / dx^2`` per example, by power iteration on
    Hessian-vector products. Examples are independent, so the Hessian of ``sum_b s(x_b)`` is block
    diagonal and one batched HVP gives every example's product.

    The iteration runs on ``H^2`` (two HVPs per step) and returns ``sqrt(lambda_max(H^2))``: on an
    indefinite Hessian with eigenvalues ``+l`` and ``-l`` the Rayleigh quotient of ``H`` itself
    hovers near 0, while ``H^2`` is positive semi-definite.

    Note: for piecewise-linear nets (ReLU, max-pool) the Hessian of a logit is zero almost
    everywhere; probe a smooth score such as the log-probability instead.
    """
    x = x.detach()

    def h(v: torch.Tensor) -> torch.Tensor:
        # detach: otherwise each iterate keeps the graph of all previous HVPs alive
        # the zero quadratic keeps a graph from the gradient to x when the score is linear (Hessian 0)
        return hvp(lambda z: score_fn(z).sum() + 0 * (z * z).sum(), x, v.detach()).detach()

    v0 = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    eig, _ = power_iteration(lambda v: h(h(v)), v0, iters=iters, tol=tol)
    return eig.clamp_min(0).sqrt()


def softplus_gradient_lipschitz(weights: Sequence[torch.Tensor], norm: str = "spectral") -> float:
    """Upper bound ``L`` on the L2 Lipschitz constant of ``x -> grad f(x)`` for the bias-free MLP
    ``f(x) = W_l s(W_{l-1} ... s(W_1 x))`` with Softplus ``s`` (Proposition A.1), so that
    ``||grad f(x + d) - grad f(x)||_2 <= L ||d||_2``.

    With ``s' <= 1`` and ``|s''| <= 1/4``, the Jacobian ``J_i`` of layer i's output obeys
    ``Lip(J_i) <= ||W_i||^2 Lip(h_{i-1})^2 / 4 + ||W_i|| Lip(J_{i-1})`` and ``Lip(h_i) <= ||W_i|| Lip(h_{i-1})``;
    then ``L = ||W_l|| Lip(J_{l-1})``. For one hidden layer this is ``||W_2|| ||W_1||^2 / 4``.
    ``norm="fro"`` uses Frobenius norms (looser, the form the paper states).
    """
    if norm not in ("spectral", "fro"):
        raise ValueError(f"norm must be 'spectral' or 'fro', got {norm!r}")
    if len(weights) < 2:
        raise ValueError("need at least one hidden layer (two weight matrices)")
    ord_ = 2 if norm == "spectral" else "fro"
    norms = [float(torch.linalg.matrix_norm(w.detach().double(), ord=ord_)) for w in weights]
    lip_h, lip_j = 1.0, 0.0
    for n in norms[:-1]:
        lip_j = n * n * lip_h * lip_h / 4 + n * lip_j
        lip_h = n * lip_h
    return norms[-1] * lip_j
