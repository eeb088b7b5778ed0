"""OptNet: a batched differentiable QP solver, the OptNet layer, and simplex output heads.

``solve_qp(Q, q, G, h, A, b)`` solves ``min 1/2 z^T Q z + q^T z  s.t.  G z <= h, A z = b`` with a
primal-dual interior point method and differentiates the KKT conditions in backward;
``solve_qp_with_info`` also returns the duals, a per-example status and residuals.
"""

from ift.optnet.layer import OptNetLayer, SoftmaxHead, SparsemaxHead, sparsemax_closed_form, sparsemax_qp
from ift.optnet.qp import QPInfeasibleError, QPSolution, QPStatus, solve_qp, solve_qp_with_info

__all__ = [
    "OptNetLayer",
    "SparsemaxHead",
    "SoftmaxHead",
    "sparsemax_qp",
    "sparsemax_closed_form","solve_qp", "solve_qp_with_info", "QPSolution", "QPStatus", "QPInfeasibleError"]
