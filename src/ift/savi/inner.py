"""The inner problem of semi-amortized inference: refine lambda_0 per example by gradient ascent
with per-example backtracking (a step that lowers the objective is rejected and the step size halved).

The objective is a per-example function `objective(lam) -> (B,)` (the ELBO with fixed noise, plus
an optional proximal term). Examples are independent: each keeps its own optimiser state, its own
stopping test and its own divergence flag.

`create_graph=True` keeps the whole trajectory in the autograd graph (unrolled SAVI: memory grows
linearly with the number of steps); `False` runs without a graph (SVI, and the forward solve of
implicit SAVI, whose gradient comes from the IFT instead).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class InnerConfig:
    """Settings of the inner optimiser (`model.inner.*`). Defaults follow SA-VAE (Kim et al. 2018)."""

    optimizer: str = "sgd"
    steps: int = 20
    lr: float = 1.0
    momentum: float = 0.5      # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam
    clip: float | None = 5.0   # per-example gradient-norm clipping (None: off)
    eta: float | None = 1.0    # proximal step: - ||lam - lam_0||^2 / (2 eta); None or inf: no term
    tol: float = 0.0           # stop an example once its gradient norm is <= tol
    max_abs: float = 20.0      # |lambda| beyond this counts as divergence (exp(2 log_sigma) overflows)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"model.inner.optimizer={self.optimizer!r} is unknown; use one of {OPTIMIZERS}")
        if self.steps < 0:
            raise ValueError(f"model.inner.steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"model.inner.lr must be > 0, got {self.lr}")
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"model.inner.eta must be > 0 (or null for no proximal term), got {self.eta}")
        if self.tol < 0:
            raise ValueError(f"model.inner.tol must be >= 0, got {self.tol}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"model.inner.clip must be > 0 or null, got {self.clip}")

    @property
    def proximal(self) -> bool:
        return self.eta is not None and math.isfinite(self.eta)


@dataclass
class InnerResult:
    lam: torch.Tensor           # (B, 2d) refined parameters (lambda_0 where the example diverged)
    steps_taken: torch.Tensor   # (B,) updates applied per example
    grad_norm: torch.Tensor     # (B,) final gradient norm of the objective
    diverged: torch.Tensor      # (B,) bool: fell back to lambda_0


class InnerDivergenceWarning(RuntimeWarning):
    """Some examples' inner optimisation produced NaN/Inf or left the bounded region."""


def proximal_objective(elbo: Callable[[torch.Tensor], torch.Tensor], lam0: torch.Tensor,
                       eta: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """J(lam) = ELBO(lam) - ||lam - lam_0||^2 / (2 eta), per example (no term when eta is None/inf)."""
    if eta is None or not math.isfinite(eta):
        return elbo
    return lambda lam: elbo(lam) - (lam - lam0).pow(2).sum(-1) / (2 * eta)


def refine(objective: Callable[[torch.Tensor], torch.Tensor], lam0: torch.Tensor, cfg: InnerConfig,
           create_graph: bool) -> InnerResult:
    """Maximise `objective` (per example, shape (B,)) from `lam0` with cfg.optimizer for cfg.steps."""
    lam = lam0 if create_graph else lam0.detach()
    batch = lam.shape[0]
    active = torch.ones(batch, dtype=torch.bool, device=lam.device)
    diverged = torch.zeros_like(active)
    steps_taken = torch.zeros(batch, dtype=torch.long, device=lam.device)
    state1 = torch.zeros_like(lam)  # momentum / Adam first moment
    state2 = torch.zeros_like(lam)  # Adam second moment
    grad_norm = torch.full((batch,), float("nan"), device=lam.device, dtype=lam.dtype)
    step_size = torch.full((batch,), cfg.lr, device=lam.device, dtype=lam.dtype)
    prev = None  # (lam, value, grad) of the last accepted point

    # Masks are rebuilt, never updated in place: torch.where saves them for the unrolled backward.
    for step in range(cfg.steps + 1):
        with torch.enable_grad():
            lam_in = lam if create_graph else lam.detach().requires_grad_(True)
            value = objective(lam_in)
            (grad,) = torch.autograd.grad(value.sum(), lam_in, create_graph=create_graph)
        if not create_graph:
            grad = grad.detach()
        grad_norm = grad.detach().norm(dim=-1)
        bad = ~torch.isfinite(value.detach()) | ~torch.isfinite(grad_norm)
        diverged = diverged | (bad & active)
        active = active & ~bad
        if prev is not None:
            # Backtracking: an example whose objective went down rejects its step, halves its step
            # size and restarts its momentum. Ascent is monotone, so the loop still converges when
            # the curvature (which grows as the decoder sharpens, ~1/gamma) outgrows the initial lr.
            # (decreases within float rounding of the objective are not a failed step)
            slack = 8 * torch.finfo(value.dtype).eps * (1 + prev[1].detach().abs())
            worse = active & (value.detach() < prev[1].detach() - slack)
            if bool(worse.any()):
                w = worse.unsqueeze(-1)
                lam = torch.where(w, prev[0], lam)
                value = torch.where(worse, prev[1], value)
                grad = torch.where(w, prev[2], grad)
                grad_norm = grad.detach().norm(dim=-1)
                state1 = torch.where(w, torch.zeros_like(state1), state1)
                step_size = torch.where(worse, step_size / 2, step_size)
        prev = (lam, value, grad)
        active = active & (grad_norm > cfg.tol)
        if step == cfg.steps or not bool(active.any()):
            break
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
        if cfg.clip is not None:
            scale = (cfg.clip / grad_norm.clamp_min(1e-12)).clamp(max=1.0).nan_to_num(0.0)
            grad = grad * scale.unsqueeze(-1)
        if cfg.optimizer == "sgd":
            state1 = cfg.momentum * state1 + grad
            update = step_size.unsqueeze(-1) * state1
        else:
            b1, b2 = cfg.betas
            t = step + 1
            state1 = b1 * state1 + (1 - b1) * grad
            state2 = b2 * state2 + (1 - b2) * grad * grad
            m_hat, v_hat = state1 / (1 - b1**t), state2 / (1 - b2**t)
            # sqrt(v + tiny): the plain sqrt has an infinite derivative at 0, which would put NaN
            # into the unrolled backward pass.
            update = step_size.unsqueeze(-1) * m_hat / ((v_hat + 1e-16).sqrt() + 1e-8)
        proposal = lam + update
        out_of_bounds = ~torch.isfinite(proposal).all(-1) | (proposal.detach().abs().amax(-1) > cfg.max_abs)
        diverged = diverged | (out_of_bounds & active)
        active = active & ~out_of_bounds
        lam = torch.where(active.unsqueeze(-1), proposal, lam)
        steps_taken += active.long()

    if bool(diverged.any()):
        warnings.warn(
            f"inner optimisation diverged on {int(diverged.sum())}/{batch} examples (NaN/Inf or "
            f"|lambda| > {cfg.max_abs}); they fall back to lambda_0. Lower model.inner.lr "
            f"(now {cfg.lr}) or enable model.inner.clip.",
            InnerDivergenceWarning,
            stacklevel=2,
        )
        lam = torch.where(diverged.unsqueeze(-1), lam0 if create_graph else lam0.detach(), lam)
    return InnerResult(lam=lam, steps_taken=steps_taken, grad_norm=grad_norm.detach(), diverged=diverged)
