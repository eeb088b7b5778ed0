"""A batched, differentiable QP solver.

    minimize_z  1/2 z^T Q z + q^T z   subject to  G z <= h,  A z = b

Forward: a primal-dual interior point method with Mehrotra's predictor-corrector, its Newton
systems solved in constraint space (`ift.optnet.kkt`): one m x m Cholesky per iteration, shared
by predictor and corrector. Once the residuals are small, the active set {lam > s} is solved
exactly as an equality-constrained QP and corrected by primal-dual active-set steps until the
KKT conditions hold to `tol` (crossover): the returned point is exact, not an interior iterate.
By default the interior point runs in float32 and the crossover and backward in float64
(`precision`, see `solve_qp_with_info`).
Backward (OptNet, Amos & Kolter 2017): the implicit core (`ift.implicit.implicit_root`)
differentiates the KKT conditions at the solution with the inactive multipliers fixed at 0
(`_kkt_residual`), i.e. solves [Q C^T; C 0] (u, v) = (dL/dz, 0) with C the equality and active
inequality rows. Its adjoint hook (`SuppliedSolve`) solves that system with the forward's
active-set factor; the core verifies the answer with one product of the KKT matrix, refines it
from the verified residual where needed and reports it (an unverified solve warns). A weakly
active constraint (lam and s both ~0) is classified by lam > s: the gradient is then one of the
two one-sided derivatives, always finite.

Argument order and batching follow qpth's `QPFunction`: each argument may carry a leading batch
dimension or be shared by the whole batch; gradients of shared arguments are summed over the batch.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, fields

import torch

from ift.implicit.core import SuppliedSolve, implicit_root
from ift.optnet.kkt import ConstraintSpace, ReducedFactor, bmtv, bmv, cholesky_unchecked
from ift.optnet.scaling import Scaling


class QPStatus(enum.IntEnum):
    """Per-example outcome of the interior point method."""

    CONVERGED = 0
    MAX_ITER = 1  # residuals still above tol after max_iter iterations
    INFEASIBLE = 2  # the duals approach a Farkas certificate: no z satisfies G z <= h, A z = b
    NUMERICAL_ERROR = 3  # a Newton step was not finite; the last finite iterate is returned
    STALLED = 4  # a step shorter than STALL_STEP (1e-8): the Newton direction, computed in the
    # working precision, no longer makes progress; the last iterate is returned
    DEGENERATE = 5  # solved (z verified to tol) but strict complementarity fails: some inequality
    # has slack and multiplier both below DEGENERATE_FACTOR * tol (relative, after scaling), so
    # the active set is ambiguous and the gradient is one of the one-sided derivatives
    RELAXED = 6  # infeasible; z solves the l2-penalised elastic relaxation (`relax`, see `_relaxed`)


# Q must be positive definite (checked), so the objective is bounded below on any nonempty
# feasible set: "unbounded" cannot happen and has no status; a PSD Q is rejected with an error.


class QPInfeasibleError(RuntimeError):
    """Raised in strict mode when some example of the batch has no feasible point."""


@dataclass
class QPSolution:
    """Primal-dual solution and diagnostics; only `z` is differentiable."""

    z: torch.Tensor  # (B, n) primal solution
    lam: torch.Tensor  # (B, m) row multipliers: >= 0 at the upper bound h, <= 0 at the lower bound
    nu: torch.Tensor  # (B, p) equality duals
    slack: torch.Tensor  # (B, m) s = h - G z >= 0 (inf where h = +inf)
    status: torch.Tensor  # (B,) int64, values of QPStatus
    iterations: torch.Tensor  # (B,) int64, interior point steps taken
    primal_residual: torch.Tensor  # (B,) max(|Gz + s - h|, |Az - b|) / (1 + max(|Gz|, |s|, |h|, |Az|, |b|))
    dual_residual: torch.Tensor  # (B,) |Qz + q + G^T lam + A^T nu| / (1 + max(|Qz|, |q|, |G^T lam|, |A^T nu|))
    gap: torch.Tensor  # (B,) s^T lam / (1 + |objective|)
    slack_lower: torch.Tensor  # (B, m) G z - l (inf where l = -inf, e.g. without `lower`)

    @property
    def converged(self) -> torch.Tensor:
        """z is the verified solution (CONVERGED, or DEGENERATE: exact z, one-sided gradient)."""
        return (self.status == QPStatus.CONVERGED) | (self.status == QPStatus.DEGENERATE)

    @property
    def batch_size(self) -> int:
        return int(self.iterations.numel())

    def to_metrics(self, kind: str = "qp", stage: str = "train") -> dict[str, torch.Tensor]:
        """What :class:`ift.telemetry.SolverDiagnostics` logs: ``<kind>/solver_iters`` (mean) and
        ``<kind>/nonconverged_frac`` in training; ``<stage>/...`` under val / test (``test/solver_iters``)."""
        prefix = kind if stage == "train" else stage
        return {f"{prefix}/solver_iters": self.iterations.float().mean(),
                f"{prefix}/nonconverged_frac": (~self.converged).float().mean()}


PRECISIONS = ("mixed", "float64", "input")


def default_tol(dtype: torch.dtype, precision: str = "mixed") -> float:
    """Relative tolerance: near float64 precision, or just below float32 resolution."""
    if precision == "input" and dtype == torch.float32:
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
    "lower": (1, ("m",)),
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
    two_sided = "lower" in args
    for name, t in args.items():
        if two_sided and name in ("h", "lower"):
            continue
        # max and min propagate NaN and see +-inf: two reductions instead of a full-size mask
        if t.numel() and not bool(torch.isfinite(torch.stack([t.amax(), t.amin()])).all()):
            raise ValueError(f"solve_qp: {name} contains NaN or infinite entries")
    if two_sided:
        _check_bounds(args["lower"], args["h"])
    return batch, dims


def _check_bounds(lower: torch.Tensor, upper: torch.Tensor) -> None:
    """lower <= G z <= upper: no NaN, -inf allowed below and +inf above, never both in one row."""
    problems = {
        "a bound is NaN": torch.isnan(lower).any() | torch.isnan(upper).any(),
        "lower = +inf or h = -inf": (lower == float("inf")).any() | (upper == -float("inf")).any(),
        "lower > h (an empty interval)": (lower > upper).any(),
        "a row has lower = -inf and h = +inf (it constrains nothing: drop it)":
            (torch.isinf(lower) & torch.isinf(upper)).any(),
    }
    for what, bad in zip(problems, torch.stack(list(problems.values())).tolist()):
        if bad:
            raise ValueError(f"solve_qp: two-sided constraints lower <= G z <= h: {what}")


def _cholesky_of_Q(Qs: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of the symmetric part of Q (validation, polish and backward share it)."""
    LQ, failed = cholesky_unchecked(Qs)
    if bool(failed.any()):
        raise ValueError(
            "solve_qp: Q must be symmetric positive definite (its Cholesky failed"
            + (f" for batch elements {torch.nonzero(failed).flatten().tolist()[:10]}" if failed.dim() else "")
            + "); add eps * I or parameterise Q = L L^T + eps * I"
        )
    return LQ


def _batched(t: torch.Tensor, rank: int, batch: int) -> torch.Tensor:
    return t if t.dim() == rank + 1 else t.unsqueeze(0).expand(batch, *t.shape)


def _inf_norm(v: torch.Tensor) -> torch.Tensor:
    """Max abs entry per batch element over all other dimensions (0 for empty ones)."""
    v = v.flatten(1)
    return v.abs().amax(-1) if v.shape[-1] > 0 else v.new_zeros(v.shape[:-1])


