"""Projected gradient descent in the L-infinity ball (Madry et al. 2018), in plain torch."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    clamp: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial examples maximising the cross-entropy within ``||x_adv - x||_inf <= eps``.

    Each step moves by ``step_size * sign(grad)``, then projects onto the eps-ball and the valid
    pixel range ``clamp``. The model's train/eval mode is left as the caller set it, and its
    parameter gradients are not touched. Returns a detached tensor.
    """
    if eps < 0 or step_size < 0 or steps < 0:
        raise ValueError(f"pgd_attack: eps, step_size and steps must be >= 0, got {eps}, {step_size}, {steps}")
    lo, hi = clamp
    x = x.detach()
    x_adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        x_adv = (x + eps * noise).clamp(lo, hi)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(lo, hi)
    return x_adv.detach()


def fgsm_rs_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    clamp: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FGSM from a uniform random start (Wong, Rice & Kolter 2020, "Fast is better than free"):
    ``delta ~ U[-eps, eps]``, one step of ``step_size * sign(grad)`` (they use 1.25 eps), projected
    back onto the eps-ball and the pixel range. The training attack of the from-scratch robust model."""
    if eps < 0 or step_size < 0:
        raise ValueError(f"fgsm_rs_attack: eps and step_size must be >= 0, got {eps}, {step_size}")
    return pgd_attack(model, x, y, eps, step_size, steps=1, random_start=True, clamp=clamp, generator=generator)
