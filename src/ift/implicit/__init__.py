"""The implicit function theorem as a small autograd API.

``implicit_root`` / ``implicit_argmin`` / ``implicit_fixed_point`` attach a solution computed by
any solver to the autograd graph; backward solves one linear system with a batched matrix-free
solver (``cg``, ``bicgstab``, ``neumann``, ``direct``) and reports a :class:`LinearSolveInfo`.
The forward side: ``minimize`` is a batched per-problem optimiser (damped Newton, SGD, Adam) with
per-problem stopping at a relative stationarity tolerance; ``reversible_sgd`` runs SGD with momentum
in exact fixed-point arithmetic and differentiates it by reversing the trajectory (Maclaurin et al.
2015), keeping a few bits per step instead of the iterations. Worked examples (softmax, sparsemax, ridge hypergradient, cubic roots) live in
``ift.implicit.examples``.
"""

from ift.implicit.core import IFTConfig, SuppliedSolve, implicit_argmin, implicit_fixed_point, implicit_root
from ift.implicit.diagnostics import (
    ImplicitSolveError,
    ImplicitSolveWarning,
    InnerSolveInfo,
    LinearSolveInfo,
    SolveRecorder,
)
from ift.implicit.linear_solvers import (
    GMRES,
    CG,
    SOLVERS,
    BiCGStab,
    Direct,
    LinearSolver,
    Neumann,
    default_tol,
    get_linear_solver,
)
from ift.implicit.minimize import (
    METHODS,
    MinimizeDivergenceWarning,
    MinimizeResult,
    batched_hessian,
    minimize,
    relative_stationarity,
    stationarity,
)
from ift.implicit.operators import hvp, power_iteration
from ift.implicit.reversible import ReversalError, ReversibleResult, buffer_bits_per_step, reversible_sgd

__all__ = [
    "implicit_root",
    "implicit_argmin",
    "implicit_fixed_point",
    "IFTConfig",
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