# --------------------------------------------------------------------------------------------
# forward: primal-dual interior point, then an exact solve on the identified active set
#
# Each row of G has two sides, k = 0: G_i z <= u_i and k = 1: G_i z >= l_i (sign SIDE[k] = +1,
# -1), each with a slack s_k = SIDE[k] (bound_k - G z) >= 0 and a multiplier lam_k >= 0, stored
# as (B, 2, m). An infinite bound's side is switched off by the mask f (0): its s and lam stay 1
# and enter nothing. The row's multiplier in the stationarity is y = lam_0 - lam_1.


def _side(t: torch.Tensor) -> torch.Tensor:
    return torch.tensor([1.0, -1.0], dtype=t.dtype, device=t.device).view(1, 2, 1)


def _max_step(v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """Largest alpha in [0, 1] keeping v + alpha dv >= 0, per batch element."""
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, float("inf")))
    return ratio.flatten(1).amin(-1).clamp(max=1.0)


def _shift_positive(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """v shifted so that its smallest live entry is >= 1; switched-off entries 1."""
    low = torch.where(f > 0, v, torch.full_like(v, float("inf"))).flatten(1).amin(-1)
    shifted = v + (1.0 - low).clamp_min(0.0).view(-1, 1, 1)
    return torch.where(f > 0, shifted, torch.ones_like(v))


@dataclass
class _Problem:
    """Batched problem data with its constraint-space factors; `take` selects examples.

    bounds (B, 2, m): u and l with infinite entries set to 0, f (B, 2, m): 1 where finite.
    """

    cs: ConstraintSpace
    q: torch.Tensor
    bounds: torch.Tensor
    f: torch.Tensor
    b: torch.Tensor

    def take(self, index: torch.Tensor, data: bool = True) -> "_Problem":
        return _Problem(self.cs.take(index, data), self.q[index], self.bounds[index], self.f[index], self.b[index])

    def rhs(self, lower: torch.Tensor) -> torch.Tensor:
        """The bound each row is held at when active: l where `lower`, else u."""
        return torch.where(lower, self.bounds[:, 1], self.bounds[:, 0])

    def slacks(self, Gz: torch.Tensor) -> torch.Tensor:
        return torch.where(self.f > 0, _side(Gz) * (self.bounds - Gz.unsqueeze(1)), torch.ones_like(self.bounds))


def _multiplier(P: _Problem, lam: torch.Tensor) -> torch.Tensor:
    """The row multiplier y = lam_upper - lam_lower of the live sides."""
    flam = P.f * lam
    return flam[:, 0] - flam[:, 1]


def _measure(P: _Problem, z, s, lam, nu):
    """Residuals, relative residuals (primal, dual, gap) and G^T y + A^T nu of a point.

    s need not be positive nor lam nonnegative (a polished point): negative parts count as
    primal / dual infeasibility.
    """
    cs, p, f = P.cs, nu.shape[-1], P.f
    Qz, Az, Gz = cs.products(z)
    flam = f * lam
    Gt_y, At_nu = bmtv(cs.G, _multiplier(P, lam)), bmtv(cs.A, nu) if p else torch.zeros_like(z)
    rd = Qz + P.q + Gt_y + At_nu
    rp = f * (Gz.unsqueeze(1) + _side(z) * s - P.bounds)
    re = Az - P.b
    objective = 0.5 * (z * Qz).sum(-1) + (P.q * z).sum(-1)
    fs = f * s
    # Residuals relative to the size of the terms they are made of (as OSQP does).
    scale_p = 1 + torch.stack([_inf_norm(t) for t in (Gz, fs, P.bounds, Az, P.b)]).amax(0)
    scale_d = 1 + torch.stack([_inf_norm(t) for t in (Qz, P.q, Gt_y, At_nu)]).amax(0)
    pri = torch.stack([_inf_norm(rp), _inf_norm(re), _inf_norm(fs.clamp(max=0))]).amax(0) / scale_p
    dual = torch.maximum(_inf_norm(rd), _inf_norm(flam.clamp(max=0))) / scale_d
    gap = (fs * lam).abs().flatten(1).sum(-1) / (1 + objective.abs())
    return rd, rp, re, pri, dual, gap, Gt_y + At_nu


def _farkas(P: _Problem, z, lam, nu, pri, y_res, tol):
    """The duals approach a certificate (lam >= 0, nu): G^T y + A^T nu = 0 and
    u^T lam_0 - l^T lam_1 + b^T nu < 0.

    Any feasible z0 has that value >= -|z0|_1 |G^T y + A^T nu|_inf, so the test proves there is
    no feasible point within 1000 times the size of the current iterate.
    """
    flam = P.f * lam
    y_norm = flam.flatten(1).sum(-1) + nu.abs().sum(-1)
    cert_res = _inf_norm(y_res) / y_norm
    cert_obj = ((_side(z) * P.bounds * flam).flatten(1).sum(-1) + (P.b * nu).sum(-1)) / y_norm
    return (
        (pri > tol)
        & (cert_obj < -1e-6 * (1 + torch.maximum(_inf_norm(P.bounds), _inf_norm(P.b))))
        & (1e3 * (1 + z.abs().sum(-1)) * cert_res < -cert_obj)
    )


def _barrier_weights(P: _Problem, s, lam) -> torch.Tensor:
    """D (B, m) of the Newton system: 1 / (sum over live sides of lam / s)."""
    return 1.0 / (P.f * lam / s).sum(1)


def _newton_direction(F: ReducedFactor, P: _Problem, part, s, lam, rp, rc):
    """Solve the linearised KKT system for (ds, dlam, dy) given the residuals.

    rd = Qz + q + G^T y + A^T nu, rp_k = G z + SIDE_k s_k - bound_k, re = Az - b,
    rc_k = s_k lam_k - target. Eliminating ds_k = -(rc_k + s_k dlam_k) / lam_k gives
    dlam_k = SIDE_k w_k (G dz + rp_k - SIDE_k rc_k / lam_k) with w_k = lam_k / s_k, so
    dy = sum_k SIDE_k dlam_k = W G dz + r (W = w_0 + w_1, r = sum_k w_k (rp_k - SIDE_k rc_k / lam_k)): the system of `ift.optnet.kkt` with D = 1 / W and
    right-hand side -r / W. `part` is its projection of (-rd, -re), shared by predictor and
    corrector; dz and dnu (`F.lift` of dy) are only needed for the corrector.
    """
    side, w = _side(s), P.f * lam / s
    shifted = rp - side * rc / lam
    r = (w * shifted).sum(1)
    D = 1.0 / w.sum(1)
    dy = F.solve_g(part, -D * r)
    Gdz = D * (dy - r)
    dlam = side * w * (Gdz.unsqueeze(1) + shifted)
    ds = P.f * (-rc - s * dlam) / lam
    return ds, dlam, dy


def _point(P: _Problem, z, y, Gz, active, lower):
    """(z, s, lam, nu)-style slacks and multipliers of an active-set solution with row multipliers y."""
    upper = active & ~lower
    lam = torch.stack([torch.where(upper, y, 0.0), torch.where(lower, -y, 0.0)], 1)
    return P.slacks(Gz), torch.where(P.f > 0, lam, torch.ones_like(lam))


def _equality_solve(P: _Problem, active: torch.Tensor, lower: torch.Tensor, refine: bool = True, start=None):
    """Solve the KKT system with the constraints in `active` as equalities (at l where `lower`,
    else at u), the others dropped.

    Returns the factor and the point (z, s, lam, nu); it is the QP's exact solution iff the
    dropped constraints hold and the kept multipliers have the sign of their side (`_measure`
    checks both). `start` = (factor, point) refines an unrefined solve of the same active set.
    """
    F = ReducedFactor.active_set(P.cs, active) if start is None else start[0]
    active = F.active()
    d = F.to_slots(P.rhs(lower))
    if not refine:
        z, nu, y, Gz = F.solve_and_Gx(-P.q, P.b, d)
    else:
        z0 = None if start is None else (start[1][0], start[1][3], F.to_slots(_multiplier(P, start[1][2])))
        z, nu, y = F.solve(-P.q, P.b, d, refine=True, start=z0)
        Gz = bmv(F.cs.G, z)
    s, lam = _point(P, z, F.from_slots(y), Gz, active, lower)
    return F, (z, s, lam, nu)


def _guess(P: _Problem, score: torch.Tensor, cap: bool = False):
    """Active rows and which of them sit at their lower bound, from per-side scores (> 0: active);
    with `cap`, at most n - p rows (the best scores), or None if no set can have more."""
    live = (score > 0) & (P.f > 0)
    up, lo = live[:, 0], live[:, 1]
    lower = lo & (~up | (score[:, 1] > score[:, 0]))
    active = up | lo
    if not cap:
        return active, lower
    width = P.q.shape[1] - P.b.shape[1]
    if not 0 < width < active.shape[-1]:
        return None
    row = torch.where(active, torch.where(lower, score[:, 1], score[:, 0]), -float("inf"))
    active = active & (row >= torch.topk(row, width, dim=-1).values[:, -1:])
    return active, lower & active


def _point_guess(P: _Problem, point):
    """Primal-dual active-set step: keep rows whose multiplier has its side's sign, add violated ones."""
    _, s, lam, _ = point
    return _guess(P, _side(s) * _multiplier(P, lam).unsqueeze(1) - s)


def _kkt_ok(res, tol):
    return (res[0] <= tol) & (res[1] <= tol) & (res[2] <= tol)


def _polish(P: _Problem, active: torch.Tensor, lower: torch.Tensor, tol: float, corrections: int = 3):
    """Exact solve on the active set guessed from an interior point iterate, verified.

    The guess is corrected by primal-dual active-set steps (`_point_guess`) until the set stops
    changing (at most `corrections` times); these steps only need signs, so they use unrefined
    solves. The last set of each example is then solved to full precision and verified. Returns
    the factors, lower-side masks and points per example, their relative residuals, and whether
    each satisfies the KKT conditions to `tol`.
    """
    F, point = _equality_solve(P, active, lower, refine=False)
    for _ in range(corrections):
        guess, guess_lower = _point_guess(P, point)
        bad = ((guess != F.active()) | (guess_lower != lower)).any(-1).nonzero().squeeze(-1)
        if not bad.numel():
            break
        Fb, point_b = _equality_solve(P.take(bad, data=False), guess[bad], guess_lower[bad], refine=False)
        F, lower = F.replace(bad, Fb), lower.index_copy(0, bad, guess_lower[bad])
        point = tuple(t.index_copy(0, bad, tb) for t, tb in zip(point, point_b))
    F, point = _equality_solve(P, None, lower, start=(F, point))
    res = _measure(P, *point)[3:6]
    ok = _kkt_ok(res, tol)
    # Unrefined signs can be off for a nearly weakly active row: one more step from the refined
    # point where it fails the check or asks for another set (a kept multiplier slightly below 0
    # can pass a loose tol), kept where it is better.
    guess, guess_lower = _point_guess(P, point)
    bad = (~ok | ((guess != F.active()) | (guess_lower != lower)).any(-1)).nonzero().squeeze(-1)
    if bad.numel():
        Pb = P.take(bad)
        Fb, point_b = _equality_solve(Pb, guess[bad], guess_lower[bad])
        res_b = _measure(Pb, *point_b)[3:6]
        ok_b = _kkt_ok(res_b, tol)
        better = ok_b | ~ok[bad]
        lower_b = guess_lower[bad][better]
        bad, Fb = bad[better], Fb.take(better)
        point = tuple(t.index_copy(0, bad, tb[better]) for t, tb in zip(point, point_b))
        res = tuple(t.index_copy(0, bad, tb[better]) for t, tb in zip(res, res_b))
        ok = ok.index_copy(0, bad, ok_b[better])
        F, lower = F.replace(bad, Fb), lower.index_copy(0, bad, lower_b)
    return F, lower, point, res, ok


# The first polish is tried once the interior point's relative residuals and gap are below
# FIRST_POLISH; a failed attempt is retried after they dropped by RETRY_FACTOR. Measured on the
# benchmark's problems (n = 100): the guessed active set is right for few examples at 1e-3,
# after one or two active-set corrections for nearly all, saving 2 of ~9.5 iterations; first
# attempts at 1e-2 or 1e-4 were no faster.
FIRST_POLISH = 1e-3
RETRY_FACTOR = 0.1
STALL_STEP = 1e-8


class _Result:
    """Per-example outputs of `_solve`, filled as examples finish, and their active-set factors."""

    def __init__(self, P: _Problem):
        B, _, m = P.bounds.shape
        n, p = P.q.shape[1], P.b.shape[1]
        new = lambda *shape, dtype=P.q.dtype: torch.zeros(*shape, dtype=dtype, device=P.q.device)  # noqa: E731
        self.z, self.lam, self.nu, self.s = new(B, n), new(B, 2, m), new(B, p), new(B, 2, m)
        self.lower = new(B, m, dtype=torch.bool)  # active rows held at their lower bound
        self.status = new(B, dtype=torch.long)
        self.iterations = new(B, dtype=torch.long)
        self.pri, self.dual, self.gap = new(B), new(B), new(B)
        self.idx, self.valid = new(B, m, dtype=torch.long), new(B, m, dtype=torch.bool)
        self.L = torch.eye(m, dtype=P.cs.T.dtype, device=P.q.device).repeat(B, 1, 1)  # padding: identity

    def store(self, rows, F: ReducedFactor, sel, **values):
        """values: z, lam and s (B, 2, m), nu, lower, status, ... of `rows`."""
        for name, v in values.items():
            getattr(self, name)[rows] = v
        k = F.idx.shape[1]
        self.idx[rows, :k], self.valid[rows, :k] = F.idx[sel], F.valid[sel]
        self.L[rows, :k, :k] = F.L[sel]


@dataclass
class _Iterate:
    """Interior point state of the examples in the batch; `take` keeps some of them."""

    z: torch.Tensor
    s: torch.Tensor
    lam: torch.Tensor
    nu: torch.Tensor
    iters: torch.Tensor  # steps taken
    left: torch.Tensor  # steps still allowed
    live: torch.Tensor  # each example's row in the output
    next_try: torch.Tensor  # residual level of the next polish attempt
    broken: torch.Tensor  # the last Newton step was not finite
    gone: torch.Tensor  # finished, still in the batch until enough of them are
    step: torch.Tensor  # length of the last step

    def take(self, keep: torch.Tensor) -> "_Iterate":
        return _Iterate(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})


