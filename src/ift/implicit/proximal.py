"""The proximal term: what makes an inner optimum depend on where it started.

``proximal_penalty(x, anchor, eta)`` is ``||x - anchor||^2 / (2 eta)`` per row; added to an inner
objective it makes the minimiser a function of ``anchor`` (without it an exact optimum forgets its
starting point, so ``d x*/d anchor = 0``) and shifts the inner Hessian by ``I / eta``, which also conditions the IFT's linear solve.
``proximal_objective(f, anchor, eta)`` is the objective ``x -> f(x) + proximal_penalty(x, anchor, eta)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def proximal_penalty(x: torch.Tensor, anchor: torch.Tensor, eta: float | None) -> torch.Tensor:
    """``||x - anchor||^2 / (2 eta)`` summed over the last dim; zeros when ``eta`` is None or inf."""
    if eta is None or (isinstance(eta, float) and math.isinf(eta)):
        return x.new_zeros(x.shape[:-1])
    if not eta > 0:
        raise ValueError(f"proximal_penalty: eta must be > 0 (or None / inf for no term), got {eta!r}")
    return (x - anchor).pow(2).sum(-1) / (2 * eta)


def proximal_objective(f: Callable[[torch.Tensor], torch.Tensor], anchor: torch.Tensor,
                       eta: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> f(x) + ||x - anchor||^2 / (2 eta)`` per row (``f`` itself when ``eta`` is None or inf)."""
    if eta is None or not math.isfinite(eta):
        return f
    return lambda x: f(x) + proximal_penalty(x, anchor, eta)
