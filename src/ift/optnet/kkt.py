"""Linear algebra of a batched QP in constraint space.

Every linear system the solver meets has the form

    [ Q   A^T   G_R^T ] [x  ]   [r1]
    [ A    0     0    ] [y_A] = [rA]        (G_R: a subset R of the rows of G,
    [ G_R  0    -D    ] [y_G]   [rG]         D >= 0 diagonal)

the interior point's Newton step (R = all rows, D = diag(s / lam)), and the equality-constrained
KKT system of an active set (R = the active rows, D = 0: the polish and the backward). Eliminating
x with Q's Cholesky factor, then y_A with the Cholesky factor of A Q^{-1} A^T, leaves

    (T_RR + D) y_G = ...,    T = G (Q^{-1} - Q^{-1} A^T (A Q^{-1} A^T)^{-1} A Q^{-1}) G^T,

T being the Schur complement of the equality-constrained KKT matrix on G's rows. T is computed once
per problem (`ConstraintSpace`); an iteration then costs one m x m Cholesky and triangular solves,
and the active-set system is a principal submatrix of T. As the interior point converges, D tends
to 0 on the active rows and to infinity on the others, so T + D becomes as well conditioned as the
active-set system itself (unlike Q + G^T D^{-1} G, whose weights grow like 1/eps).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import lapack


# From this size on, CPU factorisations call LAPACK's potrf per matrix (`_lapack_cholesky`): below
# it the per-call overhead (~2 us) outweighs the saving (measured on 128 matrices, one thread).
LAPACK_MIN_SIZE = 48


def cholesky_unchecked(M: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Cholesky factor L and a mask of the matrices where it failed, without a host sync.

    Only L's lower triangle is meaningful: every consumer uses triangular solves, which read
    that triangle alone. `overwrite` lets the CPU path factorise M in place. The CPU path is not
    differentiable (the solver calls this without autograd).
    """
    use_lapack = M.device.type == "cpu" and M.dim() == 3 and M.shape[-1] >= LAPACK_MIN_SIZE and M.dtype in _POTRF
    if use_lapack and not (torch.is_grad_enabled() and M.requires_grad):
        return _lapack_cholesky(M.detach() if overwrite else M.detach().clone())
    # The upper factor U = L^T is returned transposed: cholesky_ex spends a good part of its time
    # zeroing the other triangle, and that is cheaper for upper=True in torch's layout.
    U, info = torch.linalg.cholesky_ex(M, upper=True)
    return U.transpose(-1, -2), info > 0


_POTRF = {torch.float64: lapack.dpotrf, torch.float32: lapack.spotrf}