@dataclass
class _Predictor:
    """An iteration's Newton factor, its projection of the residuals and the affine direction."""

    F: ReducedFactor
    part: tuple
    rp: torch.Tensor
    ds: torch.Tensor
    dlam: torch.Tensor

    def take(self, keep: torch.Tensor, cs: ConstraintSpace) -> "_Predictor":
        part = tuple(None if t is None else t[keep] for t in self.part)
        return _Predictor(ReducedFactor(cs, self.F.L[keep]), part, self.rp[keep], self.ds[keep], self.dlam[keep])


def _initial_iterate(P: _Problem, max_iter: int, near_tol: float, start, left) -> _Iterate:
    """The starting point; examples with steps in `start` continue from their iterate there."""
    # Start from the solution of the problem with unit barrier weights pulling G z to its bound
    # (the middle of two finite ones), then shift s, lam > 0.
    target = (P.f * P.bounds).sum(1) / P.f.sum(1)
    ones = torch.ones_like(target)
    z, nu, _ = ReducedFactor.barrier(P.cs, ones).solve(-P.q, P.b, target)
    s = P.slacks(bmv(P.cs.G, z))
    s, lam = _shift_positive(s, P.f), _shift_positive(-s, P.f)
    iters = torch.zeros(ones.shape[0], dtype=torch.long, device=ones.device)
    if start is not None:
        warm = start[-1] > 0
        z, s, lam, nu, iters = (torch.where(warm.view(-1, *[1] * (t.dim() - 1)), t0, t)
                                for t0, t in zip(start, (z, s, lam, nu, iters)))
    left = max_iter - iters if left is None else torch.minimum(left, max_iter - iters)
    live = torch.arange(ones.shape[0], device=ones.device)
    broken = torch.zeros_like(live, dtype=torch.bool)
    return _Iterate(z, s, lam, nu, iters, left, live, next_try=torch.full_like(ones[:, 0], near_tol),
                    broken=broken, gone=torch.zeros_like(broken), step=torch.ones_like(ones[:, 0]))


