"""Batched matrix-free linear solvers for the IFT backward pass: ``(A + ridge I) u = b``.

Every solver works on ``b`` of shape ``(B, n)``: ``B`` independent problems of size ``n``, and a
``matvec`` that maps ``(B, n) -> (B, n)`` row by row (a block-diagonal operator). Scalars such as
step sizes are kept per row and each row stops on its own once ``||b - A u|| <= tol ||b||``.

After the iterations the true residual is recomputed; rows whose recursive residual drifted
above ``tol`` are restarted from where they are (residual replacement) while budget remains.

Stopping is tested per row inside the iteration (a stopped row is frozen), but whether *all* rows
stopped is asked of the host only every ``check_every`` iterations: each such test is a device
synchronisation, cheap on CPU and costly on an accelerator (default 1 on CPU, 8 elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ift.implicit.operators import power_iteration

MatVec = Callable[[torch.Tensor], torch.Tensor]

_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def default_tol(dtype: torch.dtype) -> float:
    """Relative-residual tolerance used when ``tol=None``: near sqrt-precision of the dtype."""
    return _DEFAULT_TOL.get(dtype, 1e-3)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner product, shape ``(B, 1)`` so it broadcasts against ``(B, n)``."""
    return (a * b).sum(dim=-1, keepdim=True)


def default_check_every(device: torch.device) -> int:
    """Iterations between host-side "all rows stopped?" tests: 1 on CPU, 8 on accelerators."""
    return 1 if device.type == "cpu" else 8


def _all_stopped(active: torch.Tensor, k: int, check_every: int) -> bool:
    """Host-side test that no row is active, asked only every ``check_every`` iterations."""
    return k % check_every == 0 and not bool(active.any())


