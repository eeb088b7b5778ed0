"""Linear algebra of a batched QP: the interior point's reduced KKT system and the active-set one.

Interior point (`KKTFactor`): eliminating the slacks and the inequality duals from the primal-dual
Newton system leaves

    [ H  A^T ] [dz ]   [r1]
    [ A   0  ] [dnu] = [r2],      H = Q + G^T diag(w) G,  w = lam / s  (> 0).

H is positive definite (Q is), so it gets a Cholesky factor; the equality block is handled with
the Schur complement A H^{-1} A^T, also by Cholesky. One factor per iteration serves the predictor
and the corrector. Near the solution w spans ~1/eps, so H is fine for search directions (their
errors are corrected by the next iteration) but not for an exact solve.

Active set (`ActiveSetFactor`): with C = [A; G_act] (equalities, then the active inequalities)

    [ Q  C^T ] [x]   [r1]
    [ C   0  ] [y] = [r2]

through Q's Cholesky factor and the Schur complement C Q^{-1} C^T. No barrier weights appear, so
it is as well conditioned as the problem itself; it gives the polished solution and the backward.
"""

from __future__ import annotations

import torch


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


def _schur_factor(L: torch.Tensor, C: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Cholesky factor of C M^{-1} C^T (M = L L^T) plus a tiny relative shift.

    The shift keeps the factor finite when C has dependent rows (redundant equalities, more
    active constraints than variables at a degenerate vertex); `ActiveSetFactor.solve` removes
    its effect on consistent systems by one step of iterative refinement. Rows flagged in `pad`
    are zero padding and get a unit diagonal, decoupling them.
    """
    W = torch.linalg.solve_triangular(L, C.transpose(-1, -2), upper=False)
    S = W.transpose(-1, -2) @ W  # a Gram matrix: PSD even in rounding
    diag = S.diagonal(dim1=-2, dim2=-1)
    real = diag if pad is None else diag.masked_fill(pad, 0.0)
    count = S.shape[-1] if pad is None else (~pad).sum(-1).clamp_min(1)
    scale = (real.sum(-1) / count).clamp_min(torch.finfo(S.dtype).tiny)
    shift = torch.finfo(S.dtype).eps ** (2 / 3) * scale.unsqueeze(-1)
    diag.add_(shift if pad is None else torch.where(pad, 1.0, shift))
    return robust_cholesky(S)


class KKTFactor:
    """Cholesky factors of H = Q + G^T diag(w) G and of A H^{-1} A^T (interior point steps)."""

    def __init__(self, L: torch.Tensor, A: torch.Tensor, LS: torch.Tensor | None):
        self.L, self.A, self.LS = L, A, LS

    @classmethod
    def build(cls, Q: torch.Tensor, G: torch.Tensor, A: torch.Tensor, w: torch.Tensor) -> "KKTFactor":
        Gw = w.sqrt().unsqueeze(-1) * G
        L = robust_cholesky(torch.baddbmm(Q, Gw.transpose(-1, -2), Gw))  # one fused product
        return cls(L, A, _schur_factor(L, A) if A.shape[-2] else None)

    def solve(self, r1: torch.Tensor, r2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve [H A^T; A 0] [x; y] = [r1; r2] for batched vectors r1 (B, n), r2 (B, p)."""
        Hinv_r1 = torch.cholesky_solve(r1.unsqueeze(-1), self.L)
        if self.LS is None:
            return Hinv_r1.squeeze(-1), r2.new_zeros(r2.shape)
        y = torch.cholesky_solve(self.A @ Hinv_r1 - r2.unsqueeze(-1), self.LS)
        x = torch.cholesky_solve(r1.unsqueeze(-1) - self.A.transpose(-1, -2) @ y, self.L)
        return x.squeeze(-1), y.squeeze(-1)


def active_rows(G: torch.Tensor, active: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, width) of the active rows of G first, and the mask of real (not padding) ones."""
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[:, :width]
    valid = torch.arange(width, device=G.device) < active.sum(-1, keepdim=True)
    return order, valid


class ActiveSetFactor:
    """Factor of [Q C^T; C 0], C = [A; rows `idx` of G], the rows with `valid` False zero padding."""

    def __init__(self, Q, LQ, C, idx, valid, LS):
        self.Q, self.LQ, self.C, self.idx, self.valid, self.LS = Q, LQ, C, idx, valid, LS

    @staticmethod
    def constraint_rows(A, G, idx, valid) -> torch.Tensor:
        Gsel = torch.gather(G, 1, idx.unsqueeze(-1).expand(-1, -1, G.shape[-1]))
        return torch.cat([A, Gsel * valid.unsqueeze(-1).to(G.dtype)], dim=1)

    @classmethod
    def build(cls, Q, LQ, G, A, active: torch.Tensor) -> "ActiveSetFactor":
        width = int(active.sum(-1).max()) if active.numel() else 0
        idx, valid = active_rows(G, active, width)
        C = cls.constraint_rows(A, G, idx, valid)
        pad = torch.cat([valid.new_zeros(A.shape[:2]), ~valid], dim=1)
        return cls(Q, LQ, C, idx, valid, _schur_factor(LQ, C, pad) if C.shape[1] else None)

    def padded(self, width: int) -> "ActiveSetFactor":
        """The same factor with `width` inequality slots (the extra slots are padding)."""
        extra = width - self.idx.shape[1]
        if extra == 0:
            return self
        pad = lambda t: torch.nn.functional.pad(t, (0, extra))  # noqa: E731
        C = torch.nn.functional.pad(self.C, (0, 0, 0, extra))
        B, w = C.shape[0], C.shape[1]
        LS = torch.eye(w, dtype=C.dtype, device=C.device).repeat(B, 1, 1)
        if self.LS is not None:
            LS[:, : w - extra, : w - extra] = self.LS
        return ActiveSetFactor(self.Q, self.LQ, C, pad(self.idx), pad(self.valid), LS)

    def replace(self, rows: torch.Tensor, other: "ActiveSetFactor") -> "ActiveSetFactor":
        """This factor with the batch elements `rows` taken from `other`."""
        width = max(self.idx.shape[1], other.idx.shape[1])
        a, o = self.padded(width), other.padded(width)
        if a.LS is None:  # no constraint rows in either
            return a
        names = ("C", "idx", "valid", "LS")  # Q and LQ are the same problems' in both
        return ActiveSetFactor(a.Q, a.LQ, *(getattr(a, k).index_copy(0, rows, getattr(o, k)) for k in names))

    def _solve_once(self, r1, r2):
        x = torch.cholesky_solve(r1.unsqueeze(-1), self.LQ)
        if self.LS is None:
            return x.squeeze(-1), r2
        y = torch.cholesky_solve(self.C @ x - r2.unsqueeze(-1), self.LS)
        x = torch.cholesky_solve(r1.unsqueeze(-1) - self.C.transpose(-1, -2) @ y, self.LQ)
        return x.squeeze(-1), y.squeeze(-1)

    def solve(self, r1: torch.Tensor, r2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve [Q C^T; C 0] [x; y] = [r1; r2]; r2 and y have one entry per row of C (0 on padding)."""
        x, y = self._solve_once(r1, r2)
        if self.LS is None:
            return x, y
        # One step of iterative refinement undoes the Schur shift on consistent systems.
        e1 = r1 - (x.unsqueeze(-2) @ self.Q.transpose(-1, -2)).squeeze(-2) - (y.unsqueeze(-2) @ self.C).squeeze(-2)
        e2 = r2 - (x.unsqueeze(-2) @ self.C.transpose(-1, -2)).squeeze(-2)
        dx, dy = self._solve_once(e1, e2)
        return x + dx, y + dy