def _predictor(F: ReducedFactor, P: _Problem, x: _Iterate, rd, rp, re) -> _Predictor:
    """The affine scaling direction (it aims at s * lam = 0)."""
    part = F.project(-rd, -re)
    ds, dlam, _ = _newton_direction(F, P, part, x.s, x.lam, rp, P.f * x.s * x.lam)
    return _Predictor(F, part, rp, ds, dlam)


def _status_codes(ok: torch.Tensor, stops: dict) -> torch.Tensor:
    """QPStatus of attempted examples: CONVERGED where the polish was verified, else the status of
    the `stops` flag that holds (the later one where several do), else MAX_ITER."""
    code = torch.full_like(ok, int(QPStatus.MAX_ITER), dtype=torch.long)
    for status, flag in stops.items():
        code[flag] = int(status)
    code[ok] = int(QPStatus.CONVERGED)
    return code


def _polish_and_store(out: _Result, exact: _Problem, x: _Iterate, a, guess, done, stops: dict, measured, tol,
                      capped=None):
    """Polish the attempted examples `a` (guess: active and lower masks); those verified, or done
    anyway, are stored in `out` (the polished point where it was verified, else the iterate) and
    marked gone. `capped`: the guess cut to n - p rows, tried where the first polish fails."""
    Pa = exact.take(x.live[a])
    Fa, lower, point, res, ok = _polish(Pa, guess[0][a], guess[1][a], tol)
    if capped is not None:
        # More than n - p active rows (p independent equalities) over-determine z unless some
        # are duplicates: a vertex plus a nearly weakly active row gives a least-squares
        # compromise that satisfies none of them and sends the corrections astray (a trained
        # Sudoku model: 25 bounds guessed where 24 are active). Where the polish failed with
        # such a set, the n - p best-scored rows get their own polish, once the example is about
        # to be returned as its iterate (earlier, on the hard benchmark's duplicated rows, the
        # retries failed as well and cost 20% of the time).
        retry = (~ok & done[a] & (capped[0][a] != guess[0][a]).any(-1)).nonzero().squeeze(-1)
        if retry.numel():
            Fr, lower_r, point_r, res_r, ok_r = _polish(Pa.take(retry), capped[0][a][retry], capped[1][a][retry], tol)
            keep = ok_r.nonzero().squeeze(-1)
            rows = retry[keep]
            Fa, lower = Fa.replace(rows, Fr.take(keep)), lower.index_copy(0, rows, lower_r[keep])
            point = tuple(t.index_copy(0, rows, tr[keep]) for t, tr in zip(point, point_r))
            res = tuple(t.index_copy(0, rows, tr[keep]) for t, tr in zip(res, res_r))
            ok = ok.index_copy(0, rows, ok_r[keep])
    zp, sp, lamp, nup = point
    ppri, pdual, pgap = res
    ok &= ~stops[QPStatus.INFEASIBLE][a]
    fin = ok | done[a]
    code = _status_codes(ok, {status: flag[a] for status, flag in stops.items()})
    iterate = (fin & ~ok).nonzero().squeeze(-1)
    if iterate.numel():
        # Returned as the interior point iterate (its polish failed): the backward then uses the
        # iterate's own active set {lam > s}, not the failed polish's last set, which the
        # corrections can have driven anywhere (a trained Sudoku model: 28 rows where 24 are
        # active, with a rank-deficient system and multipliers of -2e9).
        Pi = Pa.take(iterate)
        act, act_lower = _guess(Pi, (x.lam - x.s)[a[iterate]])
        Fa = Fa.replace(iterate, ReducedFactor.active_set(Pi.cs, act))
        lower = lower.index_copy(0, iterate, act_lower)

    def pick(polished, iterate):
        iterate = iterate.to(polished.dtype)
        return torch.where(ok.view(-1, *[1] * (iterate.dim() - 1)), polished, iterate)[fin]

    pri, dual, gap = measured
    out.store(
        x.live[a[fin]], Fa, fin,
        z=pick(zp, x.z[a]), lam=pick(lamp.clamp_min(0), x.lam[a]), nu=pick(nup, x.nu[a]), s=pick(sp.clamp_min(0), x.s[a]), lower=lower[fin],
        status=code[fin], iterations=x.iters[a[fin]],
        pri=pick(ppri, pri[a]), dual=pick(pdual, dual[a]), gap=pick(pgap, gap[a]),
    )
    x.gone[a[fin]] = True