def _lapack_cholesky(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factorise the contiguous symmetric matrices M in place, one potrf call each.

    torch.linalg.cholesky_ex copies the batch to column-major order and zeros the other triangle
    afterwards; on 128 matrices 100 x 100 on one CPU thread that made it 2.5x (float32) and 1.6x
    (float64) slower than potrf on each matrix in place, whose upper triangle keeps M's entries.
    """
    M = M.contiguous()
    a, potrf = M.numpy(), _POTRF[M.dtype]
    failed = torch.zeros(M.shape[0], dtype=torch.bool)
    for i in range(M.shape[0]):
        # a[i].T is Fortran-ordered (no copy): potrf writes L into its lower triangle, which is
        # M[i]'s upper triangle in torch's row-major layout, i.e. M[i] holds L^T there.
        c, info = potrf(a[i].T, lower=1, clean=0, overwrite_a=1)
        if not np.may_share_memory(c, a):  # scipy copied after all: take its result
            a[i].T[...] = c
        failed[i] = info > 0
    return M.transpose(-1, -2), failed


def repair_cholesky(M: torch.Tensor, L: torch.Tensor, failed: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Refactor the matrices flagged in `failed` with a growing relative diagonal jitter."""
    factor = 10 * torch.finfo(M.dtype).eps
    info = failed.long()
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
        info[bad] = info_b.to(info.dtype)
        factor *= 100
    if not bool((info > 0).any()):
        return L
    raise FloatingPointError(
        "Cholesky of the QP's KKT matrix failed even with diagonal jitter; the problem is "
        "numerically singular (check Q's conditioning and the scale of G, A)."
    )


def robust_cholesky(M: torch.Tensor, max_tries: int = 8) -> torch.Tensor:
    """Batched Cholesky of symmetric positive (semi)definite matrices.

    Matrices that are numerically semidefinite (redundant constraints) get a growing relative
    diagonal jitter instead of a NaN factor.
    """
    L, failed = cholesky_unchecked(M)
    return repair_cholesky(M, L, failed, max_tries) if bool(failed.any()) else L


def shifted_cholesky(S: torch.Tensor, pad: torch.Tensor | None = None, rel_shift: float | None = None) -> torch.Tensor:
    """Cholesky factor of S plus a relative shift (default eps^(2/3)) * mean diagonal.

    The shift keeps the factor finite when S is singular (dependent constraint rows: redundant
    equalities, duplicated or too many active inequalities); callers remove its effect on
    consistent systems with iterative refinement. Rows flagged in `pad` are padding: S is zero
    there and they get a unit diagonal, which decouples them.
    """
    rel_shift = torch.finfo(S.dtype).eps ** (2 / 3) if rel_shift is None else rel_shift
    S = S.clone()
    diag = S.diagonal(dim1=-2, dim2=-1)
    real = diag if pad is None else diag.masked_fill(pad, 0.0)
    count = S.shape[-1] if pad is None else (~pad).sum(-1).clamp_min(1)
    scale = real.sum(-1) / count
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero block (zero rows) has no scale of its own
    shift = rel_shift * scale.unsqueeze(-1)
    diag.add_(shift if pad is None else torch.where(pad, 1.0, shift))
    return robust_cholesky(S)


def chol_solve(L: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve L L^T x = b for batched vectors b (B, k); unlike cholesky_solve, L is not copied."""
    y = torch.linalg.solve_triangular(L, b.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.transpose(-1, -2), y, upper=True).squeeze(-1)


def bmv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched M @ v, written as a row vector times M^T (much faster on CPU than bmm with one column)."""
    return (v.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)


def bmtv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched M^T @ v, as a row vector times M."""
    return (v.unsqueeze(-2) @ M).squeeze(-2)


class ConstraintSpace:
    """Per-problem data and factors, computed once per solve.

    Data Q, A, G (residuals and products; kept apart, not stacked: stacking them copied ~20 MB
    per solve at n = 100, batch 128). Factors: Qinv = Q^{-1} (explicit: a product is much
    cheaper than two triangular solves on a CPU), P = Q^{-1} [A; G]^T, A Q^{-1} A^T = LA LA^T,
    X = LA^{-1} A Q^{-1} G^T and T = G Q^{-1} G^T - X^T X.

    The data may be in a higher precision than the factors (`with_data`: float64 data, float32
    factors): solves then run in the factors' precision and `refine_steps` steps of iterative
    refinement, with residuals computed from the data, bring them to the data's precision.
    """

    def __init__(self, Q, A, G, Qinv, P, LA, X, T, refine_steps: int = 1, rel_shift: float | None = None):
        self.Q, self.A, self.G = Q, A, G  # None: factors only (`take(data=False)`), for unrefined solves
        self.Qinv, self.P, self.LA, self.X, self.T = Qinv, P, LA, X, T
        self.p = P.shape[-1] - T.shape[-1]
        self.refine_steps, self.rel_shift = refine_steps, rel_shift

    def data(self):
        return self.Q, self.A, self.G

    def factors(self):
        return self.Qinv, self.P, self.LA, self.X, self.T

    def _new(self, data, factors) -> "ConstraintSpace":
        return ConstraintSpace(*data, *factors, self.refine_steps, self.rel_shift)

    def products(self, x):
        """Q x, A x, G x for batched vectors x."""
        Ax = bmv(self.A, x) if self.p else x[:, :0]
        return bmv(self.Q, x), Ax, bmv(self.G, x)

    def Ct(self, yA, yG):
        """A^T yA + G^T yG (yG on all m rows)."""
        return bmtv(self.G, yG) + bmtv(self.A, yA) if self.p else bmtv(self.G, yG)

    def with_data(self, Q, A, G, refine_steps: int) -> "ConstraintSpace":
        """These factors with residuals computed from Q, A, G (the same problems, possibly float64).

        One refinement step undoes the Cholesky shift and the explicit inverse's rounding when
        data and factors share a precision; with float32 factors each step gains about their
        relative error (<~1e-4 on the benchmark's problems): two reach float32 outputs' accuracy,
        three float64 rounding.
        """
        # float32 factors of float64 data: a Cholesky shift near float32 rounding keeps refinement fast.
        rel_shift = torch.finfo(self.T.dtype).eps if Q.dtype != self.T.dtype else None
        return ConstraintSpace(Q, A, G, *self.factors(), refine_steps, rel_shift)

    @classmethod
    def build(cls, Q, LQ, G, A) -> "ConstraintSpace":
        p = A.shape[-2]
        Qinv = torch.cholesky_inverse(LQ)
        P = Qinv @ (torch.cat([A, G], dim=-2) if p else G).transpose(-1, -2)
        T = G @ P[..., p:]
        LA = X = None
        if p:
            LA = shifted_cholesky(A @ P[..., :p])
            X = torch.linalg.solve_triangular(LA, A @ P[..., p:], upper=False)
            T = T - X.transpose(-1, -2) @ X
        return cls(Q, A, G, Qinv, P, LA, X, T)

    def expand(self, batch: int) -> "ConstraintSpace":
        """Broadcast unbatched factors (every argument shared) to the batch."""
        grow = lambda t: t if t is None or t.dim() == 3 else t.expand(batch, *t.shape)  # noqa: E731
        return self._new(*((grow(t) for t in ts) for ts in (self.data(), self.factors())))

    def take(self, index: torch.Tensor, data: bool = True) -> "ConstraintSpace":
        """The examples `index`; without `data`, enough for `ReducedFactor.solve_and_Gx`."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return self._new(map(pick, self.data()) if data else (None,) * 3, map(pick, self.factors()))


def active_rows(active: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, width) of the True entries of `active` first, and the mask of real (not padding) ones."""
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)[:, :width]
    valid = torch.arange(width, device=active.device) < active.sum(-1, keepdim=True)
    return order, valid


class ReducedFactor:
    """Cholesky factor of T_RR + D for a set R of rows of G (all rows when `idx` is None).

    With `idx`, slot j holds row idx[:, j] of G when valid[:, j], else padding (a decoupled unit
    row whose right-hand side and solution are 0). Only T_RR is gathered; every product uses the
    full matrices with vectors scattered to all m rows (zero outside R).
    """

    def __init__(self, cs: ConstraintSpace, L: torch.Tensor, idx=None, valid=None, d=None):
        self.cs, self.L, self.idx, self.valid = cs, L, idx, valid
        self.d = d  # barrier weights of a `barrier` factor (to rebuild its matrix in `repaired`)
        self.p = cs.p

    @classmethod
    def barrier(cls, cs: ConstraintSpace, d: torch.Tensor) -> "ReducedFactor":
        """All rows, D = diag(d) > 0 (an interior point step)."""
        F, failed = cls.barrier_unchecked(cs, d)
        return F.repaired(failed) if bool(failed.any()) else F

    @classmethod
    def barrier_unchecked(cls, cs: ConstraintSpace, d: torch.Tensor) -> tuple["ReducedFactor", torch.Tensor]:
        """`barrier` and the mask of failed factorisations, for the caller to check and `repaired`."""
        L, failed = cholesky_unchecked(cls._barrier_matrix(cs, d), overwrite=True)
        return cls(cs, L, d=d), failed

    @staticmethod
    def _barrier_matrix(cs: ConstraintSpace, d: torch.Tensor) -> torch.Tensor:
        M = cs.T.clone()
        M.diagonal(dim1=-2, dim2=-1).add_(d)
        return M

    def repaired(self, failed: torch.Tensor) -> "ReducedFactor":
        return ReducedFactor(self.cs, repair_cholesky(self._barrier_matrix(self.cs, self.d), self.L, failed), d=self.d)

    @classmethod
    def active_set(cls, cs: ConstraintSpace, active: torch.Tensor) -> "ReducedFactor":
        """The rows in `active`, D = 0 (the equality-constrained KKT system of an active set)."""
        width = int(active.sum(-1).max()) if active.numel() else 0
        idx, valid = active_rows(active, width)
        keep = valid.to(cs.T.dtype)
        TRR = torch.gather(cs.T, 1, idx.unsqueeze(-1).expand(-1, -1, cs.T.shape[-1])) * keep.unsqueeze(-1)
        TRR = torch.gather(TRR, 2, idx.unsqueeze(1).expand(-1, width, -1)) * keep.unsqueeze(1)
        return cls(cs, shifted_cholesky(TRR, ~valid, cs.rel_shift), idx, valid)

    def to_slots(self, v: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, width): the entries of the rows in R."""
        return v if self.idx is None else torch.gather(v, 1, self.idx) * self.valid

    def from_slots(self, y: torch.Tensor) -> torch.Tensor:
        """(B, width) -> (B, m), zero outside R."""
        if self.idx is None:
            return y
        return y.new_zeros(y.shape[0], self.cs.T.shape[-1]).scatter_add_(1, self.idx, y * self.valid)

    def active(self) -> torch.Tensor:
        """(B, m) mask of the rows in R."""
        return self.from_slots(self.valid.to(self.cs.T.dtype)) > 0

    def project(self, r1, rA):
        """The parts of a solve shared by right-hand sides that differ only in rG."""
        cs = self.cs
        g = bmtv(cs.P, r1)  # [A; G] Q^{-1} r1
        w = bmv(cs.Qinv, r1)
        if not self.p:
            return w, g, None
        uA = torch.linalg.solve_triangular(cs.LA, (g[:, : self.p] - rA).unsqueeze(-1), upper=False)
        return w, g[:, self.p :] - (uA.transpose(-1, -2) @ cs.X).squeeze(-2), uA

    def solve_g(self, part, rG):
        """y_G (one entry per slot) for the right-hand side rG (one entry per slot)."""
        return chol_solve(self.L, self.to_slots(part[1]) - rG)

    def lift(self, part, yG):
        """x and y_A from y_G; returns (x, y_A, y_G)."""
        w, _, uA = part
        y = self.from_slots(yG)
        if self.p:
            yA = torch.linalg.solve_triangular(self.cs.LA.transpose(-1, -2), uA - self.cs.X @ y.unsqueeze(-1), upper=True)
            y = torch.cat([yA.squeeze(-1), y], dim=-1)
        return w - bmv(self.cs.P, y), y[:, : self.p], yG

    def _solve_once(self, r1, rA, rG):
        dtype = self.L.dtype  # the factors' precision (float32 under mixed precision)
        part = self.project(r1.to(dtype), rA.to(dtype))
        return tuple(t.to(r1.dtype) for t in self.lift(part, self.solve_g(part, rG.to(dtype))))

    def solve_and_Gx(self, r1, rA, rG):
        """One unrefined solve, in the factors' precision, and G x without a product with G.

        With y the multipliers on all m rows, G x = G Q^-1 (r1 - A^T y_A - G^T y) reduces to
        g' - T y, g' being `project`'s second part: only the factors are needed.
        """
        dtype = self.L.dtype
        part = self.project(r1.to(dtype), rA.to(dtype))
        x, yA, yG = self.lift(part, self.solve_g(part, rG.to(dtype)))
        Gx = part[1] - bmv(self.cs.T, self.from_slots(yG))
        return tuple(t.to(r1.dtype) for t in (x, yA, yG, Gx))

    def solve(self, r1, rA, rG, refine: bool = False, start=None):
        """Solve the system of the module docstring (D = 0 for an active set) for batched vectors.

        `refine` adds `cs.refine_steps` steps of iterative refinement (residuals with Q, A, G
        themselves, in the data's precision), which undo the Cholesky shifts, the rounding of the
        explicit inverse and, under mixed precision, the float32 factors. `start` = (x, yA, yG)
        refines an earlier unrefined solution instead of solving afresh.
        """
        x, yA, yG = self._solve_once(r1, rA, rG) if start is None else start
        cs = self.cs
        for _ in range(cs.refine_steps if refine else 0):
            Qx, Ax, Gx = cs.products(x)
            e1 = r1 - Qx - cs.Ct(yA, self.from_slots(yG))
            dx, dyA, dyG = self._solve_once(e1, rA - Ax, rG - self.to_slots(Gx))
            x, yA, yG = x + dx, yA + dyA, yG + dyG
        return x, yA, yG

    def padded(self, width: int) -> "ReducedFactor":
        """The same active-set factor with `width` slots (the extra ones are padding)."""
        extra = width - self.idx.shape[1]
        if extra == 0:
            return self
        pad = lambda t: torch.nn.functional.pad(t, (0, extra))  # noqa: E731
        L = torch.eye(width, dtype=self.L.dtype, device=self.L.device).repeat(self.L.shape[0], 1, 1)
        L[:, : width - extra, : width - extra] = self.L
        return ReducedFactor(self.cs, L, pad(self.idx), pad(self.valid))

    def take(self, sel: torch.Tensor) -> "ReducedFactor":
        """The active-set factor of the batch elements `sel` (its problem data stay whole)."""
        return ReducedFactor(self.cs, self.L[sel], self.idx[sel], self.valid[sel])

    def replace(self, rows: torch.Tensor, other: "ReducedFactor") -> "ReducedFactor":
        """This active-set factor with the batch elements `rows` taken from `other` (same problems)."""
        width = max(self.idx.shape[1], other.idx.shape[1])
        a, o = self.padded(width), other.padded(width)
        return ReducedFactor(self.cs, *(t.index_copy(0, rows, u) for t, u in
                                        ((a.L, o.L), (a.idx, o.idx), (a.valid, o.valid))))
