"""A batched, differentiable QP solver.

    minimize_z  1/2 z^T Q z + q^T z   subject to  G z <= h,  A z = b

Forward: a primal-dual interior point method with Mehrotra's predictor-corrector, one Cholesky
factorisation of the reduced KKT matrix per iteration shared by predictor and corrector.
Backward (OptNet, Amos & Kolter 2017): differentiate the KKT conditions at the solution. The
transposed KKT system reduces to the matrix the forward factorised last, so the backward is a
handful of triangular solves.

Argument order and batching follow qpth's `QPFunction`: each argument may carry a leading batch
dimension or be shared by the whole batch; gradients of shared arguments are summed over the batch.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ift.optnet.kkt import KKTFactor


class QPStatus(enum.IntEnum):
    """Per-example outcome of the interior point method."""

    CONVERGED = 0
    MAX_ITER = 1  # residuals still above tol after max_iter iterations
    INFEASIBLE = 2  # the duals approach a Farkas certificate: no z satisfies G z <= h, A z = b
    NUMERICAL_ERROR = 3  # a Newton step was not finite; the last finite iterate is returned
    STALLED = 4  # barrier weights lam/s beyond 1e-2/eps: the KKT matrix is too ill-conditioned
    # to make further progress at this precision; the last iterate is returned


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
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"solve_qp: {name} contains NaN or infinite entries")
    Qs = 0.5 * (args["Q"] + args["Q"].transpose(-1, -2))
    _, info = torch.linalg.cholesky_ex(Qs.detach())
    if bool((info > 0).any()):
        raise ValueError(
            "solve_qp: Q must be symmetric positive definite (its Cholesky failed"
            + (f" for batch elements {torch.nonzero(info > 0).flatten().tolist()[:10]}" if info.dim() else "")
            + "); add eps * I or parameterise Q = L L^T + eps * I"
        )
    return batch, dims


def _batched(t: torch.Tensor, rank: int, batch: int) -> torch.Tensor:
    return t if t.dim() == rank + 1 else t.unsqueeze(0).expand(batch, *t.shape)


# Batched matrix-vector products written as row-vector @ matrix: on CPU this is an order of
# magnitude faster than bmm with a single right-hand column.
def _bmv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (v.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)


def _bmtv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (v.unsqueeze(-2) @ M).squeeze(-2)


def _inf_norm(v: torch.Tensor) -> torch.Tensor:
    return v.abs().amax(-1) if v.shape[-1] > 0 else v.new_zeros(v.shape[:-1])


# --------------------------------------------------------------------------------------------
# forward: primal-dual interior point


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest alpha in [0, 1] keeping v + alpha dv >= 0, per batch element."""
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, float("inf")))
    return ratio.amin(-1).clamp(max=1.0)


def _shift_positive(v: torch.Tensor) -> torch.Tensor:
    return v + (1.0 - v.amin(-1, keepdim=True)).clamp_min(0.0)


def _newton_direction(F, G, s, lam, rd, rp, re, rc):
    """Solve the linearised KKT system for (dz, ds, dlam, dnu) given the residuals.

    rd = Qz + q + G^T lam + A^T nu, rp = Gz + s - h, re = Az - b, rc = s*lam - target.
    """
    r1 = -rd - _bmtv(G, (lam * rp - rc) / s)
    dz, dnu = F.solve(r1, -re)
    ds = -rp - _bmv(G, dz)
    dlam = (-rc - lam * ds) / s
    return dz, ds, dlam, dnu


