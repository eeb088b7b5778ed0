"""Diagonal equilibration of a QP by powers of two, so that the solver is scale-invariant.

    z = D z~,  Q~ = D Q D,  q~ = D q,  G~ = E_G G D,  bounds~ = E_G bounds,  A~ = E_A A D,  b~ = E_A b

D makes Q~'s diagonal ~1 (Jacobi scaling), E_G and E_A make each row of G~ and A~ of unit inf-norm.
Both are functions of diag(Q) and of the row norms of G D, A D only, which column scaling
(z -> C z) and row scaling (G_i, h_i -> s_i G_i, s_i h_i) change by exactly the inverse factors:
the scaled problem is the same whatever the input's scaling, up to the rounding of each factor to
a power of two (a factor within sqrt(2) of the ideal one). Powers of two make every product
exact, so the scaled problem is exactly the input problem in any dtype, and undoing the scaling
(z = D z~, lam = E_G lam~, s = s~ / E_G) adds no rounding. The factors are constants for autograd:
the solution does not depend on them, so differentiating through the products is exact.
"""

from __future__ import annotations

import torch


def _power_of_two(norm: torch.Tensor, exponent: float) -> torch.Tensor:
    """2^round(exponent * log2(norm)) where norm > 0 and finite, else 1."""
    ok = (norm > 0) & torch.isfinite(norm)
    e = torch.round(exponent * torch.log2(torch.where(ok, norm, torch.ones_like(norm))))
    return torch.exp2(e)


def _row_scale(M: torch.Tensor) -> torch.Tensor:
    if M.shape[-2] == 0 or M.shape[-1] == 0:
        return M.new_ones(*M.shape[:-1])
    # max |M_ij| as max(max M, -min M): torch's inf-norm reduction took 12.4 ms for G of (128, 100,
    # 100) float64 on one CPU thread, this 0.4 ms (the same values)
    return _power_of_two(torch.maximum(M.amax(-1), -M.amin(-1)), -1.0)


class Scaling:
    """The factors D (columns), E_G, E_A (rows) of one (batched) problem; see the module docstring."""

    def __init__(self, Q: torch.Tensor, G: torch.Tensor, A: torch.Tensor):
        with torch.no_grad():
            # diag of Q's symmetric part is Q's diagonal; a nonpositive one gets 1 (Q is then
            # rejected by the solver's Cholesky check)
            self.d = _power_of_two(Q.detach().diagonal(dim1=-2, dim2=-1), -0.5)
            # D = I is common (diag(Q) within [0.7, 1.4]): then Q and the columns need no pass
            self.unit = bool((self.d == 1).all())
            cols = (lambda M: M) if self.unit else (lambda M: M * self.d.unsqueeze(-2))  # noqa: E731
            self.eG = _row_scale(cols(G.detach()))
            self.eA = _row_scale(cols(A.detach()))

    def problem(self, Q, q, G, h, A, b):
        """The scaled problem's data (differentiable in the inputs)."""
        d, eG, eA = self.d, self.eG, self.eA
        if not self.unit:
            dd = d.unsqueeze(-1) * d.unsqueeze(-2)  # d_i d_j = d_j d_i: a symmetric Q stays symmetric
            Q, q, G, A = Q * dd, q * d, G * d.unsqueeze(-2), A * d.unsqueeze(-2)
        return Q, q, G * eG.unsqueeze(-1), h * eG, A * eA.unsqueeze(-1), b * eA

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        """Bounds-like vectors of G's rows into the scaled problem."""
        return v * self.eG

    def primal(self, z_scaled: torch.Tensor) -> torch.Tensor:
        return z_scaled if self.unit else z_scaled * self.d

    def duals(self, lam, nu, slack):
        """lam, nu, slack of the input problem from the scaled problem's."""
        return lam * self.eG, nu * self.eA, slack / self.eG
