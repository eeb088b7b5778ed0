"""The inner problem of semi-amortized inference: refine lambda_0 per example.

The objective is J(lambda) = ELBO(lambda; x, eps) - ||lambda - lambda_0||^2 / (2 eta) with fixed
noise `eps` (a smooth, deterministic function), maximised per example by the core's batched
optimiser `ift.implicit.minimize` (on -J): damped Newton with the exact per-example Hessian built
in latent space (`GaussianVAE.neg_elbo_hessian`), or SGD / Adam with backtracking. Each example
stops at its own relative stationarity tolerance and reports whether it got there.

`create_graph=True` keeps the whole trajectory in the autograd graph (unrolled SAVI; with
`checkpoint_segments` it is recomputed segment by segment in backward); `False` runs without a
graph (SVI, and the forward solve of implicit SAVI, whose gradient comes from the IFT instead).
`refine_reversible` runs the same SGD loop with the core's `reversible_sgd` (reversible SAVI): the
backward reverses the trajectory exactly instead of storing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ift.implicit.fixed_point import proximal_penalty
from ift.implicit.minimize import METHODS, MinimizeResult, minimize
from ift.implicit.reversible import reversible_sgd

CURVATURES = ("exact", "gauss_newton", "autodiff")


@dataclass(frozen=True)
class InnerConfig:
    """Settings of the inner optimiser (`model.inner.*`).

    optimizer: newton | sgd | adam. steps: iteration budget. tol: relative stationarity
    ||grad J|| / (1 + |J|) at which an example stops (0: always run `steps`). curvature (newton):
    exact (latent-space Hessian), gauss_newton (cheaper, PSD, linear convergence), autodiff (2d
    generic Hessian-vector products, the slow reference). damping: initial Levenberg-Marquardt
    damping. lr / momentum / betas / clip: first-order settings (Kim et al. 2018: SGD lr 1,
    momentum 0.5, clip 5). checkpoint_segments: unrolled modes only, null for plain unrolling. checkpoint_reentrant:
    false for PyTorch's non-reentrant checkpointing (torch.autograd.grad works; quadratic recompute and
    far more memory, see `ift.implicit.minimize`).
    frac_bits: savi_reversible only, fractional bits of its fixed-point lambda and velocity.
    """

    optimizer: str = "newton"
    steps: int = 20
    tol: float = 1e-5
    curvature: str = "exact"
    damping: float = 1e-3
    lr: float = 1.0
    momentum: float = 0.5      # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam
    clip: float | None = 5.0   # per-example gradient-norm clipping (None: off)
    eta: float | None = 1.0    # proximal step: - ||lam - lam_0||^2 / (2 eta); None or inf: no term
    max_abs: float = 20.0      # |lambda| beyond this counts as divergence (exp(2 log_sigma) overflows)
    checkpoint_segments: int | None = None
    checkpoint_reentrant: bool = True
    frac_bits: int = 40

    def __post_init__(self) -> None:
        if self.optimizer not in METHODS:
            raise ValueError(f"model.inner.optimizer={self.optimizer!r} is unknown; use one of {METHODS}")
        if self.curvature not in CURVATURES:
            raise ValueError(f"model.inner.curvature={self.curvature!r} is unknown; use one of {CURVATURES}")
        if self.steps < 0:
            raise ValueError(f"model.inner.steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"model.inner.lr must be > 0, got {self.lr}")
        if not self.damping > 0:
            raise ValueError(f"model.inner.damping must be > 0, got {self.damping}")
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"model.inner.eta must be > 0 (or null for no proximal term), got {self.eta}")
        if self.tol < 0:
            raise ValueError(f"model.inner.tol must be >= 0, got {self.tol}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"model.inner.clip must be > 0 or null, got {self.clip}")
        if self.checkpoint_segments is not None and self.checkpoint_segments < 1:
            raise ValueError(f"model.inner.checkpoint_segments must be >= 1 or null, got {self.checkpoint_segments}")
        if not 8 <= self.frac_bits <= 52:
            raise ValueError(f"model.inner.frac_bits must be in [8, 52], got {self.frac_bits}")

    @property
    def proximal(self) -> bool:
        return self.eta is not None and math.isfinite(self.eta)


def proximal_objective(elbo: Callable[[torch.Tensor], torch.Tensor], lam0: torch.Tensor,
                       eta: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """J(lam) = ELBO(lam) - ||lam - lam_0||^2 / (2 eta), per example (no term when eta is None/inf)."""
    if eta is None or not math.isfinite(eta):
        return elbo
    return lambda lam: elbo(lam) - proximal_penalty(lam, lam0, eta)


def refine(vae, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor, params: dict[str, torch.Tensor],
           cfg: InnerConfig, create_graph: bool) -> MinimizeResult:
    """Maximise J per example from lam0 (the result's `value` is -J, the minimised objective)."""
    prox = 1.0 / cfg.eta if cfg.proximal else 0.0

    # Per-example data goes through `args` (batch first), so the optimiser can continue on the
    # examples that have not converged yet without evaluating the finished ones.
    def neg_objective(lam: torch.Tensor, center: torch.Tensor, x_: torch.Tensor, eps_: torch.Tensor) -> torch.Tensor:
        elbo = lambda l: vae.elbo(x_, l, eps_.transpose(0, 1), params)  # noqa: E731
        return -proximal_objective(elbo, center, cfg.eta)(lam)

    curvature = None
    if cfg.optimizer == "newton" and cfg.curvature != "autodiff":
        eye = torch.eye(lam0.shape[-1], dtype=lam0.dtype, device=lam0.device)

        def curvature(lam, center, x_, eps_):
            hess = vae.neg_elbo_hessian(x_, lam, eps_.transpose(0, 1), params, exact=cfg.curvature == "exact",
                                        create_graph=torch.is_grad_enabled() and create_graph)
            return hess + prox * eye

    return minimize(
        neg_objective, lam0, method=cfg.optimizer, max_iter=cfg.steps, rtol=cfg.tol, curvature=curvature,
        damping=cfg.damping, lr=cfg.lr, momentum=cfg.momentum, betas=cfg.betas, clip=cfg.clip,
        max_abs=cfg.max_abs, create_graph=create_graph,
        checkpoint_segments=cfg.checkpoint_segments if create_graph else None,
        checkpoint_reentrant=cfg.checkpoint_reentrant,
        args=(lam0, x, eps.transpose(0, 1)), compact=True,
    )


def refine_reversible(vae, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor,
                      params: dict[str, torch.Tensor], cfg: InnerConfig) -> MinimizeResult:
    """`refine`'s SGD loop (cfg.steps steps, no tolerance) by `reversible_sgd`: differentiable w.r.t.
    lam0 (start and proximal centre) and the generative params, passed explicitly for its backward."""
    names = list(params)

    def neg_objective(lam, center, x_, eps_, *theta):
        elbo = lambda l: vae.elbo(x_, l, eps_, dict(zip(names, theta)))  # noqa: E731
        return -proximal_objective(elbo, center, cfg.eta)(lam)

    return reversible_sgd(neg_objective, lam0, lam0, x, eps, *params.values(), steps=cfg.steps, lr=cfg.lr,
                          momentum=cfg.momentum, clip=cfg.clip, max_abs=cfg.max_abs, frac_bits=cfg.frac_bits)
