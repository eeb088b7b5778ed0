"""What solves report: the backward linear solve (per-problem iterations and residuals, a warning, an
error) and the forward inner solve (iterations, stationarity, status), both through ``on_solve``.

The IFT needs ``dF/dx`` to be nonsingular at the solution (condition 3 of the theorem). When it is
singular or badly conditioned the linear solve of the backward pass does not converge; we then warn
with :class:`ImplicitSolveWarning` and keep a :class:`LinearSolveInfo` the caller can inspect, so a
bad gradient is never returned silently. NaN/Inf raise :class:`ImplicitSolveError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ift.implicit.minimize import MinimizeResult


class ImplicitSolveWarning(UserWarning):
    """The backward linear solve stopped before reaching its tolerance (gradient may be inaccurate)."""


class ImplicitSolveError(ValueError):
    """Non-finite values in ``F(x*, params)`` or in the linear solve: no gradient can be formed."""


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
    maxiter: int
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

    def summary(self) -> str:
        failed = int((~self.converged).sum())
        return (
            f"{self.solver}: {failed}/{self.converged.numel()} problems not converged, "
            f"max relative residual {self.max_residual:.3e} (tol {self.tol:.1e}), "
            f"max iterations {self.max_iterations} (maxiter {self.maxiter})"
        )


@dataclass
class InnerSolveInfo:
    """Outcome of one batched forward inner solve (:func:`ift.implicit.minimize`), as the application
    used it; tensors have one entry per problem (detached). ``fallback``: how many problems the
    application trained without the IFT (SAVI's examples at ``lambda_0``), None where it has none.

    How :class:`ift.telemetry.SolverDiagnostics` logs it: ``names`` maps each logged name (``inner/<name>``
    in training) to a statistic of ``ift.telemetry.diagnostics.INNER_STATISTICS``; under val/test the
    name is ``stage_key`` formatted. An application that logs other names subclasses and overrides these
    two (iMAML); the defaults are SAVI's.
    """

    iterations: torch.Tensor
    grad_norm: torch.Tensor
    stationarity: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    rtol: float
    fallback: torch.Tensor | None = None

    names: ClassVar[dict[str, str]] = {
        "steps_taken": "mean_iterations",
        "grad_norm_final": "mean_grad_norm",
        "stationarity": "median_stationarity",
        "stationarity_max": "max_stationarity",
        "nonstationary_frac": "nonstationary_frac",
        "diverged": "diverged",
        "fallback": "fallback",
    }
    stage_key: ClassVar[str] = "inner/{stage}_{name}"

    @classmethod
    def from_result(cls, result: "MinimizeResult", fallback: torch.Tensor | None = None) -> "InnerSolveInfo":
        return cls(result.iterations.detach(), result.grad_norm.detach(), result.stationarity.detach(),
                   result.converged.detach(), result.diverged.detach(), result.rtol,
                   None if fallback is None else fallback.detach())


class SolveRecorder:
    """The latest solve reports of one module, by kind: ``"ift"`` (backward linear solves, a
    :class:`LinearSolveInfo`), ``"qp"`` (a QPSolution) and ``"inner"`` (forward inner solves, an
    :class:`InnerSolveInfo`). Pass ``recorder.record`` as ``on_solve``; the
    :class:`ift.telemetry.SolverDiagnostics` callback logs and clears them at each batch end.

    Per module, not per process: concurrent models never read each other's reports.
    """

    def __init__(self) -> None:
        self.last: dict[str, object] = {}

    def record(self, info: object, kind: str = "ift") -> None:
        self.last[kind] = info

    def pop(self) -> dict[str, object]:
        last, self.last = self.last, {}
        return last