@torch.no_grad()
def _interior_point(Q, q, G, h, A, b, tol: float, max_iter: int):
    B, m = h.shape
    stall_weight = 1e-2 / torch.finfo(h.dtype).eps

    # Start from the solution of the problem with unit barrier weights, then shift s, lam > 0.
    F = KKTFactor.build(Q, G, A, torch.ones_like(h))
    z, nu = F.solve(-q + _bmtv(G, h), b)
    Gz_h = _bmv(G, z) - h
    s, lam = _shift_positive(-Gz_h), _shift_positive(Gz_h)

    status = torch.full((B,), int(QPStatus.MAX_ITER), dtype=torch.long, device=q.device)
    iterations = torch.zeros(B, dtype=torch.long, device=q.device)
    frozen = torch.zeros(B, dtype=torch.bool, device=q.device)
    for it in range(max_iter + 1):
        # Factorise first, so the factor of the final iterate is the one the backward reuses.
        F = KKTFactor.build(Q, G, A, lam / s)
        Qz, Gz, Az, Gt_lam, At_nu = _bmv(Q, z), _bmv(G, z), _bmv(A, z), _bmtv(G, lam), _bmtv(A, nu)
        rd = Qz + q + Gt_lam + At_nu
        rp = Gz + s - h
        re = Az - b
        objective = 0.5 * (z * Qz).sum(-1) + (q * z).sum(-1)
        # Residuals relative to the size of the terms they are made of (as OSQP does).
        scale_p = 1 + torch.stack([_inf_norm(t) for t in (Gz, s, h, Az, b)]).amax(0)
        scale_d = 1 + torch.stack([_inf_norm(t) for t in (Qz, q, Gt_lam, At_nu)]).amax(0)
        pri = torch.maximum(_inf_norm(rp), _inf_norm(re)) / scale_p
        dual = _inf_norm(rd) / scale_d
        gap = (s * lam).sum(-1) / (1 + objective.abs())
        converged = (pri <= tol) & (dual <= tol) & (gap <= tol)

        # Farkas certificate: y = (lam >= 0, nu) with G^T lam + A^T nu = 0, h^T lam + b^T nu < 0.
        # Any feasible z0 has h^T lam + b^T nu >= -|z0|_1 |G^T lam + A^T nu|_inf, so the test below
        # proves there is no feasible point within 1000 times the size of the current iterate.
        y_norm = lam.abs().sum(-1) + nu.abs().sum(-1)
        cert_res = _inf_norm(Gt_lam + At_nu) / y_norm
        cert_obj = ((h * lam).sum(-1) + (b * nu).sum(-1)) / y_norm
        infeasible = (
            ~converged
            & (pri > tol)
            & (cert_obj < -1e-6 * (1 + torch.maximum(_inf_norm(h), _inf_norm(b))))
            & (1e3 * (1 + z.abs().sum(-1)) * cert_res < -cert_obj)
        )

        stalled = ~converged & ~infeasible & ((lam / s).amax(-1) > stall_weight)

        newly = ~frozen & (converged | infeasible | stalled)
        status[newly & converged] = int(QPStatus.CONVERGED)
        status[newly & infeasible] = int(QPStatus.INFEASIBLE)
        status[newly & stalled] = int(QPStatus.STALLED)
        frozen |= newly
        if bool(frozen.all()) or it == max_iter:
            break

        # Predictor (affine scaling) direction, then Mehrotra's centred corrector: same factor.
        mu = (s * lam).sum(-1, keepdim=True) / m
        dz, ds, dlam, dnu = _newton_direction(F, G, s, lam, rd, rp, re, s * lam)
        alpha = torch.minimum(_max_step(s, ds), _max_step(lam, dlam)).unsqueeze(-1)
        mu_aff = ((s + alpha * ds) * (lam + alpha * dlam)).sum(-1, keepdim=True) / m
        sigma = (mu_aff / mu).clamp(0.0, 1.0) ** 3
        rc = s * lam + ds * dlam - sigma * mu
        dz, ds, dlam, dnu = _newton_direction(F, G, s, lam, rd, rp, re, rc)
        alpha = (0.99 * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp(max=1.0)

        finite = torch.stack([t.isfinite().all(-1) for t in (dz, ds, dlam, dnu)]).all(0)
        broken = ~frozen & ~finite
        status[broken] = int(QPStatus.NUMERICAL_ERROR)
        frozen |= broken
        alpha = torch.where(frozen, torch.zeros_like(alpha), alpha).unsqueeze(-1)
        z = z + alpha * torch.nan_to_num(dz)
        s = s + alpha * torch.nan_to_num(ds)
        lam = lam + alpha * torch.nan_to_num(dlam)
        nu = nu + alpha * torch.nan_to_num(dnu)
        iterations += (~frozen).long()
    return z, lam, nu, s, F, (status, iterations, pri, dual, gap)


# --------------------------------------------------------------------------------------------
# backward: implicit differentiation of the KKT conditions


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, q, G, h, A, b, batch, tol, max_iter, work_dtype):
        out_dtype = q.dtype
        Q, q, G, h, A, b = (t.to(work_dtype) for t in (Q, q, G, h, A, b))
        Qs = 0.5 * (Q + Q.transpose(-1, -2))  # the objective only sees Q's symmetric part
        Qb, qb, Gb, hb = (_batched(t, r, batch) for t, r in ((Qs, 2), (q, 1), (G, 2), (h, 1)))
        Ab, bb = _batched(A, 2, batch), _batched(b, 1, batch)
        z, lam, nu, s, F, stats = _interior_point(Qb, qb, Gb, hb, Ab, bb, tol, max_iter)
        ctx.save_for_backward(z, lam, nu, s, G, A, F.L, F.LS if F.LS is not None else F.L.new_zeros(0))
        ctx.batch = batch
        ctx.ranks = (Q.dim() == 3, q.dim() == 2, G.dim() == 3, h.dim() == 2, A.dim() == 3, b.dim() == 2)
        ctx.out_dtype = out_dtype
        z, lam, nu, s = (t.to(out_dtype) for t in (z, lam, nu, s))
        stats = (stats[0], stats[1], *(t.to(out_dtype) for t in stats[2:]))
        # Only z is differentiated: the duals of active constraints would need (G dz - g)/s with
        # s ~ 1e-12, which loses all accuracy to cancellation in this reduced form.
        ctx.mark_non_differentiable(lam, nu, s, *stats)
        return z, lam, nu, s, *stats

    @staticmethod
    @once_differentiable
    def backward(ctx, gz, *_unused):
        z, lam, nu, s, G, A, L, LS = ctx.saved_tensors
        batch = ctx.batch
        gz = gz.to(z.dtype)
        Gb, Ab = _batched(G, 2, batch), _batched(A, 2, batch)
        F = KKTFactor(L, Ab, LS if LS.numel() else None)
        # Solve K^T (dz, dlam, dnu) = (gz, 0, 0), K the Jacobian of the KKT conditions
        # (Qz + q + G^T lam + A^T nu, diag(lam)(Gz - h), Az - b) in (z, lam, nu). Eliminating
        # dlam = G dz / s leaves the forward's matrix H = Q + G^T diag(lam/s) G and its Schur
        # complement: the saved factors.
        dz, dnu = F.solve(gz, gz.new_zeros(gz.shape[0], Ab.shape[1]))
        lam_dlam = lam / s * _bmv(Gb, dz)
        outer = lambda u, v: u.unsqueeze(-1) * v.unsqueeze(-2)  # noqa: E731
        grads = (
            -0.5 * (outer(dz, z) + outer(z, dz)),  # Q
            -dz,  # q
            -(outer(lam, dz) + outer(lam_dlam, z)),  # G
            lam_dlam,  # h
            -(outer(nu, dz) + outer(dnu, z)),  # A
            dnu,  # b
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

    `work_in_float64` (default True) runs the interior point method and the backward in float64
    even for float32 inputs (outputs keep the input dtype): in float32 the barrier weights lam/s
    reach 1e8 and beyond, and the dual residual stalls around 1e-3 before the gap closes. Pass
    False to iterate in the input dtype (tolerance 1e-5, more MAX_ITER statuses).
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
            f"(statuses {sorted(set(sol.status.flatten().tolist()))}); use solve_qp_with_info to inspect",
            RuntimeWarning,
            stacklevel=2,
        )
    return sol.z
