"""A batched, differentiable QP solver.

    minimize_z  1/2 z^T Q z + q^T z   subject to  G z <= h,  A z = b

Forward: a primal-dual interior point method with Mehrotra's predictor-corrector, its Newton
systems solved in constraint space (`ift.optnet.kkt`): one m x m Cholesky per iteration, shared
by predictor and corrector. Once the residuals are small, the active set {lam > s} is solved
exactly as an equality-constrained QP and corrected by primal-dual active-set steps until the
KKT conditions hold to `tol` (crossover): the returned point is exact, not an interior iterate.
Backward (OptNet, Amos & Kolter 2017): differentiate the KKT conditions at the solution with the
inactive multipliers fixed at 0, i.e. solve [Q C^T; C 0] (u, v) = (dL/dz, 0) with C the
equality and active inequality rows, reusing the forward's active-set factor. A weakly active
constraint (lam and s both ~0) is classified by lam > s: the gradient is then one of the two
one-sided derivatives, always finite.

Argument order and batching follow qpth's `QPFunction`: each argument may carry a leading batch
dimension or be shared by the whole batch; gradients of shared arguments are summed over the batch.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ift.optnet.kkt import ConstraintSpace, ReducedFactor, bmtv, bmv


class QPStatus(enum.IntEnum):
    """Per-example outcome of the interior point method."""

    CONVERGED = 0
    MAX_ITER = 1  # residuals still above tol after max_iter iterations
    INFEASIBLE = 2  # the duals approach a Farkas certificate: no z satisfies G z <= h, A z = b
    NUMERICAL_ERROR = 3  # a Newton step was not finite; the last finite iterate is returned
    STALLED = 4  # a step shorter than STALL_STEP (1e-8): the Newton direction, computed in the
    # working precision, no longer makes progress; the last iterate is returned


# Q must be positive definite (checked), so the objective is bounded below on any nonempty
# feasible set: "unbounded" cannot happen and has no status; a PSD Q is rejected with an error.


class QPInfeasibleError(RuntimeError):
    """Raised in strict mode when some example of the batch has no feasible point."""


@dataclass
class QPSolution:
    """Primal-dual solution and diagnostics; only `z` is differentiable."""

    z: torch.Tensor  # (B, n) primal solution
    lam: torch.Tensor  # (B, m) inequality duals, >= 0
    nu: torch.Tensor  # (B, p) equality duals
    slack: torch.Tensor  # (B, m) s = h - G z, > 0
    status: torch.Tensor  # (B,) int64, values of QPStatus
    iterations: torch.Tensor  # (B,) int64, interior point steps taken
    primal_residual: torch.Tensor  # (B,) max(|Gz + s - h|, |Az - b|) / (1 + max(|Gz|, |s|, |h|, |Az|, |b|))
    dual_residual: torch.Tensor  # (B,) |Qz + q + G^T lam + A^T nu| / (1 + max(|Qz|, |q|, |G^T lam|, |A^T nu|))
    gap: torch.Tensor  # (B,) s^T lam / (1 + |objective|)

    @property
    def converged(self) -> torch.Tensor:
        return self.status == QPStatus.CONVERGED


def default_tol(dtype: torch.dtype, work_dtype: torch.dtype) -> float:
    """Relative tolerance: near float64 precision, or just below float32 resolution."""
    if work_dtype == torch.float32:
        return 1e-5
    return 1e-9 if dtype == torch.float64 else 1e-7


# --------------------------------------------------------------------------------------------
# input checking


_SPECS = {  # name -> (unbatched rank, symbolic shape)
    "Q": (2, ("n", "n")),
    "q": (1, ("n",)),
    "G": (2, ("m", "n")),
    "h": (1, ("m",)),
    "A": (2, ("p", "n")),
    "b": (1, ("p",)),
}


def _check_inputs(args: dict[str, torch.Tensor]) -> tuple[int | None, dict[str, int]]:
    """Validate shapes/dtypes/values; return the batch size (None if nothing is batched) and dims."""
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"solve_qp: {name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = {t.dtype for t in args.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
        found = {k: str(t.dtype) for k, t in args.items()}
        raise TypeError(
            f"solve_qp: all inputs must share one dtype, float32 or float64; got {found}. "
            "Cast them with .double() or .float()."
        )
    devices = {t.device for t in args.values()}
    if len(devices) != 1:
        raise ValueError(f"solve_qp: inputs live on different devices {devices}; move them to one")

    dims: dict[str, int] = {}
    batch: int | None = None
    for name, t in args.items():
        rank, symbols = _SPECS[name]
        if t.dim() not in (rank, rank + 1):
            raise ValueError(
                f"solve_qp: {name} must have shape {symbols} or (batch, *{symbols}); got {tuple(t.shape)}"
            )
        if t.dim() == rank + 1:
            if batch is not None and t.shape[0] != batch:
                raise ValueError(
                    f"solve_qp: batch sizes disagree: {name} has {t.shape[0]}, an earlier input {batch}"
                )
            batch = t.shape[0]
        for symbol, size in zip(symbols, t.shape[t.dim() - rank:]):
            if dims.setdefault(symbol, size) != size:
                raise ValueError(
                    f"solve_qp: dimension {symbol} of {name} is {size} but another input says "
                    f"{dims[symbol]}; expected Q (n,n), q (n), G (m,n), h (m), A (p,n), b (p)"
                )
    if dims["n"] == 0 or dims["m"] == 0:
        raise ValueError(
            "solve_qp: needs n >= 1 variables and m >= 1 inequalities (an equality-only QP is one "
            "linear solve: use torch.linalg.solve on its KKT matrix)"
        )
    for name, t in args.items():
        # max and min propagate NaN and see +-inf: two reductions instead of a full-size mask
        if t.numel() and not bool(torch.isfinite(torch.stack([t.amax(), t.amin()])).all()):
            raise ValueError(f"solve_qp: {name} contains NaN or infinite entries")
    return batch, dims


def _cholesky_of_Q(Qs: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of the symmetric part of Q (validation, polish and backward share it)."""
    LQ, info = torch.linalg.cholesky_ex(Qs)
    if bool((info > 0).any()):
        raise ValueError(
            "solve_qp: Q must be symmetric positive definite (its Cholesky failed"
            + (f" for batch elements {torch.nonzero(info > 0).flatten().tolist()[:10]}" if info.dim() else "")
            + "); add eps * I or parameterise Q = L L^T + eps * I"
        )
    return LQ