def _corrector_step(x: _Iterate, d: _Predictor, P: _Problem) -> None:
    """Mehrotra's centred corrector (same factor as the predictor), then 0.99 of the longest step
    keeping s, lam >= 0; finished examples and non-finite directions take no step."""
    s, lam, f = x.s, x.lam, P.f
    sides = f.flatten(1).sum(-1).view(-1, 1, 1)
    mu = (f * s * lam).flatten(1).sum(-1).view(-1, 1, 1) / sides
    alpha = torch.minimum(_max_step(s, d.ds), _max_step(lam, d.dlam)).view(-1, 1, 1)
    mu_aff = (f * (s + alpha * d.ds) * (lam + alpha * d.dlam)).flatten(1).sum(-1).view(-1, 1, 1) / sides
    sigma = (mu_aff / mu).clamp(0.0, 1.0) ** 3
    rc = f * (s * lam + d.ds * d.dlam - sigma * mu)
    ds, dlam, dy = _newton_direction(d.F, P, d.part, s, lam, d.rp, rc)
    dz, dnu, _ = d.F.lift(d.part, dy)
    alpha = (0.99 * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp(max=1.0)

    finite = lambda t: t.flatten(1).isfinite().all(-1)  # noqa: E731
    x.broken = ~torch.stack([finite(t) for t in (dz, ds, dlam, dnu)]).all(0) & ~x.gone
    alpha = torch.where(x.broken | x.gone, torch.zeros_like(alpha), alpha)
    x.step = alpha
    alpha = alpha.unsqueeze(-1)
    x.z = x.z + alpha * torch.nan_to_num(dz)
    x.s = s + alpha.unsqueeze(-1) * torch.nan_to_num(ds)
    x.lam = lam + alpha.unsqueeze(-1) * torch.nan_to_num(dlam)
    x.nu = x.nu + alpha * torch.nan_to_num(dnu)
    x.iters += (~x.broken & ~x.gone).long()


def _guesses(P: _Problem, x: _Iterate, score, done, warm):
    """The active set to polish from `score` and its version capped at n - p rows; with `warm`
    (the previous solution's masks), that set on the examples not done, and no capped one."""
    guess = _guess(P, score)
    if warm is None:
        return guess, _guess(P, score, cap=True)
    return tuple(torch.where(done.unsqueeze(-1), g, w[x.live]) for g, w in zip(guess, warm)), None


@torch.no_grad()
def _solve(P: _Problem, exact: _Problem, tol: float, max_iter: int, iter_tol: float | None = None,
           start=None, left=None, warm=None) -> _Result:
    """Mehrotra predictor-corrector; every example stops as soon as it is solved (crossover).

    The interior point iterates on `P` (possibly float32); the polish solves and verifies on
    `exact`, the same problems (possibly float64 data with float32 factors, see
    `ConstraintSpace.with_data`). Once an example's residuals fall below FIRST_POLISH (then
    again after each RETRY_FACTOR drop), or it stops for any other reason, its active set
    {lam > s} is solved exactly and corrected (`_polish`); a polished point that satisfies the
    KKT conditions to `tol` is returned as CONVERGED, whatever the interior point's own
    residuals. Otherwise the example iterates on, and finishes with the interior point's status
    (CONVERGED when its residuals reach `iter_tol` <= `tol`, STALLED, MAX_ITER, ...; an
    iteration in a lower precision stops at `iter_tol` > `tol` as MAX_ITER, for the caller to
    redo). Finished examples leave the batch once they are a quarter of it. `start` = (z, s, lam,
    nu, iterations) continues from the interior iterates of examples that already took steps
    (the others start afresh); `left` caps each example's steps below what `max_iter` leaves.
    `warm` = (active, lower) masks of a previous solution: its active set is polished before the
    first step, and where it verifies the example is solved with 0 interior point steps.
    """
    out = _Result(exact)
    iter_tol = tol if iter_tol is None else iter_tol
    x = _initial_iterate(P, max_iter, max(iter_tol, FIRST_POLISH), start, left)
    for it in range(max_iter + 1):
        rd, rp, re, pri, dual, gap, y_res = _measure(P, x.z, x.s, x.lam, x.nu)
        tight = (pri <= iter_tol) & (dual <= iter_tol) & (gap <= iter_tol)
        level = torch.stack([pri, dual, gap]).amax(0)
        infeasible = ~tight & _farkas(P, x.z, x.lam, x.nu, pri, y_res, iter_tol)
        stalled = ~tight & ~infeasible & (x.step < STALL_STEP)
        done = tight | infeasible | stalled | x.broken | (it >= x.left)
        attempt = (done | (level <= x.next_try)) & ~x.gone
        warm_now = it == 0 and warm is not None
        if warm_now:
            attempt = attempt | ~x.gone
        # The Newton matrix of this iteration is factorised before the one host read of the
        # iteration, which asks both whether some example is due a polish and whether some
        # factorisation failed (issue 15: no further synchronisation in a plain iteration).
        last = it == max_iter  # every example is done: no further step
        F, failed = (None, torch.zeros_like(x.gone)) if last else ReducedFactor.barrier_unchecked(
            P.cs, _barrier_weights(P, x.s, x.lam))
        any_attempt, any_failed = torch.stack([attempt.any(), failed.any()]).tolist()
        if any_failed:
            F = F.repaired(failed)
        pred = None if last else _predictor(F, P, x, rd, rp, re)
        if any_attempt:
            # The full predictor step aims at s * lam = 0: its sign pattern guesses the active set
            # better than the iterate's (benchmark, n = 100, residuals 1e-3: the guess was exact or
            # one row off for 60% of the examples, against 20% with lam > s)
            score = (x.lam - x.s) if last else (x.lam + pred.dlam - x.s - pred.ds)
            guess, capped = _guesses(P, x, score, done, warm if warm_now else None)
            stops = {  # a later flag's status wins where several hold
                QPStatus.STALLED: stalled, QPStatus.NUMERICAL_ERROR: x.broken, QPStatus.INFEASIBLE: infeasible,
                QPStatus.CONVERGED: tight if iter_tol <= tol else torch.zeros_like(tight),
            }
            a = attempt.nonzero().squeeze(-1)
            _polish_and_store(out, exact, x, a, guess, done, stops, (pri, dual, gap), tol, capped)
            if not warm_now:
                x.next_try = torch.where(attempt, level * RETRY_FACTOR, x.next_try)
            n_gone = int(x.gone.sum())
            if n_gone == x.gone.numel():
                break
            # Drop finished examples from the batch once they are a quarter of it: copying the
            # problem data costs about as much as carrying a few finished examples along.
            if 4 * n_gone >= x.gone.numel():
                keep = ~x.gone
                x, P = x.take(keep), P.take(keep)
                pred = pred.take(keep, P.cs)
        _corrector_step(x, pred, P)
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


def _mixed_constraint_space(data64, data32, batch, refine_steps):
    """Constraint spaces for mixed precision from Q, G, A in float64 and in float32.

    Returns the float64 data with float32 factors (the crossover's, see
    `ConstraintSpace.with_data`), the all-float32 one (the interior point's), the float64 one if
    it was built (else None), and which examples float32 iteration cannot handle: A Q^-1 A^T
    (nearly) singular, i.e. redundant equalities, whose shifted factor amplifies float32
    rounding by 1 / its smallest pivot.
    """
    (Q, G, A), (Q32, G32, A32) = data64, data32
    loop = cs64 = None
    if A.shape[-2] == 0:  # T = G Q^-1 G^T: float32 arithmetic gives it to ~1e-6 relative
        try:
            loop = _constraint_space(Q32, G32, A32, batch)
        except ValueError:  # Q too ill-conditioned for a float32 Cholesky: decide in float64
            pass
    fragile = torch.zeros(batch, dtype=torch.bool, device=Q.device)
    if loop is None:
        # With equalities T = G Q^-1 G^T - X^T X cancels in float32 arithmetic (an error of ~30%
        # of the active block's smallest eigenvalue at n = 100, p = 50, against ~4e-5 when it is
        # computed in float64 and rounded): build in float64, iterate on the rounded factors.
        cs64 = _constraint_space(Q, G, A, batch)
        factors = (None if t is None else t.float() for t in cs64.factors())
        loop = ConstraintSpace(*(_batched(t, 2, batch) for t in (Q32, A32, G32)), *factors)
        if cs64.LA is not None:
            pivots = cs64.LA.diagonal(dim1=-2, dim2=-1)
            fragile = (pivots.amin(-1) / pivots.amax(-1)) ** 2 < FLOAT32_MIN_PIVOT_RATIO
    exact = loop.with_data(*(_batched(t, 2, batch) for t in (Q, A, G)), refine_steps)
    return exact, loop, cs64, fragile


# Mixed precision: the float32 interior point stops at this relative residual level (about where
# float32 rounding stops its progress), whatever `tol`, and after FLOAT32_MAX_ITER steps; the
# float64 polish decides, or float64 iteration carries on. Examples whose A Q^-1 A^T has a
# squared pivot ratio below FLOAT32_MIN_PIVOT_RATIO iterate in float64 from the start (random A
# on the benchmark: >= 1e-2; the 64 Sudoku constraints of rank 40: 8e-11).
ITER_TOL_FLOAT32 = 1e-5
FLOAT32_MAX_ITER = 20
FLOAT32_MIN_PIVOT_RATIO = 1e-4
# ... and the float64 continuation stops at this level (or tol, if lower).
FLOAT64_ITER_TOL = 1e-9


# A certified solution with an inequality whose slack and multiplier are both below this many
# times tol (relative to 1 + |bounds|, 1 + |q| of the scaled problem) is DEGENERATE: the exact
# solution cannot tell whether that constraint is active, and the gradient picks one side.
DEGENERATE_FACTOR = 100.0


def _flag_degenerate(r: _Result, P: _Problem, tol: float) -> None:
    thr = DEGENERATE_FACTOR * tol
    small_s = r.s <= thr * (1 + _inf_norm(P.bounds)).view(-1, 1, 1)
    small_lam = r.lam <= thr * (1 + _inf_norm(P.q)).view(-1, 1, 1)
    interval = ~((P.f[:, 0] * P.f[:, 1] > 0) & (P.bounds[:, 0] == P.bounds[:, 1]))  # l = u: an equality
    weak = ((P.f > 0) & small_s & small_lam & interval.unsqueeze(1)).flatten(1).any(-1)
    r.status[(r.status == QPStatus.CONVERGED) & weak] = int(QPStatus.DEGENERATE)


def _forward(Q, q, G, h, A, b, lo, warm, batch, tol, max_iter, precision):
    """Solve the batch (no autograd): the `_Result` (verified where CONVERGED / DEGENERATE), the
    exact problem and the `_KKTAdjoint` holding the factors of the returned active sets."""
    exact_dtype = q.dtype if precision == "input" else torch.float64
    symmetric = torch.equal(Q, Q.transpose(-1, -2))  # the common case: no symmetrised copy
    inputs = (Q, G, A)
    lo = torch.full_like(h, -float("inf")) if lo is None else lo
    Q, q, G, h, A, b, lo = (t.to(exact_dtype) for t in (Q, q, G, h, A, b, lo))
    Qs = Q if symmetric else 0.5 * (Q + Q.transpose(-1, -2))  # the objective only sees Q's symmetric part
    bounds = torch.stack([_batched(h, 1, batch), _batched(lo, 1, batch)], 1)
    live = torch.isfinite(bounds)
    vectors = [_batched(q, 1, batch), torch.where(live, bounds, 0.0), live.to(exact_dtype), _batched(b, 1, batch)]
    if precision == "mixed":
        data32 = (inputs[0] if symmetric else Qs, *inputs[1:])
        cs, loop_cs, cs64, fragile = _mixed_constraint_space(
            (Qs, G, A), [t.float() for t in data32], batch, 3 if inputs[0].dtype == torch.float64 else 2)
        exact = _Problem(cs, *vectors)
        loop = _Problem(loop_cs, *(t.float() for t in vectors))
        left = torch.where(fragile, 0, min(max_iter, FLOAT32_MAX_ITER))
        r = _solve(loop, exact, tol, max_iter, iter_tol=max(tol, ITER_TOL_FLOAT32), left=left, warm=warm)
    else:
        cs = _constraint_space(Qs, G, A, batch)
        exact = _Problem(cs, *vectors)
        r = _solve(exact, exact, tol, max_iter, warm=warm)
    redo = None
    if precision == "mixed":
        rows = (r.status != QPStatus.CONVERGED).nonzero().squeeze(-1)
        if rows.numel():  # what float32 iteration did not finish goes on in float64
            redo = _continue_in_float64(r, rows, cs64, Qs, G, A, [t[rows] for t in vectors], batch, tol, max_iter)
    _flag_degenerate(r, exact, tol)
    return r, exact, _KKTAdjoint(ReducedFactor(cs, r.L, r.idx, r.valid), redo, symmetric)


class _KKTAdjoint:
    """The backward's linear solve, supplied to the implicit core (`SuppliedSolve`): the adjoint
    system of `_kkt_residual`, [Q C^T; C 0] (u, v) = (g_z, g_C) on the active rows and v = g_y on
    the others, solved with the forward's active-set factor (and the float64 factors of the
    examples that `_continue_in_float64` redid), refined as the polish's solves are."""

    def __init__(self, factor: ReducedFactor, redo, symmetric: bool):
        self.factor, self.redo, self.symmetric = factor, redo, symmetric  # symmetric: Q = Q^T exactly
        self.act = factor.active()
        if redo is not None:
            self.act[redo[0]] = redo[1].active()

    def solve(self, v: torch.Tensor, refine: bool = True) -> torch.Tensor:
        u = self._solve(self.factor, self.act, v, refine)
        if self.redo is not None:
            rows, F = self.redo
            u[rows] = self._solve(F, self.act[rows], v[rows], refine)
        return u

    def correct(self, r: torch.Tensor) -> torch.Tensor:
        """One unrefined solve: the core's refinement step from its verified residual r."""
        return self.solve(r, refine=False)

    @staticmethod
    def _solve(F: ReducedFactor, act, v, refine):
        n, m = v.shape[-1] - act.shape[-1] - F.p, act.shape[-1]
        vz, vy, vnu = v[:, :n], v[:, n:n + m], v[:, n + m:]
        uz, unu, uy = F.solve(vz, vnu, F.to_slots(vy), refine=refine)
        return torch.cat([uz, F.from_slots(uy) + torch.where(act, 0.0, vy), unu], -1)


def _kkt_residual(x, Q, q, G, h, A, b, lo, act, lower, symmetric):
    """The KKT conditions of the returned active set at x = (z, y, nu), the root the implicit core
    differentiates: stationarity Q_s z + q + G^T y + A^T nu (Q_s = (Q + Q^T) / 2, the part the
    objective sees), G_i z - bound_i on the active rows (bound l_i where `lower`, else h_i), y_i on
    the others (their multipliers stay 0: OptNet's differentiation with the inactive rows dropped)
    and A z - b. Its Jacobian in x is the symmetric [Q_s C^T; C 0] (identity on inactive rows).

    The value and its x-derivative come from the plain products with the data detached; the
    derivative in the data is added by `_DataPartials` (zero in value), in closed form."""
    data = (Q, q, G, h, A, b, lo)
    detached = [None if t is None else t.detach().to(x.dtype) for t in data]
    return _kkt_value(x, *detached, act, lower, symmetric) + _DataPartials.apply(x.detach(), act, lower, *data)


def _split(x: torch.Tensor, n: int, m: int):
    return x[:, :n], x[:, n:n + m], x[:, n + m:]


def _kkt_value(x, Q, q, G, h, A, b, lo, act, lower, symmetric):
    z, y, nu = _split(x, q.shape[-1], h.shape[-1])
    Qz = bmv(Q, z) if symmetric else 0.5 * (bmv(Q, z) + bmtv(Q, z))
    stationarity = Qz + q + bmtv(G, torch.where(act, y, 0.0)) + bmtv(A, nu)
    bound = h if lo is None else torch.where(lower, lo, h)
    return torch.cat([stationarity, torch.where(act, bmv(G, z) - bound, y), bmv(A, z) - b], -1)


class _DataPartials(torch.autograd.Function):
    """Zero in value; its vector-Jacobian product is w -> (dF/d data)^T w of `_kkt_residual` at
    fixed x, in closed form: one rank-2 product per matrix (F is bilinear in x and the data), summed
    over the batch for a shared argument. Autograd's outer products and accumulations of the same
    terms cost a backward ~20 ms more (81 against 62 ms at n = 100, batch 128, float64)."""

    @staticmethod
    def forward(x, act, lower, *data):
        return torch.zeros_like(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, act, lower, *data = inputs
        ctx.save_for_backward(x, act, lower)
        ctx.n = data[1].shape[-1]
        ctx.kinds = [None if t is None else (t.dim() == rank + 1, t.dtype) for t, rank in zip(data, _DATA_RANKS)]

    @staticmethod
    def backward(ctx, w):
        x, act, lower = ctx.saved_tensors
        return (None, None, None, *_data_vjp(x, w, act, lower, ctx.n, ctx.kinds))


_DATA_RANKS = (2, 1, 2, 1, 2, 1, 1)  # Q, q, G, h, A, b, lower unbatched


def _data_vjp(x, w, act, lower, n, kinds):
    """<w, dF/d data> of `_kkt_residual` for Q, q, G, h, A, b, lower; `kinds`: (batched, dtype) of
    each argument (None for an absent lower), a shared argument's gradient summed over the batch."""
    m = act.shape[-1]
    z, y, nu = _split(x, n, m)
    wz, wy, wnu = _split(w, n, m)
    y, wy = torch.where(act, y, 0.0), torch.where(act, wy, 0.0)
    zw = torch.stack([wz, z], dim=-1)  # (B, n, 2)
    grads = (
        _rank2(0.5 * zw, torch.stack([z, wz], dim=-2), kinds[0][0]),  # Q: (w_z z^T + z w_z^T) / 2
        wz,  # q
        _rank2(torch.stack([y, wy], dim=-1), zw.transpose(-1, -2), kinds[2][0]),  # G: y w_z^T + w_y z^T
        -wy.masked_fill(lower, 0.0),  # h: the upper bound of the active rows held there
        _rank2(torch.stack([nu, wnu], dim=-1), zw.transpose(-1, -2), kinds[4][0]),  # A: nu w_z^T + w_nu z^T
        -wnu,  # b
        -wy.masked_fill(~lower, 0.0),  # lower bounds
    )
    out = []
    for g, kind, rank in zip(grads, kinds, _DATA_RANKS):
        if kind is not None and not kind[0] and g.dim() > rank:
            g = g.sum(0)  # (the matrices' _rank2 sums already)
        out.append(None if kind is None else g.to(kind[1]))
    return out


def _rank2(a, b, batched: bool):
    """a @ b per example (a: (B, r, 2), b: (B, 2, c)), or its sum over the batch as one product."""
    if batched:  # two broadcast products: a bmm with inner size 2 was ~2x slower on CPU
        out = a[..., :1] * b[..., :1, :]
        return out.addcmul_(a[..., 1:], b[..., 1:, :])
    batch, rows, k = a.shape  # explicit sizes: -1 is ambiguous when rows = 0 (an empty shared A)
    return a.transpose(0, 1).reshape(rows, batch * k) @ b.reshape(batch * k, b.shape[-1])


ADJOINT_MAX_SOLVES = 4


def _attach(r: _Result, y: torch.Tensor, adjoint: _KKTAdjoint, data) -> torch.Tensor:
    """z on the autograd graph: the implicit core differentiates `_kkt_residual` at (z, y, nu),
    its adjoint solve being the forward's factor (`_KKTAdjoint`), verified by one product with
    the KKT matrix and reported like any backward solve (an unverified solve warns)."""
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in data)):
        return r.z
    x = torch.cat([r.z, y, r.nu], -1)
    x = implicit_root(_kkt_residual, x, *data, adjoint.act, r.lower, adjoint.symmetric, batch_dims=1,
                      linear_solver=SuppliedSolve(adjoint.solve, max_iter=ADJOINT_MAX_SOLVES, correct=adjoint.correct))
    return x[:, : r.z.shape[-1]]


