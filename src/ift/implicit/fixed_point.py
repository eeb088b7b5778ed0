"""A batched fixed-point iteration (the forward side of ``implicit_fixed_point``).

``fixed_point(T, x0)`` iterates ``x <- (1 - damping) x + damping T(x)`` on ``B`` independent rows
(``T`` maps ``(B, n) -> (B, n)`` row by row), each row stopping once its relative residual
``||T(x) - x|| / (1 + ||x||)`` is at most ``tol``. It runs without a graph; pair the result with
``implicit_fixed_point`` for gradients. A row that has not converged is reported, never hidden:
the IFT's gradient is only as good as the fixed point it is taken at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ift.implicit.linear_solvers import default_check_every


@dataclass
class FixedPointResult:
    """Outcome per row: x (B, n), iterations (B,), residual (B,) relative, converged (B,) bool."""

    x: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    tol: float


def _check(name: str, ok: bool, got: object, want: str) -> None:
    if not ok:
        raise ValueError(f"fixed_point: {name} must be {want}, got {got!r}")


@torch.no_grad()
def fixed_point(
    T: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    *params: object,
    tol: float = 1e-6,
    max_iter: int = 100,
    damping: float = 1.0,
    check_every: int | None = None,
) -> FixedPointResult:
    """Batched damped fixed-point iteration with per-row stopping; see the module docstring.

    ``check_every`` sets how often the host asks whether every row has stopped (default 1 on CPU,
    8 on accelerators, where each check is a device synchronisation); rows still stop
    individually at every iteration.
    """
    _check("x0", isinstance(x0, torch.Tensor) and x0.dim() == 2 and x0.is_floating_point(), x0 if not
           isinstance(x0, torch.Tensor) else tuple(x0.shape), "a floating tensor of shape (batch, n)")
    _check("tol", isinstance(tol, (int, float)) and tol > 0, tol, "a positive float")
    _check("max_iter", isinstance(max_iter, int) and max_iter >= 1, max_iter, "an int >= 1")
    _check("damping", isinstance(damping, (int, float)) and 0 < damping <= 1, damping, "in (0, 1]")
    if check_every is None:
        check_every = default_check_every(x0.device)
    _check("check_every", isinstance(check_every, int) and check_every >= 1, check_every, "an int >= 1")

    def relative_residual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tx = T(x, *params)
        if not isinstance(tx, torch.Tensor) or tx.shape != x.shape:
            shape = tuple(tx.shape) if isinstance(tx, torch.Tensor) else type(tx).__name__
            raise ValueError(f"fixed_point: T(x, *params) must return a tensor shaped like x {tuple(x.shape)}, got {shape}")
        return tx, (tx - x).norm(dim=-1) / (1 + x.norm(dim=-1))

    x = x0.clone()
    iterations = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    tx, residual = relative_residual(x)
    for it in range(max_iter):
        active = residual > tol  # False for NaN rows: they stop and are reported as not converged
        x = torch.where(active.unsqueeze(-1), (1 - damping) * x + damping * tx, x)
        iterations += active.long()
        tx, new_residual = relative_residual(x)
        residual = torch.where(active, new_residual, residual)
        if (it + 1) % check_every == 0 and not bool((residual > tol).any()):
            break
    converged = residual <= tol
    return FixedPointResult(x=x, iterations=iterations, residual=residual, converged=converged, tol=float(tol))