def _batched(t: torch.Tensor, rank: int, batch: int) -> torch.Tensor:
    return t if t.dim() == rank + 1 else t.unsqueeze(0).expand(batch, *t.shape)


def _inf_norm(v: torch.Tensor) -> torch.Tensor:
    return v.abs().amax(-1) if v.shape[-1] > 0 else v.new_zeros(v.shape[:-1])


# --------------------------------------------------------------------------------------------
# forward: primal-dual interior point, then an exact solve on the identified active set


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest alpha in [0, 1] keeping v + alpha dv >= 0, per batch element."""
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, float("inf")))
    return ratio.amin(-1).clamp(max=1.0)


def _shift_positive(v: torch.Tensor) -> torch.Tensor:
    return v + (1.0 - v.amin(-1, keepdim=True)).clamp_min(0.0)


@dataclass
class _Problem:
    """Batched problem data with its constraint-space factors; `take` selects examples."""

    cs: ConstraintSpace
    q: torch.Tensor
    h: torch.Tensor
    b: torch.Tensor

    def take(self, index: torch.Tensor) -> "_Problem":
        return _Problem(self.cs.take(index), self.q[index], self.h[index], self.b[index])


def _measure(P: _Problem, z, s, lam, nu):
    """Residuals, relative residuals (primal, dual, gap) and G^T lam + A^T nu of a point.

    s need not be positive nor lam nonnegative (a polished point): negative parts count as
    primal / dual infeasibility.
    """
    cs, n, p = P.cs, z.shape[-1], nu.shape[-1]
    QAGz = bmv(cs.QC, z)
    Qz, Az, Gz = QAGz[:, :n], QAGz[:, n : n + p], QAGz[:, n + p :]
    Gt_lam, At_nu = bmtv(cs.G, lam), bmtv(cs.A, nu) if p else torch.zeros_like(z)
    rd = Qz + P.q + Gt_lam + At_nu
    rp = Gz + s - P.h
    re = Az - P.b
    objective = 0.5 * (z * Qz).sum(-1) + (P.q * z).sum(-1)
    # Residuals relative to the size of the terms they are made of (as OSQP does).
    scale_p = 1 + torch.stack([_inf_norm(t) for t in (Gz, s, P.h, Az, P.b)]).amax(0)
    scale_d = 1 + torch.stack([_inf_norm(t) for t in (Qz, P.q, Gt_lam, At_nu)]).amax(0)
    pri = torch.stack([_inf_norm(rp), _inf_norm(re), _inf_norm(s.clamp(max=0))]).amax(0) / scale_p
    dual = torch.maximum(_inf_norm(rd), _inf_norm(lam.clamp(max=0))) / scale_d
    gap = (s * lam).abs().sum(-1) / (1 + objective.abs())
    return rd, rp, re, pri, dual, gap, Gt_lam + At_nu


def _farkas(P: _Problem, z, lam, nu, pri, y_res, tol):
    """The duals approach a certificate y = (lam >= 0, nu): G^T lam + A^T nu = 0, h^T lam + b^T nu < 0.

    Any feasible z0 has h^T lam + b^T nu >= -|z0|_1 |G^T lam + A^T nu|_inf, so the test proves
    there is no feasible point within 1000 times the size of the current iterate.
    """
    y_norm = lam.abs().sum(-1) + nu.abs().sum(-1)
    cert_res = _inf_norm(y_res) / y_norm
    cert_obj = ((P.h * lam).sum(-1) + (P.b * nu).sum(-1)) / y_norm
    return (
        (pri > tol)
        & (cert_obj < -1e-6 * (1 + torch.maximum(_inf_norm(P.h), _inf_norm(P.b))))
        & (1e3 * (1 + z.abs().sum(-1)) * cert_res < -cert_obj)
    )


def _newton_direction(F: ReducedFactor, part, s, lam, rp, rc):
    """Solve the linearised KKT system for (dz, ds, dlam, dnu) given the residuals.

    rd = Qz + q + G^T lam + A^T nu, rp = Gz + s - h, re = Az - b, rc = s*lam - target.
    Eliminating ds = -(rc + s dlam) / lam leaves the system of `ift.optnet.kkt` with D = s / lam;
    `part` is its projection of (-rd, -re), shared by predictor and corrector. dz and dnu
    (`F.lift`) are only needed for the corrector.
    """
    dlam = F.solve_g(part, rc / lam - rp)
    ds = -(rc + s * dlam) / lam
    return ds, dlam


def _equality_solve(P: _Problem, active: torch.Tensor):
    """Solve the KKT system with the constraints in `active` as equalities, the others dropped.

    Returns the factor and the point (z, s = h - Gz, lam, nu); it is the QP's exact solution iff
    the dropped constraints hold and the kept multipliers are >= 0 (`_measure` checks both).
    """
    F = ReducedFactor.active_set(P.cs, active)
    z, nu, y = F.solve(-P.q, P.b, F.to_slots(P.h), refine=True)
    lam = F.from_slots(y)
    return F, (z, P.h - bmv(F.cs.G, z), lam, nu)


def _kkt_ok(res, tol):
    return (res[0] <= tol) & (res[1] <= tol) & (res[2] <= tol)


def _polish(P: _Problem, active: torch.Tensor, tol: float, corrections: int = 3):
    """Exact solve on the active set guessed from an interior point iterate, verified.

    A guess that fails the KKT check (a dropped constraint violated, a kept multiplier
    negative) is corrected by primal-dual active-set steps: keep the constraints with lam > 0,
    add the violated ones. Returns the factors and points of the last attempt per example, their
    relative residuals, and whether each satisfies the KKT conditions to `tol`.
    """
    F, point = _equality_solve(P, active)
    res = _measure(P, *point)[3:6]
    ok = _kkt_ok(res, tol)
    for _ in range(corrections):
        bad = (~ok).nonzero().squeeze(-1)
        if not bad.numel():
            break
        Pb = P.take(bad)
        _, s, lam, _ = (t[bad] for t in point)
        Fb, point_b = _equality_solve(Pb, lam - s > 0)
        res_b = _measure(Pb, *point_b)[3:6]
        F = F.replace(bad, Fb)
        point = tuple(t.index_copy(0, bad, tb) for t, tb in zip(point, point_b))
        res = tuple(t.index_copy(0, bad, tb) for t, tb in zip(res, res_b))
        ok = ok.index_copy(0, bad, _kkt_ok(res_b, tol))
    return F, point, res, ok


# The first polish is tried once the interior point's relative residuals and gap are below
# FIRST_POLISH; a failed attempt is retried after they dropped by RETRY_FACTOR. Measured on the
# benchmark's problems (n = 100): the guess {lam > s} alone is right for few examples at 1e-3,
# after one or two active-set corrections for nearly all, saving 2 of ~9.5 iterations.
FIRST_POLISH = 1e-3
RETRY_FACTOR = 0.1
STALL_STEP = 1e-8


class _Result:
    """Per-example outputs of `_solve`, filled as examples finish, and their active-set factors."""

    def __init__(self, P: _Problem):
        B, m, n, p = *P.h.shape, P.q.shape[1], P.b.shape[1]
        new = lambda *shape, dtype=P.q.dtype: torch.zeros(*shape, dtype=dtype, device=P.q.device)  # noqa: E731
        self.z, self.lam, self.nu, self.s = new(B, n), new(B, m), new(B, p), new(B, m)
        self.status = new(B, dtype=torch.long)
        self.iterations = new(B, dtype=torch.long)
        self.pri, self.dual, self.gap = new(B), new(B), new(B)
        self.idx, self.valid = new(B, m, dtype=torch.long), new(B, m, dtype=torch.bool)
        self.L = torch.eye(m, dtype=P.q.dtype, device=P.q.device).repeat(B, 1, 1)  # padding: identity

    def store(self, rows, F: ReducedFactor, sel, **values):
        for name, v in values.items():
            getattr(self, name)[rows] = v
        k = F.idx.shape[1]
        self.idx[rows, :k], self.valid[rows, :k] = F.idx[sel], F.valid[sel]
        self.L[rows, :k, :k] = F.L[sel]


@torch.no_grad()
def _solve(P: _Problem, tol: float, max_iter: int) -> _Result:
    """Mehrotra predictor-corrector; every example stops as soon as it is solved (crossover).

    Once an example's residuals fall below FIRST_POLISH (then again after each RETRY_FACTOR
    drop), or it stops for any other reason, its active set {lam > s} is solved exactly and
    corrected (`_polish`); a polished point that satisfies the KKT conditions to `tol` is
    returned as CONVERGED, whatever the interior point's own residuals. Otherwise the example
    iterates on, and finishes with the interior point's status (CONVERGED at `tol`, STALLED,
    MAX_ITER, ...). Finished examples leave the batch once they are a quarter of it.
    """
    out = _Result(P)
    m = P.h.shape[1]
    near_tol = max(tol, FIRST_POLISH)

    # Start from the solution of the problem with unit barrier weights, then shift s, lam > 0.
    z, nu, _ = ReducedFactor.barrier(P.cs, torch.ones_like(P.h)).solve(-P.q, P.b, P.h)
    Gz_h = bmv(P.cs.G, z) - P.h
    s, lam = _shift_positive(-Gz_h), _shift_positive(Gz_h)

    live = torch.arange(P.h.shape[0], device=P.h.device)
    next_try = torch.full_like(P.h[:, 0], near_tol)  # residual level of the next polish attempt
    broken = torch.zeros_like(live, dtype=torch.bool)
    gone = torch.zeros_like(broken)  # finished, still in the batch until enough of them are
    step = torch.ones_like(P.h[:, 0])  # length of the last step
    iters = torch.zeros_like(live)
    for it in range(max_iter + 1):
        rd, rp, re, pri, dual, gap, y_res = _measure(P, z, s, lam, nu)
        tight = (pri <= tol) & (dual <= tol) & (gap <= tol)
        level = torch.stack([pri, dual, gap]).amax(0)
        near = level <= next_try
        infeasible = ~tight & _farkas(P, z, lam, nu, pri, y_res, tol)
        stalled = ~tight & ~infeasible & (step < STALL_STEP)
        done = tight | infeasible | stalled | broken | (it == max_iter)
        attempt = (done | near) & ~gone
        if bool(attempt.any()):
            a = attempt.nonzero().squeeze(-1)
            Fa, (zp, sp, lamp, nup), (ppri, pdual, pgap), ok = _polish(P.take(a), lam[a] > s[a], tol)
            ok &= ~infeasible[a]
            fin = ok | done[a]
            code = torch.full_like(a, int(QPStatus.MAX_ITER))
            for flag, status in ((stalled, QPStatus.STALLED), (broken, QPStatus.NUMERICAL_ERROR),
                                 (infeasible, QPStatus.INFEASIBLE), (tight, QPStatus.CONVERGED)):
                code[flag[a]] = int(status)
            code[ok] = int(QPStatus.CONVERGED)

            def pick(polished, iterate):  # the polished point where it was verified
                return torch.where(ok.view(-1, *[1] * (iterate.dim() - 1)), polished, iterate)[fin]

            out.store(
                live[a[fin]], Fa, fin,
                z=pick(zp, z[a]), lam=pick(lamp.clamp_min(0), lam[a]), nu=pick(nup, nu[a]),
                s=pick(sp.clamp_min(0), s[a]), status=code[fin], iterations=iters[a[fin]],
                pri=pick(ppri, pri[a]), dual=pick(pdual, dual[a]), gap=pick(pgap, gap[a]),
            )
            next_try = torch.where(attempt, level * RETRY_FACTOR, next_try)
            gone[a[fin]] = True
            if bool(gone.all()):
                break
            # Drop finished examples from the batch once they are a quarter of it: copying the
            # problem data costs about as much as carrying a few finished examples along.
            if 4 * int(gone.sum()) >= gone.numel():
                keep = ~gone
                live, P = live[keep], P.take(keep)
                state = (z, s, lam, nu, next_try, broken, gone, step, iters, rd, rp, re)
                z, s, lam, nu, next_try, broken, gone, step, iters, rd, rp, re = (t[keep] for t in state)

        # Predictor (affine scaling) direction, then Mehrotra's centred corrector: same factor.
        F = ReducedFactor.barrier(P.cs, s / lam)
        part = F.project(-rd, -re)
        mu = (s * lam).sum(-1, keepdim=True) / m
        ds, dlam = _newton_direction(F, part, s, lam, rp, s * lam)
        alpha = torch.minimum(_max_step(s, ds), _max_step(lam, dlam)).unsqueeze(-1)
        mu_aff = ((s + alpha * ds) * (lam + alpha * dlam)).sum(-1, keepdim=True) / m
        sigma = (mu_aff / mu).clamp(0.0, 1.0) ** 3
        rc = s * lam + ds * dlam - sigma * mu
        ds, dlam = _newton_direction(F, part, s, lam, rp, rc)
        dz, dnu, _ = F.lift(part, dlam)
        alpha = (0.99 * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp(max=1.0)

        broken = ~torch.stack([t.isfinite().all(-1) for t in (dz, ds, dlam, dnu)]).all(0) & ~gone
        alpha = torch.where(broken | gone, torch.zeros_like(alpha), alpha)
        step = alpha
        alpha = alpha.unsqueeze(-1)
        z = z + alpha * torch.nan_to_num(dz)
        s = s + alpha * torch.nan_to_num(ds)
        lam = lam + alpha * torch.nan_to_num(dlam)
        nu = nu + alpha * torch.nan_to_num(dnu)
        iters += (~broken & ~gone).long()
    return out


# --------------------------------------------------------------------------------------------
# backward: implicit differentiation of the KKT conditions on the active set


def _constraint_space(Q, G, A, batch) -> ConstraintSpace:
    """Factor Q (checking it is positive definite) and build T, once if no matrix is batched."""
    LQ = _cholesky_of_Q(Q)
    if Q.dim() == 2 and G.dim() == 2 and A.dim() == 2:
        return ConstraintSpace.build(Q, LQ, G, A).expand(batch)
    Q, LQ, G, A = (_batched(t, 2, batch) for t in (Q, LQ, G, A))
    return ConstraintSpace.build(Q, LQ, G, A)


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, q, G, h, A, b, batch, tol, max_iter, work_dtype):
        out_dtype = q.dtype
        Q, q, G, h, A, b = (t.to(work_dtype) for t in (Q, q, G, h, A, b))
        Qs = 0.5 * (Q + Q.transpose(-1, -2))  # the objective only sees Q's symmetric part
        cs = _constraint_space(Qs, G, A, batch)
        r = _solve(_Problem(cs, _batched(q, 1, batch), _batched(h, 1, batch), _batched(b, 1, batch)), tol, max_iter)
        ctx.cs = cs
        ctx.save_for_backward(r.z, r.lam, r.nu, r.idx, r.valid, r.L)
        ctx.ranks = (Q.dim() == 3, q.dim() == 2, G.dim() == 3, h.dim() == 2, A.dim() == 3, b.dim() == 2)
        ctx.out_dtype = out_dtype
        outs = [t.to(out_dtype) for t in (r.z, r.lam, r.nu, r.s)]
        stats = (r.status, r.iterations, *(t.to(out_dtype) for t in (r.pri, r.dual, r.gap)))
        # Only z is differentiated (the duals are returned for inspection).
        ctx.mark_non_differentiable(*outs[1:], *stats)
        return *outs, *stats

    @staticmethod
    @once_differentiable
    def backward(ctx, gz, *_unused):
        # Differentiate Qz + q + C^T y = 0, C z = d with C = [A; G_act], d = [b; h_act], y = [nu;
        # lam_act] (inactive multipliers are 0 and stay 0): the adjoint (u, v) solves
        # [Q C^T; C 0] (u, v) = (gz, 0), with the active-set factor of the forward's polish.
        z, lam, nu, idx, valid, L = ctx.saved_tensors
        F = ReducedFactor(ctx.cs, L, idx, valid)
        gz = gz.to(z.dtype)
        u, v_eq, v_act = F.solve(gz, torch.zeros_like(nu), torch.zeros_like(lam), refine=True)
        v = F.from_slots(v_act)
        lam_act = lam * (F.from_slots(torch.ones_like(lam)) > 0)
        uz = torch.stack([u, z], dim=-1)  # each gradient below is one product of rank 2
        grads = (
            -0.5 * (uz @ torch.stack([z, u], dim=-2)),  # Q
            -u,  # q
            -(torch.stack([lam_act, v], dim=-1) @ uz.transpose(-1, -2)),  # G
            v,  # h
            -(torch.stack([nu, v_eq], dim=-1) @ uz.transpose(-1, -2)),  # A
            v_eq,  # b
        )
        # A shared (unbatched) argument influences every example: its gradient is the batch sum.
        out = [(g if batched else g.sum(0)).to(ctx.out_dtype) for g, batched in zip(grads, ctx.ranks)]
        out = [g if need else None for g, need in zip(out, ctx.needs_input_grad[:6])]
        return (*out, None, None, None, None)


# --------------------------------------------------------------------------------------------
# public API


def solve_qp_with_info(
    Q: torch.Tensor,
    q: torch.Tensor,
    G: torch.Tensor,
    h: torch.Tensor,
    A: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    tol: float | None = None,
    max_iter: int = 50,
    strict: bool = False,
    work_in_float64: bool = True,
) -> QPSolution:
    """Solve a batch of QPs and return primal, duals, status and residuals (see `solve_qp`).

    With `strict=True` an infeasible example raises `QPInfeasibleError`; otherwise it is reported
    in `status` and its last iterate returned (never NaN).

    `work_in_float64` (default True) runs the solver and the backward in float64 even for float32
    inputs (outputs keep the input dtype), so float32 results are float64 results rounded once.
    On CPU this costs little (Cholesky, the main cost, is about as fast in float64 as in
    float32); solving in float32 loses accuracy in the Schur complement T when there are
    equality constraints (docs/optnet.md). Pass False to iterate in the input dtype (tolerance
    1e-5).
    """
    if (A is None) != (b is None):
        raise ValueError("solve_qp: pass both A and b for equality constraints, or neither")
    if A is None and isinstance(q, torch.Tensor) and q.dim() >= 1:
        A, b = q.new_zeros(0, q.shape[-1]), q.new_zeros(0)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"solve_qp: max_iter must be a positive int, got {max_iter!r}")
    args = dict(Q=Q, q=q, G=G, h=h, A=A, b=b)
    batch, _ = _check_inputs(args)
    work_dtype = torch.float64 if work_in_float64 else q.dtype
    tol = default_tol(q.dtype, work_dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"solve_qp: tol must be > 0, got {tol}")

    z, lam, nu, s, status, iters, pri, dual, gap = _QPFunction.apply(
        Q, q, G, h, A, b, batch or 1, tol, max_iter, work_dtype
    )
    sol = QPSolution(z, lam, nu, s, status, iters, pri, dual, gap)
    if batch is None:
        sol = QPSolution(*(t.squeeze(0) for t in (z, lam, nu, s, status, iters, pri, dual, gap)))
    if strict and bool((status == QPStatus.INFEASIBLE).any()):
        bad = torch.nonzero(status == QPStatus.INFEASIBLE).flatten().tolist()
        raise QPInfeasibleError(f"solve_qp: QP infeasible for batch elements {bad[:10]}")
    return sol


def _status_counts(status: torch.Tensor) -> str:
    return ", ".join(f"{int((status == s).sum())} {QPStatus(s).name}" for s in sorted(set(status.flatten().tolist())))


def solve_qp(
    Q: torch.Tensor,
    q: torch.Tensor,
    G: torch.Tensor,
    h: torch.Tensor,
    A: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    tol: float | None = None,
    max_iter: int = 50,
    strict: bool = True,
    work_in_float64: bool = True,
) -> torch.Tensor:
    """Solve `min 1/2 z^T Q z + q^T z  s.t.  G z <= h, A z = b`, differentiably in all arguments.

    Shapes: Q (n, n), q (n,), G (m, n), h (m,), A (p, n), b (p,), each optionally with a leading
    batch dimension B; returns z of shape (B, n), or (n,) when no argument is batched. `tol` is the
    relative residual / gap tolerance (default 1e-9 for float64 inputs, 1e-7 for float32).

    Infeasible examples raise `QPInfeasibleError` (pass `strict=False` to get the last iterate and
    use `solve_qp_with_info` to see which); examples that hit `max_iter` give a RuntimeWarning.
    """
    sol = solve_qp_with_info(
        Q, q, G, h, A, b, tol=tol, max_iter=max_iter, strict=strict, work_in_float64=work_in_float64
    )
    not_converged = int((sol.status != QPStatus.CONVERGED).sum())
    if not_converged:
        warnings.warn(
            f"solve_qp: {not_converged} of {sol.status.numel()} QPs did not converge "
            f"({_status_counts(sol.status)}); use solve_qp_with_info to inspect",
            RuntimeWarning,
            stacklevel=2,
        )
    return sol.z