def _qp_function(Q, q, G, h, A, b, lo, warm, batch, tol, max_iter, precision):
    """Solve and attach z to the graph; returns z, y, nu, both slacks and the statistics."""
    with torch.no_grad():
        r, exact, adjoint = _forward(Q, q, G, h, A, b, lo, warm, batch, tol, max_iter, precision)
    y = _multiplier(exact, r.lam)
    z = _attach(r, y, adjoint, (Q, q, G, h, A, b, lo))
    slacks = torch.where(exact.f > 0, r.s, float("inf"))
    outs = [t.to(q.dtype) for t in (z, y, r.nu, slacks[:, 0], slacks[:, 1])]
    return *outs, r.status, r.iterations, *(t.to(q.dtype) for t in (r.pri, r.dual, r.gap))


def _continue_in_float64(r: _Result, rows, cs64, Q, G, A, vectors, batch, tol, max_iter):
    """Iterate on in float64 from the last iterates of the examples `rows` (with the iterations
    they have left), write the results into `r`; return the rows and their float64 factor."""
    if cs64 is None:
        cs = _constraint_space(*(_batched(t, 2, batch)[rows] for t in (Q, G, A)), rows.numel())
    else:
        cs = cs64.take(rows)
    P = _Problem(cs, *vectors)
    start = (*(getattr(r, k)[rows] for k in ("z", "s", "lam", "nu")), r.iterations[rows])
    # Iterate to float64's own tolerance even for float32 outputs (tol 1e-7): the polish still
    # verifies at tol, but it gets the retries of the further residual drops, and an example whose
    # polish keeps failing is returned as an iterate whose error is that much smaller (a trained
    # Sudoku model, float32: an iterate stopped at 1e-7 was 4.6e-4 off the exact z).
    r64 = _solve(P, P, tol, max_iter, iter_tol=min(tol, FLOAT64_ITER_TOL), start=start)
    for name in ("z", "lam", "nu", "s", "lower", "status", "iterations", "pri", "dual", "gap"):
        getattr(r, name)[rows] = getattr(r64, name)
    return rows, ReducedFactor(cs, r64.L, r64.idx, r64.valid)


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
    precision: str = "mixed",
    lower: torch.Tensor | None = None,
    relax: float | None = None,
    warm_start: QPSolution | None = None,
) -> QPSolution:
    """Solve a batch of QPs and return primal, duals, status and residuals (see `solve_qp`).

    With `strict=True` an infeasible example raises `QPInfeasibleError`; otherwise it is reported
    in `status` and its last iterate returned (never NaN). With `relax=rho` (e.g. 1e6) the
    infeasible examples are solved again as the l2-penalised elastic relaxation (`_relaxed`),
    differentiably, and reported RELAXED (never raised); the feasible ones are not changed.

    `lower` (m,) or (B, m) makes the inequalities two-sided, lower <= G z <= h, solved natively
    (each row has two slacks and multipliers; one m x m system per iteration as before); -inf in
    `lower` and +inf in `h` switch a side off. `lam` is then signed (> 0 at h, < 0 at lower) and
    the gradient of an active row goes to the bound it sits at.

    `warm_start`: a previous `QPSolution` of problems with the same shapes (e.g. the same
    examples at the last training step); its active set {lam != 0} is polished and verified
    before the first interior point step, so where it is still right no step is taken. A wrong
    one costs one active-set solve and changes nothing else.

    Inputs are equilibrated first (`ift.optnet.scaling`, powers of two: exact), so solutions,
    gradients and statuses do not depend on the scaling of rows and columns; residuals and gap
    are those of the equilibrated problem.

    `precision` is the dtype policy (outputs always keep the input dtype):

    - "mixed" (default, float32 and float64 inputs): the interior point iterates in float32
      (about half the cost of float64 per iteration) down to relative residuals 1e-5; the
      crossover then solves the active-set system with float32 factors and float64 iterative
      refinement and verifies the KKT conditions in float64 to `tol`, and the backward solves the
      same way. The returned z, duals and gradients are thus float64-accurate (float32 inputs:
      float64 results rounded once); measured by benchmarks/qp_layer.py at n = 10..200, batch
      128, against an exact reference: float64 inputs z <= 1e-13, gradients <= 2e-12 x scale;
      float32 inputs z <= 2.4e-7, gradients <= 6e-8 x scale (qpth's: up to 1.6). Examples that
      float32 cannot finish (polish failing at the float32 floor, 20 float32 steps, redundant
      equalities detected from A Q^-1 A^T) carry on in float64 from their last iterate, with
      the iterations they have left, so correctness never depends on float32 succeeding. With
      equality constraints T is computed in float64 (in float32 it cancels).
    - "float64": everything in float64.
    - "input": everything in the input dtype; for float32 inputs tolerance 1e-5 and, with
      equality constraints, errors up to ~1e-3 (docs/optnet.md).
    """
    if (A is None) != (b is None):
        raise ValueError("solve_qp: pass both A and b for equality constraints, or neither")
    if A is None and isinstance(q, torch.Tensor) and q.dim() >= 1:
        A, b = q.new_zeros(0, q.shape[-1]), q.new_zeros(0)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"solve_qp: max_iter must be a positive int, got {max_iter!r}")
    args = dict(Q=Q, q=q, G=G, h=h, A=A, b=b)
    if lower is not None:
        args["lower"] = lower
    batch, _ = _check_inputs(args)
    if precision not in PRECISIONS:
        raise ValueError(f"solve_qp: precision must be one of {PRECISIONS}, got {precision!r}")
    tol = default_tol(q.dtype, precision) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"solve_qp: tol must be > 0, got {tol}")
    if relax is not None and not (isinstance(relax, (int, float)) and relax > 0):
        raise ValueError(f"solve_qp: relax must be a penalty weight > 0 (e.g. 1e6) or None, got {relax!r}")

    scaling = Scaling(Q, G, A)
    scaled = scaling.problem(Q, q, G, h, A, b)
    lower_scaled = None if lower is None else scaling.rows(lower)
    warm = _warm_sets(warm_start, batch or 1, h.shape[-1])
    z, lam, nu, s, s_lo, status, iters, pri, dual, gap = _qp_function(
        *scaled, lower_scaled, warm, batch or 1, tol, max_iter, precision)
    z = scaling.primal(z)
    lam, nu, s = scaling.duals(lam, nu, s)
    s_lo = scaling.duals(lam, nu, s_lo)[2]
    sol = QPSolution(z, lam, nu, s, status, iters, pri, dual, gap, s_lo)
    if relax is not None and bool((status == QPStatus.INFEASIBLE).any()):
        sol = _relaxed(sol, (Q, q, G, h, A, b, lower), batch or 1, float(relax),
                       dict(tol=tol, max_iter=max_iter, precision=precision))
        status = sol.status
    if batch is None:
        sol = QPSolution(*(getattr(sol, f.name).squeeze(0) for f in fields(sol)))
    if strict and bool((status == QPStatus.INFEASIBLE).any()):
        bad = torch.nonzero(status == QPStatus.INFEASIBLE).flatten().tolist()
        raise QPInfeasibleError(f"solve_qp: QP infeasible for batch elements {bad[:10]}")
    return sol