def _safe_div(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``ok``, else 0 (inactive or broken-down rows must not produce NaN)."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


@dataclass
class LinearSolveInfo:
    """Outcome of one (batched) linear solve ``A u = b``; tensors have one entry per problem.

    ``residual`` is the true final relative residual ``||b - A u|| / ||b||`` (recomputed with one
    extra matrix-vector product, not the solver's running estimate). ``root_residual`` is
    ``||F(x*, params)||`` per problem when the solve came from an implicit layer: a large value
    means ``x_star`` was not a solution and the IFT gradient does not apply.
    """

    solver: str
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    tol: float
    max_iter: int
    root_residual: torch.Tensor | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def max_residual(self) -> float:
        return float(self.residual.max()) if self.residual.numel() else 0.0

    @property
    def max_iterations(self) -> int:
        return int(self.iterations.max()) if self.iterations.numel() else 0

    @property
    def batch_size(self) -> int:
        return int(self.iterations.numel())

    def to_metrics(self, kind: str = "ift", stage: str = "train") -> dict[str, torch.Tensor]:
        """What :class:`ift.telemetry.SolverDiagnostics` logs: ``<kind>/linsolve_iters`` (mean),
        ``<kind>/linsolve_residual`` (max relative residual), ``<kind>/linsolve_unconverged`` (count) in
        training; ``<stage>/linsolve_*`` under val / test."""
        prefix = kind if stage == "train" else stage
        return {f"{prefix}/linsolve_iters": self.iterations.float().mean(),
                f"{prefix}/linsolve_residual": self.residual.max(),
                f"{prefix}/linsolve_unconverged": (~self.converged).float().sum()}

    def summary(self) -> str:
        failed = int((~self.converged).sum())
        return (
            f"{self.solver}: {failed}/{self.converged.numel()} problems not converged, "
            f"max relative residual {self.max_residual:.3e} (tol {self.tol:.1e}), "
            f"max iterations {self.max_iterations} (max_iter {self.max_iter})"
        )



class LinearSolver:
    """Base class: validates settings, adds ridge damping, restarts, and reports a LinearSolveInfo.

    Subclasses implement ``_iterate(matvec, b, x0, r0, threshold, max_iter) -> (x, iterations)``
    where ``r0 = b - A x0`` (given, so that a restart does not pay for it twice) and ``threshold``
    is the per-row absolute residual target ``tol * ||b||`` of shape ``(B, 1)``.
    """

    name = "base"

    def __init__(
        self, tol: float | None = None, max_iter: int | None = None, ridge: float = 0.0, check_every: int | None = None
    ):
        if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"{type(self).__name__}: tol must be a positive float or None, got {tol!r}")
        if max_iter is not None and not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"{type(self).__name__}: max_iter must be an int >= 1 or None, got {max_iter!r}")
        if not (isinstance(ridge, (int, float)) and ridge >= 0 and math.isfinite(ridge)):
            raise ValueError(f"{type(self).__name__}: ridge must be a finite float >= 0, got {ridge!r}")
        if check_every is not None and not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"{type(self).__name__}: check_every must be an int >= 1 or None, got {check_every!r}")
        self.tol = tol
        self.max_iter = max_iter
        self.ridge = float(ridge)
        self.check_every = check_every

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tol={self.tol}, max_iter={self.max_iter}, ridge={self.ridge})"

    def default_max_iter(self, n: int) -> int:
        return min(10 * n, 1000)

    def solve(self, matvec: MatVec, b: torch.Tensor) -> tuple[torch.Tensor, LinearSolveInfo]:
        """Solve ``(A + ridge I) u = b`` for ``b`` of shape ``(B, n)``; returns ``(u, info)``."""
        if b.dim() != 2:
            raise ValueError(f"{self.name}: b must have shape (batch, n), got {tuple(b.shape)}")
        tol = self.tol if self.tol is not None else default_tol(b.dtype)
        max_iter = self.max_iter if self.max_iter is not None else self.default_max_iter(b.shape[1])
        op = self._damped(matvec)
        b_norm = b.norm(dim=-1, keepdim=True)
        threshold = tol * b_norm
        x = torch.zeros_like(b)
        r = b  # residual of x = 0, no matvec needed
        iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        previous = torch.full_like(b_norm, float("inf"))
        while True:
            x, its = self._iterate(op, b, x, r, threshold, max_iter - int(iterations.max()))
            iterations = iterations + its
            r = b - op(x)  # true residual: reported, and the start of a restart
            res = r.norm(dim=-1, keepdim=True)
            unfinished = res > threshold
            # Restart while budget remains and some unfinished row at least halved its residual
            # (a singular row would otherwise restart forever); a non-finite row is hopeless.
            progressed = unfinished & (res < 0.5 * previous)
            previous = res
            if (
                not bool(progressed.any())
                or int(its.max()) == 0
                or int(iterations.max()) >= max_iter
                or not bool(torch.isfinite(res).all())
            ):
                break
        rel = (res / b_norm.clamp_min(torch.finfo(b.dtype).tiny)).squeeze(-1)
        rel = torch.where(b_norm.squeeze(-1) > 0, rel, res.squeeze(-1))
        info = LinearSolveInfo(
            solver=self.name,
            iterations=iterations,
            residual=rel.detach(),
            converged=(rel <= tol) & torch.isfinite(rel),
            tol=tol,
            max_iter=max_iter,
        )
        return x, info

    def _damped(self, matvec: MatVec) -> MatVec:
        if self.ridge == 0.0:
            return matvec
        return lambda v: matvec(v) + self.ridge * v

    def _check_every(self, b: torch.Tensor) -> int:
        if self.check_every is not None:
            return self.check_every
        return default_check_every(b.device)

    def _iterate(self, matvec: MatVec, b, x, r, threshold, max_iter):  # pragma: no cover - abstract
        raise NotImplementedError


