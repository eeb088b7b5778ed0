"""The OptNet layer and simplex output heads written as optimisation problems."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ift.implicit.diagnostics import SolveRecorder
from ift.optnet.qp import PRECISIONS, solve_qp_with_info


class OptNetLayer(nn.Module):
    """z*(q) = argmin 1/2 z^T Q z + q^T z  s.t.  G z <= h, A z = b, with learnable Q, G, h, A, b.

    As in the OptNet paper: Q = L L^T + eps I (positive definite), h = G z0 + s0 with s0 >= 0 and
    b = A z0, so z0 is feasible for every parameter value. With `two_sided=True` every row also
    gets a lower bound l = G z0 - s1 (s1 >= 0): l <= G z <= h, solved natively (`solve_qp(lower=)`).
    With `warm_start=True` each call starts from the previous call's active set when the batch
    size matches (meant for calls on the same examples, e.g. full-batch training; a stale set
    is verified and discarded, costing one active-set solve). The input is the linear term q
    (batch, n). Each call records its `QPSolution` (status, iterations) in `solves` as kind "qp".
    `precision` is the solver's dtype policy (`solve_qp`: "mixed", "float64" or "input").
    """

    def __init__(self, n: int, n_ineq: int, n_eq: int = 0, eps: float = 1e-4, max_iter: int = 50,
                 precision: str = "mixed", two_sided: bool = False, warm_start: bool = False):
        super().__init__()
        for name, value, low in (("n", n, 1), ("n_ineq", n_ineq, 1), ("n_eq", n_eq, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"OptNetLayer: {name} must be an int >= {low}, got {value!r}")
        if n_eq >= n:
            raise ValueError(f"OptNetLayer: n_eq={n_eq} must be < n={n} to leave a feasible set with freedom")
        if not eps > 0:
            raise ValueError(f"OptNetLayer: eps must be > 0, got {eps}")
        if precision not in PRECISIONS:
            raise ValueError(f"OptNetLayer: precision must be one of {PRECISIONS}, got {precision!r}")
        self.n, self.eps = n, eps
        self.L = nn.Parameter(torch.eye(n))
        self.G = nn.Parameter(torch.randn(n_ineq, n) / n**0.5)
        self.z0 = nn.Parameter(torch.zeros(n))
        self.s0_raw = nn.Parameter(torch.zeros(n_ineq))  # s0 = softplus(s0_raw) > 0
        self.s1_raw = nn.Parameter(torch.zeros(n_ineq)) if two_sided else None  # lower bound's margin
        self.A = nn.Parameter(torch.randn(n_eq, n) / n**0.5) if n_eq else None
        self.solves = SolveRecorder()
        self.solve_kwargs: dict = {"max_iter": max_iter, "precision": precision}
        self.warm_start, self._last = warm_start, None

    def qp_parameters(self) -> tuple[torch.Tensor, ...]:
        L = torch.tril(self.L)
        Q = L @ L.T + self.eps * torch.eye(self.n, dtype=L.dtype, device=L.device)
        h = self.G @ self.z0 + F.softplus(self.s0_raw)
        if self.A is None:
            return Q, self.G, h, None, None
        return Q, self.G, h, self.A, self.A @ self.z0

    def lower_bounds(self) -> torch.Tensor | None:
        """l = G z0 - softplus(s1_raw) with `two_sided`, else None."""
        return None if self.s1_raw is None else self.G @ self.z0 - F.softplus(self.s1_raw)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if q.dim() != 2 or q.shape[1] != self.n:
            raise ValueError(f"OptNetLayer: input q must have shape (batch, {self.n}), got {tuple(q.shape)}")
        Q, G, h, A, b = self.qp_parameters()
        warm = self._last if self.warm_start and self._last is not None and self._last.lam.shape[0] == q.shape[0] else None
        sol = solve_qp_with_info(Q, q, G, h, A, b, strict=True, lower=self.lower_bounds(), warm_start=warm,
                                 **self.solve_kwargs)
        self._last = sol
        self.solves.record(sol, "qp")
        return sol.z


def sparsemax_qp(theta: torch.Tensor, tol: float | None = None) -> torch.Tensor:
    """sparsemax(theta) = argmin_x 1/2 |x - theta|^2 over the simplex, solved as a QP (batch, k)."""
    if theta.dim() != 2:
        raise ValueError(f"sparsemax_qp: theta must have shape (batch, k), got {tuple(theta.shape)}")
    k = theta.shape[1]
    eye = torch.eye(k, dtype=theta.dtype, device=theta.device)
    ones = torch.ones(1, k, dtype=theta.dtype, device=theta.device)
    zeros = torch.zeros(k, dtype=theta.dtype, device=theta.device)
    sol = solve_qp_with_info(eye, -theta, -eye, zeros, ones, ones[0, :1], tol=tol, strict=True)
    return sol.z


def sparsemax_closed_form(theta: torch.Tensor) -> torch.Tensor:
    """Martins & Astudillo (2016): x = relu(theta - tau) with tau from the sorted cumulative sum."""
    sorted_theta, _ = torch.sort(theta, dim=-1, descending=True)
    k = torch.arange(1, theta.shape[-1] + 1, dtype=theta.dtype, device=theta.device)
    cumsum = sorted_theta.cumsum(-1)
    support = (1 + k * sorted_theta > cumsum).sum(-1, keepdim=True)
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(theta.dtype)
    return torch.clamp(theta - tau, min=0)


class SparsemaxHead(nn.Module):
    """Log-probabilities are not defined on the sparse support, so this head returns probabilities."""

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return sparsemax_qp(theta)


class SoftmaxHead(nn.Module):
    """Softmax as the entropy-regularised argmax, solved iteratively and differentiated with the
    implicit core on its KKT residual (`ift.implicit.examples.softmax_ift`)."""

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        from ift.implicit.examples import softmax_ift

        return softmax_ift(theta)