def _warm_sets(warm_start: QPSolution | None, batch: int, m: int):
    """(active, lower) masks (B, m) from a previous solution's signed multipliers, or None."""
    if warm_start is None:
        return None
    lam = warm_start.lam.detach()
    lam = lam.unsqueeze(0) if lam.dim() == 1 else lam
    if lam.shape != (batch, m):
        raise ValueError(f"solve_qp: warm_start is a solution with lam of shape {tuple(lam.shape)}; "
                         f"this problem needs ({batch}, {m}): pass a solution of the same batch of problems")
    return lam != 0, lam < 0


def _relaxed(sol: QPSolution, data, batch: int, rho: float, options: dict) -> QPSolution:
    """Re-solve the INFEASIBLE examples as the l2-penalised elastic relaxation

        min_{z, t, r} 1/2 z^T Q z + q^T z + rho/2 (|t|^2 + |r|^2)
        s.t. lower <= G z - t <= h,  A z - r = b,

    a strictly convex QP that is always feasible, differentiably (its data are built from the
    inputs with autograd). As rho grows its z tends to QPLayer's closest feasible QP's: the
    smallest violation |(t, r)| first, then the objective. Feasible examples keep their solution.
    """
    Q, q, G, h, A, b, lower = data
    rows = (sol.status == QPStatus.INFEASIBLE).nonzero().squeeze(-1)
    Q, q, G, h, A, b = (_batched(t, _SPECS[k][0], batch)[rows] for k, t in zip("Q q G h A b".split(), data))
    lower = None if lower is None else _batched(lower, 1, batch)[rows]
    k, n, m, p = rows.numel(), q.shape[-1], h.shape[-1], b.shape[-1]
    new = lambda *shape: q.new_zeros(k, *shape)  # noqa: E731
    eye = torch.eye(m + p, dtype=q.dtype, device=q.device).expand(k, -1, -1)
    Qr = torch.cat([torch.cat([Q, new(n, m + p)], -1), torch.cat([new(m + p, n), rho * eye], -1)], -2)
    Gr = torch.cat([G, -eye[:, :m, :m], new(m, p)], -1)
    Ar = torch.cat([A, new(p, m), -eye[:, :p, :p]], -1)
    sub = solve_qp_with_info(Qr, torch.cat([q, new(m + p)], -1), Gr, h, Ar, b, lower=lower, **options)
    z = sub.z[:, :n]
    Gz = bmv(G.detach(), z.detach())
    out = {f.name: getattr(sol, f.name).clone() for f in fields(sol)}
    out["z"] = sol.z.index_put((rows,), z)  # differentiable in both
    values = dict(lam=sub.lam, nu=sub.nu, slack=h - Gz, slack_lower=Gz - lower if lower is not None else
                  torch.full_like(Gz, float("inf")), iterations=sol.iterations[rows] + sub.iterations,
                  primal_residual=sub.primal_residual, dual_residual=sub.dual_residual, gap=sub.gap,
                  status=torch.where(sub.converged, int(QPStatus.RELAXED), sub.status))
    for name, v in values.items():
        out[name][rows] = v.to(out[name].dtype)
    return QPSolution(**out)


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
    precision: str = "mixed",
    lower: torch.Tensor | None = None,
    relax: float | None = None,
    warm_start: QPSolution | None = None,
) -> torch.Tensor:
    """Solve `min 1/2 z^T Q z + q^T z  s.t.  G z <= h, A z = b`, differentiably in all arguments.

    Shapes: Q (n, n), q (n,), G (m, n), h (m,), A (p, n), b (p,), each optionally with a leading
    batch dimension B; returns z of shape (B, n), or (n,) when no argument is batched. `tol` is the
    relative residual / gap tolerance (default 1e-9 for float64 inputs, 1e-7 for float32);
    `precision` the dtype policy (default "mixed": float32 iterations, float64-verified solution
    and float64-accurate gradients; see `solve_qp_with_info`).

    Infeasible examples raise `QPInfeasibleError` (pass `strict=False` to get the last iterate and
    use `solve_qp_with_info` to see which); examples that hit `max_iter` give a RuntimeWarning.
    """
    sol = solve_qp_with_info(
        Q, q, G, h, A, b, tol=tol, max_iter=max_iter, strict=strict, precision=precision, lower=lower,
        relax=relax, warm_start=warm_start,
    )
    not_converged = int((~sol.converged).sum())
    if not_converged:
        warnings.warn(
            f"solve_qp: {not_converged} of {sol.status.numel()} QPs did not converge "
            f"({_status_counts(sol.status)}); use solve_qp_with_info to inspect",
            RuntimeWarning,
            stacklevel=2,
        )
    return sol.z
