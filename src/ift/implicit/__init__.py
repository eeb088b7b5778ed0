"""The implicit function theorem as a small autograd API.

``implicit_root`` / ``implicit_argmin`` / ``implicit_fixed_point`` attach a solution computed by
any solver to the autograd graph; backward solves one linear system with a batched matrix-free
solver (``cg``, ``bicgstab``, ``neumann``, ``direct``) and reports a :class:`LinearSolveInfo`.
The forward side: ``minimize`` is a batched per-problem optimiser (damped Newton, SGD, Adam) with
per-problem stopping at a relative stationarity tolerance; ``reversible_sgd`` runs SGD with momentum
in exact fixed-point arithmetic and differentiates it by reversing the trajectory (Maclaurin et al.
2015), keeping a few bits per step instead of the iterations. ``MinimizeConfig`` is ``minimize``'s
settings as a config group (with the one non-stationarity policy, ``NonStationary``); ``IFTConfig``
the backward's. ``proximal_penalty`` / ``proximal_objective``: the proximal term that makes an inner
optimum depend on its start. Worked examples (softmax, sparsemax, ridge hypergradient, cubic roots) live in
``ift.implicit.examples``.
"""

from ift.implicit.config import (
    ConfigGroup,
    MinimizeConfig,
    NonStationary,
    NonStationaryError,
    reject_renamed,
)
from ift.implicit.core import IFTConfig, SuppliedSolve, at_least_float32, implicit_argmin, implicit_fixed_point, implicit_root
from ift.implicit.diagnostics import ImplicitSolveError, ImplicitSolveWarning, SolveRecorder
from ift.implicit.linear_solvers import (
    GMRES,
    CG,
    SOLVERS,
    BiCGStab,
    Direct,
    LinearSolveInfo,
    LinearSolver,
    Neumann,
    default_tol,
    get_linear_solver,
)
from ift.implicit.minimize import (
    INNER_STATISTICS,
    METHODS,
    InnerSolveInfo,
    MinimizeDivergenceWarning,
    MinimizeResult,
    batched_hessian,
    minimize,
    relative_stationarity,
    stationarity,
)
from ift.implicit.operators import hvp, power_iteration
from ift.implicit.proximal import proximal_objective, proximal_penalty
from ift.implicit.reversible import ReversalError, ReversibleResult, buffer_bits_per_step, reversible_sgd

__all__ = [
    "implicit_root",
    "implicit_argmin",
    "implicit_fixed_point",
    "IFTConfig",
    "ConfigGroup",
    "MinimizeConfig",
    "NonStationary",
    "NonStationaryError",
    "reject_renamed",
    "at_least_float32",
    "proximal_objective",
    "proximal_penalty",
    "INNER_STATISTICS",
    "LinearSolver",
    "SuppliedSolve",
    "CG",
    "GMRES",
    "BiCGStab",
    "Direct",
    "Neumann",
    "SOLVERS",
    "get_linear_solver",
    "default_tol",
    "LinearSolveInfo",
    "ImplicitSolveWarning",
    "ImplicitSolveError",
    "SolveRecorder",
    "InnerSolveInfo",
    "hvp",
    "power_iteration",
    "minimize",
    "MinimizeResult",
    "MinimizeDivergenceWarning",
    "METHODS",
    "batched_hessian",
    "relative_stationarity",
    "stationarity",
    "reversible_sgd",
    "ReversibleResult",
    "ReversalError",
    "buffer_bits_per_step",
]