class CG(LinearSolver):
    """Conjugate gradient for symmetric definite operators (a Hessian at a minimum, or minus one
    at a maximum: CG's iterates do not change when both ``A`` and ``b`` flip sign).

    ``preconditioner``: a row-wise map ``r -> M^{-1} r`` with ``M`` symmetric positive definite
    (e.g. :func:`dense_preconditioner` of a Hessian the forward solver already built). With ``M``
    equal to ``A`` the solve ends after one iteration; stopping still tests the unpreconditioned
    residual ``||b - A u|| <= tol ||b||``.
    """

    name = "cg"

    def __init__(self, tol=None, max_iter=None, ridge=0.0, check_every=None,
                 preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(tol, max_iter, ridge, check_every)
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError(f"CG: preconditioner must be a callable r -> M^-1 r, got {type(preconditioner).__name__}")
        self.preconditioner = preconditioner

    def _iterate(self, matvec, b, x, r, threshold, max_iter):
        # Lean loop (the IFT backward's hot path): a stopped row never restarts within this call, so
        # only x and r need freezing (alpha = 0); p is reset to 0 so x stays finite whatever p was.
        # x is updated in place: it is the solver's own buffer (zeros or a previous call's result).
        precondition = self.preconditioner
        r = r.clone()
        z = r if precondition is None else precondition(r)
        p = z.clone()
        rs = _dot(r, r)
        rz = rs if precondition is None else _dot(r, z)
        threshold_sq = threshold.square()
        active = rs > threshold_sq
        iterations = torch.zeros_like(rs, dtype=torch.long)
        zero = torch.zeros_like(rs)
        max_curvature = zero
        eps = torch.finfo(b.dtype).eps
        check_every = self._check_every(b)
        for k in range(max(max_iter, 0)):
            if _all_stopped(active, k, check_every):
                break
            Ap = matvec(p)
            pAp = _dot(p, Ap)
            # Curvature p^T A p / ||p||^2 below eps times the largest seen: a numerically singular
            # direction, where a step would blow up; stop the row (it is reported not converged).
            # NaN / Inf curvature fails the comparison too.
            curvature = pAp.abs() / _dot(p, p)
            max_curvature = torch.fmax(max_curvature, curvature)
            ok = active & (curvature > eps * max_curvature)
            alpha = torch.where(ok, rz / pAp, zero)
            x.addcmul_(alpha, p)
            r.addcmul_(alpha, Ap, value=-1.0)
            rs_new = _dot(r, r)
            if precondition is None:
                z, rz_new = r, rs_new
            else:
                z = precondition(r)
                rz_new = _dot(r, z)
            p = torch.where(ok, torch.addcmul(z, rz_new / rz, p), zero)
            rz = rz_new
            iterations += ok
            active = ok & (rs_new > threshold_sq)
        return x, iterations.squeeze(-1)


def dense_preconditioner(matrices: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``r -> M^{-1} r`` row-wise for (B, n, n) symmetric matrices ``M``, by one Cholesky factorisation.

    Rows whose matrix is not finite or not positive definite get the identity (plain CG there).
    """
    if matrices.dim() != 3 or matrices.shape[1] != matrices.shape[2]:
        raise ValueError(f"dense_preconditioner: matrices must have shape (B, n, n), got {tuple(matrices.shape)}")
    matrices = matrices.detach()
    eye = torch.eye(matrices.shape[1], dtype=matrices.dtype, device=matrices.device)
    finite = torch.isfinite(matrices).flatten(1).all(-1)[:, None, None]
    factor, info = torch.linalg.cholesky_ex(torch.where(finite, matrices, eye))
    factor = torch.where(finite & (info == 0)[:, None, None], factor, eye)
    return lambda r: torch.cholesky_solve(r.unsqueeze(-1), factor).squeeze(-1)


class BiCGStab(LinearSolver):
    """Stabilised biconjugate gradient (van der Vorst) for non-symmetric operators.

    Two matvecs per iteration and no stored basis, but it can break down (``omega = 0`` or
    ``r_hat^T A p = 0``), typically on symmetric indefinite systems such as KKT matrices; a
    broken-down row is reported as not converged. Prefer :class:`GMRES` when in doubt.
    """

    name = "bicgstab"

    def _iterate(self, matvec, b, x, r, threshold, max_iter):
        r_hat = r.clone()
        ones = torch.ones_like(_dot(r, r))
        rho, alpha, omega = ones.clone(), ones.clone(), ones.clone()
        v = torch.zeros_like(b)
        p = torch.zeros_like(b)
        active = r.norm(dim=-1, keepdim=True) > threshold
        iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        check_every = self._check_every(b)
        for k in range(max(max_iter, 0)):
            if _all_stopped(active, k, check_every):
                break
            rho_new = _dot(r_hat, r)
            ok = active & (rho_new != 0) & (omega != 0)
            beta = _safe_div(rho_new, rho, ok) * _safe_div(alpha, omega, ok)
            p = torch.where(ok, r + beta * (p - omega * v), p)
            v_new = matvec(p)
            r_hat_v = _dot(r_hat, v_new)
            ok = ok & (r_hat_v != 0) & torch.isfinite(r_hat_v)
            alpha_new = _safe_div(rho_new, r_hat_v, ok)
            s = r - alpha_new * v_new
            s_small = s.norm(dim=-1, keepdim=True) <= threshold
            t = matvec(s)
            tt = _dot(t, t)
            full = ok & ~s_small & (tt > 0)
            omega_new = _safe_div(_dot(t, s), tt, full)
            x = torch.where(ok, x + alpha_new * p + omega_new * s, x)
            r = torch.where(full, s - omega_new * t, torch.where(ok, s, r))
            iterations += ok.squeeze(-1).long()
            rho = torch.where(ok, rho_new, rho)
            alpha = torch.where(ok, alpha_new, alpha)
            omega = torch.where(full, omega_new, omega)
            v = torch.where(ok, v_new, v)
            # A row stops when converged, after breakdown, or when omega hit 0 (s small is converged).
            active = full & (r.norm(dim=-1, keepdim=True) > threshold) & (omega_new != 0)
        return x, iterations


class GMRES(LinearSolver):
    """Restarted GMRES for general (non-symmetric or indefinite) operators, batched per row.

    Each cycle builds an orthonormal Krylov basis of up to ``restart`` vectors (classical Gram-Schmidt
    applied twice) and picks the combination with the smallest residual via the pseudo-inverse of
    the small Hessenberg matrix, so rank-deficient (singular) problems stagnate instead of failing.
    A row stops as soon as its residual reaches ``tol`` or its Krylov space stops growing.
    """

    name = "gmres"

    def __init__(self, tol=None, max_iter=None, ridge=0.0, check_every=None, restart: int = 30):
        super().__init__(tol, max_iter, ridge, check_every)
        if not (isinstance(restart, int) and restart >= 1):
            raise ValueError(f"GMRES: restart must be an int >= 1, got {restart!r}")
        self.restart = restart

    def _iterate(self, matvec, b, x, r, threshold, max_iter):
        batch, n = b.shape
        iterations = torch.zeros(batch, dtype=torch.long, device=b.device)
        check_every = self._check_every(b)
        active = r.norm(dim=-1, keepdim=True) > threshold
        while bool(active.any()) and int(iterations.max()) < max_iter:
            m = min(self.restart, n, max_iter - int(iterations.max()))
            beta = r.norm(dim=-1, keepdim=True)
            basis = torch.zeros(batch, m + 1, n, dtype=b.dtype, device=b.device)
            basis[:, 0] = r / beta.clamp_min(torch.finfo(b.dtype).tiny)
            hess = torch.zeros(batch, m + 1, m, dtype=b.dtype, device=b.device)
            target = torch.zeros(batch, m + 1, 1, dtype=b.dtype, device=b.device)
            target[:, 0] = beta
            pending = active.clone()  # rows still iterating in this cycle
            for j in range(m):
                w = matvec(basis[:, j])
                for _ in range(2):  # Gram-Schmidt twice keeps the basis orthogonal in floating point
                    coef = torch.bmm(basis[:, : j + 1], w.unsqueeze(-1))
                    w = w - torch.bmm(basis[:, : j + 1].transpose(1, 2), coef).squeeze(-1)
                    hess[:, : j + 1, j] += coef.squeeze(-1)
                h_next = w.norm(dim=-1, keepdim=True)
                hess[:, j + 1, j] = h_next.squeeze(-1)
                grows = h_next > torch.finfo(b.dtype).eps * hess[:, : j + 2, j].norm(dim=-1, keepdim=True)
                basis[:, j + 1] = torch.where(grows, w / h_next.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
                iterations += pending.squeeze(-1).long()
                y = torch.linalg.pinv(hess[:, : j + 2, : j + 1]) @ target[:, : j + 2]
                res = (target[:, : j + 2] - hess[:, : j + 2, : j + 1] @ y).norm(dim=(1, 2)).unsqueeze(-1)
                stop = pending & ((res <= threshold) | ~grows | (j == m - 1))
                x = torch.where(stop, x + (basis[:, : j + 1].transpose(1, 2) @ y).squeeze(-1), x)
                # A row whose Krylov space stopped growing without converging is singular here: give up.
                active = active & ~(stop & ~grows & (res > threshold))
                pending = pending & ~stop
                if _all_stopped(pending, j + 1, check_every):
                    break
            r = b - matvec(x)
            active = active & (r.norm(dim=-1, keepdim=True) > threshold)
        return x, iterations


class Neumann(LinearSolver):
    """Truncated Neumann series ``u = alpha sum_k (I - alpha A)^k b`` (Lorraine et al., 2019).

    Converges when the spectral radius of ``I - alpha A`` is below 1, e.g. ``0 < alpha < 2 /
    lambda_max`` for a positive definite ``A``. ``alpha="auto"`` sets ``alpha = 1 / lambda_max``
    per problem from a few power iterations (negative for a negative definite ``A``).
    """

    name = "neumann"

    def __init__(self, tol=None, max_iter=None, ridge=0.0, check_every=None, alpha: float | str = 1.0, power_iters: int = 20):
        super().__init__(tol, max_iter, ridge, check_every)
        if alpha != "auto" and not (isinstance(alpha, (int, float)) and alpha != 0 and math.isfinite(alpha)):
            raise ValueError(f"Neumann: alpha must be a nonzero finite float or 'auto', got {alpha!r}")
        self.alpha = alpha
        self.power_iters = power_iters

    def default_max_iter(self, n: int) -> int:
        return 500

    def _iterate(self, matvec, b, x, r, threshold, max_iter):
        if self.alpha == "auto":
            lam, _ = power_iteration(matvec, b.detach().clone(), iters=self.power_iters)
            alpha = (1.0 / torch.where(lam == 0, torch.ones_like(lam), lam)).unsqueeze(-1)
        else:
            alpha = torch.full_like(b[:, :1], float(self.alpha))
        # term_k = alpha (I - alpha A)^k r0 and the residual after adding terms 0..k-1 is term_k / alpha.
        term = alpha * r
        active = r.norm(dim=-1, keepdim=True) > threshold
        iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        check_every = self._check_every(b)
        for k in range(max(max_iter, 0)):
            if _all_stopped(active, k, check_every):
                break
            x = torch.where(active, x + term, x)
            term = torch.where(active, term - alpha * matvec(term), term)
            iterations += active.squeeze(-1).long()
            res = (term / alpha).norm(dim=-1, keepdim=True)
            active = active & (res > threshold) & torch.isfinite(res)
        return x, iterations


class Direct(LinearSolver):
    """Materialise the ``n x n`` matrix of every problem (``n`` matvecs) and solve exactly.

    For small ``n`` only (``max_dim``). Singular problems are solved in the least-squares sense
    (pseudo-inverse) and reported as not converged by the residual check.
    """

    name = "direct"

    def __init__(self, tol=None, max_iter=None, ridge=0.0, check_every=None, max_dim: int = 4096):
        super().__init__(tol, max_iter, ridge, check_every)
        self.max_dim = max_dim

    def default_max_iter(self, n: int) -> int:
        return 1

    def materialise(self, matvec: MatVec, b: torch.Tensor) -> torch.Tensor:
        """The ``(B, n, n)`` matrices ``M`` with ``M[i] @ e_j = matvec(e_j)[i]``."""
        n = b.shape[1]
        if n > self.max_dim:
            raise ValueError(
                f"direct: problem size n={n} exceeds max_dim={self.max_dim}; materialising an n x n "
                "matrix per problem is too costly. Use linear_solver='cg' (symmetric) or 'bicgstab', "
                "or pass Direct(max_dim=...) to allow it."
            )
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        columns = [matvec(eye[j].expand_as(b)) for j in range(n)]
        return torch.stack(columns, dim=-1)

    def _iterate(self, matvec, b, x, r, threshold, max_iter):
        M = self.materialise(matvec, b)
        delta, status = torch.linalg.solve_ex(M, r)
        singular = (status != 0) | ~torch.isfinite(delta).all(dim=-1)
        if bool(singular.any()):
            delta = torch.where(singular.unsqueeze(-1), (torch.linalg.pinv(M) @ r.unsqueeze(-1)).squeeze(-1), delta)
        iterations = torch.ones(b.shape[0], dtype=torch.long, device=b.device)
        return x + delta, iterations


SOLVERS: dict[str, type[LinearSolver]] = {"cg": CG, "gmres": GMRES, "bicgstab": BiCGStab, "neumann": Neumann, "direct": Direct}


def get_linear_solver(
    spec: str | LinearSolver | type[LinearSolver],
    tol: float | None = None,
    max_iter: int | None = None,
    ridge: float | None = None,
) -> LinearSolver:
    """A solver from a name (``"cg"``, ``"gmres"``, ``"bicgstab"``, ``"neumann"``, ``"direct"``), a class or an
    instance. Settings go either in the keywords (name / class) or in the instance, not both."""
    kwargs = {k: v for k, v in dict(tol=tol, max_iter=max_iter, ridge=ridge).items() if v is not None}
    if isinstance(spec, LinearSolver):
        if kwargs:
            raise ValueError(
                f"linear_solver is an instance ({spec!r}); set {sorted(kwargs)} on the instance "
                "instead of passing them separately"
            )
        return spec
    if isinstance(spec, type) and issubclass(spec, LinearSolver):
        return spec(**kwargs)
    if isinstance(spec, str):
        if spec not in SOLVERS:
            raise ValueError(f"unknown linear_solver {spec!r}; choose one of {sorted(SOLVERS)}")
        return SOLVERS[spec](**kwargs)
    raise TypeError(
        f"linear_solver must be a name in {sorted(SOLVERS)}, a LinearSolver subclass or instance, got {type(spec).__name__}"
    )
