"""What the backward's failures raise or warn, and where a module keeps its solve reports.

The IFT needs ``dF/dx`` to be nonsingular at the solution (condition 3 of the theorem). When it is
singular or badly conditioned the linear solve of the backward pass does not converge; we then warn
with :class:`ImplicitSolveWarning` and keep a ``LinearSolveInfo`` (``ift.implicit.linear_solvers``)
the caller can inspect, so a bad gradient is never returned silently. NaN/Inf raise
:class:`ImplicitSolveError`. Forward inner solves report an ``InnerSolveInfo``
(``ift.implicit.minimize``). Every report names its own logged metrics (``to_metrics(kind, stage)``
and ``batch_size``), which is all :class:`SolveRecorder`'s reader needs.
"""

from __future__ import annotations

# The reports live with the code they describe; re-exported here for code that imports them from here.
from ift.implicit.linear_solvers import LinearSolveInfo  # noqa: F401
from ift.implicit.minimize import InnerSolveInfo  # noqa: F401


class ImplicitSolveWarning(UserWarning):
    """The backward linear solve stopped before reaching its tolerance (gradient may be inaccurate)."""


class ImplicitSolveError(ValueError):
    """Non-finite values in ``F(x*, params)`` or in the linear solve: no gradient can be formed."""


class SolveRecorder:
    """The latest solve reports of one module, by kind (``"ift"`` for backward linear solves, ``"inner"``
    for forward inner solves, or any kind an application names). A report is any object with a
    ``batch_size`` property and ``to_metrics(kind, stage) -> dict[str, Tensor]`` (``LinearSolveInfo``,
    ``InnerSolveInfo``, an application's own). Pass ``recorder.record`` as ``on_solve``; the
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
