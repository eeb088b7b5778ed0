"""The reduced KKT system of a batched QP and its factorisation.

Eliminating the slacks and the inequality duals from the primal-dual Newton system leaves

    [ H  A^T ] [dz ]   [r1]
    [ A   0  ] [dnu] = [r2],      H = Q + G^T diag(w) G,  w = lam / s  (> 0).

H is positive definite (Q is), so it gets a Cholesky factor; the equality block is handled with
the Schur complement S = A H^{-1} A^T, also by Cholesky. One `KKTFactor` is built per interior
point iteration and solves both the predictor and the corrector system; the backward pass solves
the transposed KKT system of the solution, which reduces to the very same matrix.
"""

from __future__ import annotations

import torch


def _relative_jitter(M: torch.Tensor, factor: float) -> torch.Tensor:
    """A diagonal shift of `factor` times the mean diagonal magnitude, per batch element."""
    scale = M.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(torch.finfo(M.dtype).tiny)
    return factor * scale


def robust_cholesky(M: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Batched Cholesky of symmetric positive (semi)definite matrices.

    Matrices that are numerically semidefinite (Schur complements of redundant equality
    constraints, or H once the barrier weights span many orders of magnitude in float32) get a
    growing relative diagonal jitter instead of a NaN factor.
    """
    L, info = torch.linalg.cholesky_ex(M)
    if not bool((info > 0).any()):
        return L
    factor = 10 * torch.finfo(M.dtype).eps
    for _ in range(max_tries):
        bad = info > 0
        if not bool(bad.any()):
            return L
        Mb = M[bad]
        # Scale each diagonal entry by (1 + factor): a relative perturbation in every direction,
        # harmless even when the diagonal spans many orders of magnitude.
        d = Mb.diagonal(dim1=-2, dim2=-1).abs().clamp_min(torch.finfo(M.dtype).tiny)
        Lb, info_b = torch.linalg.cholesky_ex(Mb + torch.diag_embed(factor * d))
        L[bad] = Lb
        info[bad] = info_b
        factor *= 100
    raise FloatingPointError(
        "Cholesky of the QP's KKT matrix failed even with diagonal jitter; the problem is "
        "numerically singular (check Q's conditioning and the scale of G, A)."
    )


class KKTFactor:
    """Cholesky factors of H = Q + G^T diag(w) G and of S = A H^{-1} A^T (+ tiny jitter)."""

    def __init__(self, L: torch.Tensor, A: torch.Tensor, LS: torch.Tensor | None):
        self.L, self.A, self.LS = L, A, LS

    @classmethod
    def build(cls, Q: torch.Tensor, G: torch.Tensor, A: torch.Tensor, w: torch.Tensor) -> "KKTFactor":
        H = Q + G.transpose(-1, -2) @ (w.unsqueeze(-1) * G)
        L = robust_cholesky(H)
        if A.shape[-2] == 0:
            return cls(L, A, None)
        # S = A H^{-1} A^T = W^T W with W = L^{-1} A^T: a Gram matrix, so PSD even in rounding.
        W = torch.linalg.solve_triangular(L, A.transpose(-1, -2), upper=False)
        S = W.transpose(-1, -2) @ W
        # A redundant (rank deficient) A makes S singular; a small relative shift keeps the
        # factor finite, and the interior point iteration corrects the resulting tiny error
        # through its exactly computed residuals (like iterative refinement).
        eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
        delta = _relative_jitter(S, torch.finfo(S.dtype).eps ** (2 / 3))
        LS = robust_cholesky(S + delta[:, None, None] * eye)
        return cls(L, A, LS)

    def solve(self, r1: torch.Tensor, r2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve [H A^T; A 0] [x; y] = [r1; r2] for batched vectors r1 (B, n), r2 (B, p)."""
        Hinv_r1 = torch.cholesky_solve(r1.unsqueeze(-1), self.L)
        if self.LS is None:
            return Hinv_r1.squeeze(-1), r2.new_zeros(r2.shape)
        rhs = self.A @ Hinv_r1 - r2.unsqueeze(-1)
        y = torch.cholesky_solve(rhs, self.LS)
        x = torch.cholesky_solve(r1.unsqueeze(-1) - self.A.transpose(-1, -2) @ y, self.L)
        return x.squeeze(-1), y.squeeze(-1)
