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
from typing import ClassVar

import torch

from ift import hparams
from ift.implicit.config import MinimizeConfig, NonStationary
from ift.implicit.minimize import MinimizeResult, minimize
from ift.implicit.proximal import proximal_objective
from ift.implicit.reversible import reversible_sgd

CURVATURES = ("exact", "gauss_newton", "autodiff")


@dataclass(frozen=True)
class InnerConfig(MinimizeConfig):
    """Settings of the inner optimiser (`model.inner.*`): the core's `MinimizeConfig` with SAVI's defaults
    and fields.

    method: newton | sgd | adam. max_iter: iteration budget. tol: relative stationarity
    ||grad J|| / (1 + |J|) at which an example stops (0: always run `max_iter`). nonstationary
    (savi_ift): drop (examples above tol train at lambda_0, see `ift.savi.module`) | ift | error.
    curvature (newton): exact (latent-space Hessian), gauss_newton (cheaper, PSD, linear convergence),
    autodiff (2d generic Hessian-vector products, the slow reference). damping: initial
    Levenberg-Marquardt damping. lr / momentum / betas / clip: first-order settings (Kim et al. 2018:
    SGD lr 1, momentum 0.5, clip 5). checkpoint_segments: unrolled modes only, null for plain
    unrolling. checkpoint_reentrant: false for PyTorch's non-reentrant checkpointing
    (torch.autograd.grad works; quadratic recompute and far more memory, see `ift.implicit.minimize`).
    frac_bits: savi_reversible only, fractional bits of its fixed-point lambda and velocity.
    """

    method: str = "newton"
    max_iter: int = 20
    tol: float = 1e-5
    damping: float = 1e-3
    lr: float = 1.0
    momentum: float = 0.5      # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam
    clip: float | None = 5.0   # per-example gradient-norm clipping (None: off)
    max_abs: float = 20.0      # |lambda| beyond this counts as divergence (exp(2 log_sigma) overflows)
    nonstationary: NonStationary = NonStationary.DROP
    curvature: str = "exact"
    eta: float | None = 1.0    # proximal step: - ||lam - lam_0||^2 / (2 eta); None or inf: no term
    checkpoint_segments: int | None = None
    checkpoint_reentrant: bool = True
    frac_bits: int = 40

    group: ClassVar[str] = "model.inner"
    renamed: ClassVar[dict[str, str]] = {**MinimizeConfig.renamed, "optimizer": "method", "steps": "max_iter"}
    renamed_values: ClassVar[dict[str, dict[str, str]]] = {"nonstationary": {"amortized": "drop"}}

    def __post_init__(self) -> None:
        super().__post_init__()
        hparams.one_of("inner.curvature", self.curvature, CURVATURES)
        hparams.positive("inner.eta", self.eta, allow_none=True)
        if self.checkpoint_segments is not None:
            hparams.integer("inner.checkpoint_segments", self.checkpoint_segments, 1)
        hparams.in_range("inner.frac_bits", self.frac_bits, 8, 52, closed_high=True)

    @property
    def proximal(self) -> bool:
        return self.eta is not None and math.isfinite(self.eta)


def _neg_elbo(elbo):
    """``lam -> -ELBO(lam)``: the inner problem is minimised (J = ELBO - proximal term is maximised)."""
    return lambda lam: -elbo(lam)


def refine(vae, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor, params: dict[str, torch.Tensor],
           cfg: InnerConfig, create_graph: bool) -> MinimizeResult:
    """Maximise J per example from lam0 (the result's `value` is -J, the minimised objective)."""
    prox = 1.0 / cfg.eta if cfg.proximal else 0.0

    # Per-example data goes through `args` (batch first), so the optimiser can continue on the
    # examples that have not converged yet without evaluating the finished ones.
    def neg_objective(lam: torch.Tensor, center: torch.Tensor, x_: torch.Tensor, eps_: torch.Tensor) -> torch.Tensor:
        elbo = lambda l: vae.elbo(x_, l, eps_.transpose(0, 1), params)  # noqa: E731
        return proximal_objective(_neg_elbo(elbo), center, cfg.eta)(lam)

    curvature = None
    if cfg.method == "newton" and cfg.curvature != "autodiff":
        eye = torch.eye(lam0.shape[-1], dtype=lam0.dtype, device=lam0.device)

        def curvature(lam, center, x_, eps_):
            hess = vae.neg_elbo_hessian(x_, lam, eps_.transpose(0, 1), params, exact=cfg.curvature == "exact",
                                        create_graph=torch.is_grad_enabled() and create_graph)
            return hess + prox * eye

    return minimize(
        neg_objective, lam0, **cfg.minimize_kwargs(), curvature=curvature, create_graph=create_graph,
        checkpoint_segments=cfg.checkpoint_segments if create_graph else None,
        checkpoint_reentrant=cfg.checkpoint_reentrant,
        args=(lam0, x, eps.transpose(0, 1)), compact=True,
    )


def refine_reversible(vae, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor,
                      params: dict[str, torch.Tensor], cfg: InnerConfig) -> MinimizeResult:
    """`refine`'s SGD loop (cfg.max_iter steps, no tolerance) by `reversible_sgd`: differentiable w.r.t.
    lam0 (start and proximal centre) and the generative params, passed explicitly for its backward."""
    names = list(params)

    def neg_objective(lam, center, x_, eps_, *theta):
        elbo = lambda l: vae.elbo(x_, l, eps_, dict(zip(names, theta)))  # noqa: E731
        return proximal_objective(_neg_elbo(elbo), center, cfg.eta)(lam)

    return reversible_sgd(neg_objective, lam0, lam0, x, eps, *params.values(), steps=cfg.max_iter, lr=cfg.lr,
                          momentum=cfg.momentum, clip=cfg.clip, max_abs=cfg.max_abs, frac_bits=cfg.frac_bits)
