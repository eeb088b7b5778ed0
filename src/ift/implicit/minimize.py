"""A batched per-example optimiser: minimise B independent objectives at once, each to stationarity.

``minimize(objective, x0)`` minimises ``objective(x) -> (B,)`` over ``x`` of shape ``(B, n)``,
where row ``b`` of the output depends only on row ``b`` of ``x`` (independent problems, e.g. one
per example or per task). Every problem keeps its own step size / damping, its own stopping test and
its own divergence flag; the loop ends when all have stopped or after ``max_iter`` iterations.

Methods
- ``"newton"``: damped Newton (Levenberg-Marquardt / trust-region style) with per-problem
  Hessians. The step solves ``(H + mu I) p = -g`` with ``mu = max(0, -lambda_min(H)) + nu``, so an
  indefinite Hessian (a saddle or a maximum nearby) still gives a descent step; ``nu`` shrinks
  after a step the quadratic model predicted well and grows after a poor or rejected one, so the
  method is robust far from the optimum and converges quadratically near it. A rejected step is
  retried with more damping on the same Hessian (up to ``TRIALS_PER_HESSIAN``); a predicted
  decrease below the objective's rounding noise is accepted on the model's word. ``H`` comes from
  ``n`` batched Hessian-vector products (exact, any objective) or from a ``curvature`` callable
  (e.g. a Gauss-Newton matrix the caller can build cheaply).
- ``"sgd"`` (with momentum) and ``"adam"``: first-order steps with per-problem backtracking (a
  step that increases the objective is undone, the step size halved, momentum reset), optional
  per-problem gradient-norm clipping.

Stationarity is relative: ``||grad f(x)|| / (1 + |f(x)|)``. In float32 the gradient of an
objective whose terms are of size ``F`` cannot be computed more accurately than about
``eps_32 * F``, so an absolute tolerance is either unreachable or meaningless depending on the
problem's scale; relative to ``1 + |f|`` the float32 floor sits near 1e-7.

``create_graph=True`` keeps every iteration in the autograd graph (unrolled differentiation:
memory grows linearly with the iterations); ``checkpoint_segments=m`` runs the unrolled loop in
``m`` segments under ``torch.utils.checkpoint`` (memory ~ one segment plus the segment inputs,
at the cost of recomputing each segment's forward in backward). Without ``create_graph`` the loop
runs without a graph: the result is a plain tensor (pair it with ``implicit_argmin`` for the IFT).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from ift.implicit.linear_solvers import default_check_every

METHODS = ("newton", "sgd", "adam")
TRIALS_PER_HESSIAN = 4  # newton: damped steps tried per Hessian before the next iteration
NOISE_ULPS = 100  # newton: predicted decreases below this many eps * (1 + |f|) are taken on trust

Objective = Callable[[torch.Tensor], torch.Tensor]
Curvature = Callable[[torch.Tensor], torch.Tensor]


class MinimizeDivergenceWarning(RuntimeWarning):
    """Some problems produced NaN/Inf or left the bounded region; they fall back to ``x0``."""


@dataclass
class MinimizeResult:
    """Outcome per problem (all tensors have leading dim B).

    x: the returned point (``x0`` where the problem diverged); carries the graph when
       ``create_graph=True``.
    value: objective at ``x`` (detached).
    grad_norm: ``||grad f(x)||`` (detached).
    stationarity: ``grad_norm / (1 + |value|)``, the number tested against ``tol``.
    iterations: accepted updates per problem.
    converged: ``stationarity <= tol``.
    diverged: NaN/Inf or ``|x| > max_abs`` was met; ``x`` is ``x0`` there.
    hessian: newton only, the last (B, n, n) Hessian (or ``curvature``) built for each problem
       (detached): at ``x``, or with a ``curvature`` callable at the iterate before ``x`` (a converged
       problem's final Newton step is small); NaN where none was built or the problem diverged. Close
       to the IFT's backward matrix at a converged ``x``: a preconditioner for it.
    """

    x: torch.Tensor
    value: torch.Tensor
    grad_norm: torch.Tensor
    stationarity: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    tol: float
    hessian: torch.Tensor | None = None

    @property
    def nonstationary(self) -> torch.Tensor:
        """Problems that did not diverge but stopped above the tolerance."""
        return ~self.converged & ~self.diverged


def _not_diverged(values: torch.Tensor, info: "InnerSolveInfo", reduce: Callable) -> torch.Tensor:
    """``reduce`` over the problems that did not diverge (their numbers describe x0); 0 when none is left."""
    ok = ~info.diverged
    return reduce(values[ok]) if ok.any() else values.new_zeros(())


# The statistics an `InnerSolveInfo` can log; its `names` picks some and names them.
INNER_STATISTICS: dict[str, Callable[["InnerSolveInfo"], torch.Tensor | None]] = {
    "mean_iterations": lambda i: i.iterations.float().mean(),
    "max_iterations": lambda i: i.iterations.max().float(),
    "mean_grad_norm": lambda i: _not_diverged(i.grad_norm, i, torch.mean),
    # relative stationarity ||grad f|| / (1 + |f|) at the returned point
    "median_stationarity": lambda i: _not_diverged(i.stationarity, i, torch.median),
    "max_stationarity": lambda i: _not_diverged(i.stationarity, i, torch.max),
    "nonstationary_frac": lambda i: (~i.converged & ~i.diverged).float().mean(),  # stopped above tol
    "unconverged_frac": lambda i: (~i.converged).float().mean(),  # above tol or diverged
    "diverged": lambda i: i.diverged.float().sum(),
    "fallback": lambda i: i.fallback,  # None (not logged) where the application has no fallback
}


@dataclass
class InnerSolveInfo:
    """Outcome of one batched forward inner solve (:func:`minimize`), as the application used it;
    tensors have one entry per problem (detached). ``fallback``: how many problems the application
    took off the implicit gradient path (``nonstationary=drop``), None where it has none.

    Its logged metrics (``to_metrics``): ``names`` maps each logged name to a statistic of
    :data:`INNER_STATISTICS`; the key is ``train_key`` in training and ``stage_key`` under val / test,
    formatted with ``kind``, ``stage`` and ``name``. The defaults log every statistic under its own
    name; an application with names of its own subclasses and overrides these ClassVars.
    """

    iterations: torch.Tensor
    grad_norm: torch.Tensor
    stationarity: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    tol: float
    fallback: torch.Tensor | None = None

    names: ClassVar[dict[str, str]] = {name: name for name in INNER_STATISTICS}
    train_key: ClassVar[str] = "{kind}/{name}"
    stage_key: ClassVar[str] = "{stage}/{kind}_{name}"

    @classmethod
    def from_result(cls, result: MinimizeResult, fallback: torch.Tensor | None = None) -> "InnerSolveInfo":
        return cls(result.iterations.detach(), result.grad_norm.detach(), result.stationarity.detach(),
                   result.converged.detach(), result.diverged.detach(), result.tol,
                   None if fallback is None else fallback.detach())

    @property
    def batch_size(self) -> int:
        return int(self.iterations.numel())

    def to_metrics(self, kind: str = "inner", stage: str = "train") -> dict[str, torch.Tensor]:
        """The statistics ``names`` picks, under their fully formatted keys (None statistics skipped)."""
        pattern = self.train_key if stage == "train" else self.stage_key
        values = {name: INNER_STATISTICS[stat](self) for name, stat in self.names.items()}
        return {pattern.format(kind=kind, stage=stage, name=name): value
                for name, value in values.items() if value is not None}


def relative_stationarity(value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``||grad|| / (1 + |value|)`` per problem: the stopping and reporting measure."""
    return grad.detach().norm(dim=-1) / (1 + value.detach().abs())


def stationarity(objective: Objective, x: torch.Tensor) -> torch.Tensor:
    """Relative stationarity of ``objective`` at ``x`` (one gradient evaluation, no graph kept)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        value = objective(xg)
        (grad,) = torch.autograd.grad(value.sum(), xg)
    return relative_stationarity(value, grad)


def batched_hessian(objective: Objective, x: torch.Tensor, create_graph: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value (B,), gradient (B, n) and per-problem Hessian (B, n, n) from n batched HVPs.

    The problems are independent, so the Hessian of ``sum_b f_b`` is block diagonal: one
    Hessian-vector product with the tangent ``e_j`` in every row gives row ``j`` of every block.
    """
    batch, n = x.shape
    with torch.enable_grad():
        xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        value = objective(xg)
        (grad,) = torch.autograd.grad(value.sum(), xg, create_graph=True)
        eye = torch.eye(n, dtype=x.dtype, device=x.device).unsqueeze(1).expand(n, batch, n)
        (rows,) = torch.autograd.grad(grad, xg, eye, is_grads_batched=True, create_graph=create_graph)
    hess = rows.transpose(0, 1)
    if not create_graph:
        value, grad, hess = value.detach(), grad.detach(), hess.detach()
    return value, grad, 0.5 * (hess + hess.transpose(1, 2))


def _value_and_grad(objective: Objective, x: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        value = objective(xg)
        (grad,) = torch.autograd.grad(value.sum(), xg, create_graph=create_graph)
    if not create_graph:
        value, grad = value.detach(), grad.detach()
    return value, grad


def _check_args(method: str, x0: torch.Tensor, max_iter: int, tol: float, lr: float, damping: float,
                checkpoint_segments: int | None, create_graph: bool) -> None:
    if method not in METHODS:
        raise ValueError(f"minimize: method={method!r} is unknown; use one of {METHODS}")
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2 or not x0.is_floating_point():
        raise ValueError(f"minimize: x0 must be a floating-point tensor of shape (B, n), got "
                         f"{getattr(x0, 'shape', type(x0).__name__)}")
    if max_iter < 0:
        raise ValueError(f"minimize: max_iter must be >= 0, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"minimize: tol must be >= 0, got {tol}")
    if not lr > 0:
        raise ValueError(f"minimize: lr must be > 0, got {lr}")
    if not damping > 0:
        raise ValueError(f"minimize: damping must be > 0, got {damping}")
    if checkpoint_segments is not None and (checkpoint_segments < 1 or not create_graph):
        raise ValueError("minimize: checkpoint_segments needs create_graph=True and must be >= 1, got "
                         f"{checkpoint_segments} (create_graph={create_graph})")


def minimize(
    objective: Objective,
    x0: torch.Tensor,
    *,
    method: str = "newton",
    max_iter: int = 20,
    tol: float = 1e-5,
    curvature: Curvature | None = None,
    damping: float = 1e-3,
    lr: float = 1.0,
    momentum: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    clip: float | None = None,
    max_abs: float = math.inf,
    create_graph: bool = False,
    checkpoint_segments: int | None = None,
    checkpoint_reentrant: bool = True,
    args: tuple[torch.Tensor, ...] = (),
    compact: bool = False,
    check_every: int | None = None,
) -> MinimizeResult:
    """Minimise ``objective(x) -> (B,)`` from ``x0`` (B, n), each row to relative stationarity.

    Args:
        objective: per-problem values; row b may depend only on ``x[b]``. Must be
            differentiable twice for ``"newton"`` without ``curvature``.
        x0: starting points (B, n). With ``create_graph=True`` its graph is kept.
        method: ``"newton"`` (damped Newton), ``"sgd"`` (momentum) or ``"adam"``.
        max_iter: iterations (gradient evaluations after the first); 0 evaluates only.
        tol: stop a problem once ``||grad|| / (1 + |f|) <= tol``; 0 runs all iterations.
        curvature: newton only, ``curvature(x) -> (B, n, n)`` symmetric matrices used instead of
            the exact Hessian (e.g. Gauss-Newton); with ``create_graph`` it must keep its graph.
        damping: newton only, initial Levenberg-Marquardt damping relative to the largest
            |eigenvalue| of each problem's Hessian.
        lr, momentum, betas, clip: first-order methods: initial step size (halved per rejected
            step), SGD momentum, Adam moments, per-problem gradient-norm clipping (None: off).
        max_abs: a first-order iterate with ``|x| > max_abs`` counts as diverged; a Newton trial
            point beyond it is rejected (the damping grows) instead.
        create_graph: differentiate through the iterations (unrolling).
        checkpoint_segments: with ``create_graph``, recompute the loop in this many checkpointed
            segments during backward (about sqrt(max_iter) balances memory and recomputation).
        checkpoint_reentrant: reentrant checkpointing (default): the segment runs without a graph in
            forward and once more with one in backward, so memory ~ one segment; differentiate with
            ``.backward()`` (``torch.autograd.grad`` on the result raises). ``False``: PyTorch's
            non-reentrant variant, which ``torch.autograd.grad`` and double backward accept, but each
            inner gradient in its forward recomputes the segment up to that step (quadratic: 354
            objective calls instead of 66 for 64 steps in 8 segments) and the recomputed tensors stay
            alive until backward (measured at 200 steps, batch 128, 16 variables per problem on an
            MNIST-size objective: 13.4 GB alive vs 1.9 GB for plain unrolling; the memory benchmark's
            ``--memory-only`` run).
        args: extra tensors passed on as ``objective(x, *args)`` and ``curvature(x, *args)``.
            With ``checkpoint_segments``, tensors with an autograd history (not leaves) that the
            objective depends on must come in here, not by closure: each segment's backward
            would otherwise run through their history again after it was freed.
        compact: the objective (and curvature) take ALL their per-problem data through ``args``,
            each with the problem batch as dim 0, so they can be called on any subset of rows:
            once at most half the problems are still active, iterate on those rows only. The
            tail of slow problems then costs what they cost, not what the whole batch costs.
        check_every: iterations between host-side reads of the per-problem stopping flags (the
            "all stopped?" test, compaction, Newton's trial loop); problems still stop
            individually at every iteration, in between they are masked on the device. Default:
            1 for ``"newton"`` (an iteration builds a Hessian, so one host read per iteration is
            negligible and stopping early saves whole Hessians), else 1 on CPU and 8 on
            accelerators, where every read is a device synchronisation.

    Returns:
        :class:`MinimizeResult`. Diverged problems fall back to ``x0`` with a
        :class:`MinimizeDivergenceWarning`.
    """
    _check_args(method, x0, max_iter, tol, lr, damping, checkpoint_segments, create_graph)
    if check_every is None:
        check_every = 1 if method == "newton" else default_check_every(x0.device)
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"minimize: check_every must be an int >= 1, got {check_every!r}")
    x = x0 if create_graph else x0.detach()
    args = tuple(args) if create_graph else tuple(a.detach() for a in args)
    step = _newton_iteration if method == "newton" else _first_order_iteration
    opts = dict(method=method, tol=tol, lr=lr, momentum=momentum, betas=betas, clip=clip, max_abs=max_abs,
                create_graph=create_graph, check_every=check_every)
    state = _initial_state(x, method, lr, damping)
    if checkpoint_segments is None:
        state = _loop(step, state, (objective, curvature), args, 0, max_iter, opts, compact)
    else:
        per_segment = max(1, math.ceil(max_iter / checkpoint_segments))
        for start in range(0, max_iter, per_segment):
            count = min(per_segment, max_iter - start)
            keys = list(state)
            # Reentrant by default: the non-reentrant variant recomputes the segment for every inner
            # autograd.grad call in forward (quadratic) and keeps what it recomputed until backward.
            out = checkpoint(_run_segment, step, keys, start, count, (objective, curvature, len(args), compact),
                             opts, *args, *state.values(), use_reentrant=checkpoint_reentrant)
            state = dict(zip(keys, out))
            if not bool(state["active"].any()):
                break
    return _finish(state, x, _bind(objective, None, args)["objective"], tol, max_abs)


def _bind(objective, curvature, args) -> dict:
    if not args:
        return {"objective": objective, "curvature": curvature}
    return {"objective": lambda x: objective(x, *args),
            "curvature": None if curvature is None else (lambda x: curvature(x, *args))}


def _run_segment(step, keys, start, count, fns, opts, *values):
    objective, curvature, n_args, compact = fns
    # Build the per-step graphs only where grad is on (the checkpoint drops their saved tensors in
    # forward and rebuilds them when backward needs them).
    opts = {**opts, "create_graph": torch.is_grad_enabled()}
    state = dict(zip(keys, values[n_args:]))
    state = _loop(step, state, (objective, curvature), values[:n_args], start, start + count, opts, compact)
    return tuple(state.values())


def _loop(step, state, fns, args, start, stop, opts, compact):
    """Iterations start..stop-1; once at most half the problems are active (and the objective takes
    its per-problem data through `args`), continue on those rows only and scatter them back.

    The host reads the active flags only every `check_every` iterations; in between, stopped
    problems are carried along masked (every step leaves an inactive problem unchanged).
    """
    for k in range(start, stop):
        check = k % opts["check_every"] == 0
        if check:
            active = state["active"]
            n_active = int(active.sum())
            if n_active == 0:
                break
            if compact and n_active <= active.shape[0] // 2:
                idx = active.nonzero().squeeze(1)
                sub = _loop(step, {key: v[idx] for key, v in state.items()}, fns, tuple(a[idx] for a in args),
                            k, stop, opts, compact)
                return {key: v.index_put((idx,), sub[key]) for key, v in state.items()}
        state = step(state, k, **_bind(*fns, args), curvature_rows=_curvature_rows(fns[1], args, compact),
                     **opts, check=check)
    return state


def _curvature_rows(curvature, args, compact):
    """``(x_rows, idx) -> curvature`` of the problems ``idx`` alone (needs per-problem args), or None."""
    if curvature is None or not compact:
        return None
    return lambda x_rows, idx: curvature(x_rows, *(a[idx] for a in args))


def _initial_state(x: torch.Tensor, method: str, lr: float, damping: float) -> dict[str, torch.Tensor]:
    batch = x.shape[0]
    flags = torch.zeros(batch, dtype=torch.bool, device=x.device)
    state = {"x": x, "active": ~flags, "diverged": flags, "iterations": torch.zeros_like(flags, dtype=torch.long)}
    if method == "newton":
        state["nu"] = torch.full((batch,), damping, dtype=x.dtype, device=x.device)
        state["hess"] = torch.full((batch, x.shape[1], x.shape[1]), math.nan, dtype=x.dtype, device=x.device)
    else:
        state["step_size"] = torch.full((batch,), lr, dtype=x.dtype, device=x.device)
        state["m1"] = torch.zeros_like(x)
        state["m2"] = torch.zeros_like(x)
        # the last accepted point, for backtracking (an infinite value: nothing to undo yet)
        state["prev_x"] = x
        state["prev_value"] = torch.full((batch,), math.inf, dtype=x.dtype, device=x.device)
        state["prev_grad"] = torch.zeros_like(x)
    return state


def _slack(value: torch.Tensor) -> torch.Tensor:
    """Changes of the objective within float rounding are not a failed step."""
    return 8 * torch.finfo(value.dtype).eps * (1 + value.detach().abs())


def _newton_iteration(state, k, *, objective, tol, curvature, curvature_rows, max_abs, create_graph, check, **_):
    """Evaluate at x; stop converged problems; else damped Newton trials, accepted per problem."""
    x = state["x"]
    value, grad, hess, built = _newton_evaluate(state, objective, tol, curvature, curvature_rows, check, create_graph)
    finite = torch.isfinite(value.detach()) & torch.isfinite(grad.detach()).all(-1) & \
        torch.isfinite(hess.detach()).flatten(1).all(-1)
    diverged = state["diverged"] | (state["active"] & ~finite)
    active = state["active"] & finite & (relative_stationarity(value, grad) > tol)
    last_hess = torch.where(built[:, None, None], hess.detach(), state["hess"])
    if check and not bool(active.any()):
        return {**state, "active": active, "diverged": diverged, "hess": last_hess}
    new_x, nu, pending = _newton_trials(objective, x, state["nu"], value, grad, hess, finite, active, max_abs,
                                        create_graph, check)
    accepted = active & ~pending
    return {**state, "x": new_x, "nu": nu, "active": active, "diverged": diverged, "hess": last_hess,
            "iterations": state["iterations"] + accepted.long()}


def _newton_evaluate(state, objective, tol, curvature, curvature_rows, check, create_graph):
    """Value, gradient and curvature at x (exact Hessian, or ``curvature`` for the problems about to
    step), and which rows' curvature was built."""
    x = state["x"]
    if curvature is None:
        value, grad, hess = batched_hessian(objective, x, create_graph)
        return value, grad, hess, torch.ones_like(state["active"])
    value, grad = _value_and_grad(objective, x, create_graph)
    stepping = state["active"] & torch.isfinite(grad).all(-1) & (relative_stationarity(value, grad) > tol)
    if check and not bool(stepping.any()):  # all stopped: no curvature needed
        built = torch.zeros_like(stepping)
        hess = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
    else:
        hess, built = _curvature_where_stepping(curvature, curvature_rows, x, stepping, check, create_graph)
    return value, grad, hess, built


def _newton_trials(objective, x, nu, value, grad, hess, finite, active, max_abs, create_graph, check):
    """Up to ``TRIALS_PER_HESSIAN`` damped steps on this Hessian, accepted per problem: the new point,
    the updated damping and the problems still rejected after the last trial."""
    # Damping is a per-problem constant for the unrolled graph (like a step size): computed detached.
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    hess_d = torch.where(finite[:, None, None], hess.detach(), eye)
    eig = torch.linalg.eigvalsh(hess_d)
    scale = eig.abs().amax(-1).clamp_min(torch.finfo(x.dtype).tiny)
    shift = (-eig[:, 0]).clamp_min(0)
    safe_hess = torch.where(active[:, None, None], hess, eye)
    safe_grad = torch.where(active[:, None], grad, torch.zeros_like(grad))
    f0 = value.detach()
    tiny = torch.finfo(x.dtype).eps
    new_x, pending = x, active
    # A rejected step is retried at once with 8x the damping, reusing this iteration's Hessian
    # (a trial costs one objective evaluation; a new Hessian costs ~d gradient evaluations).
    for _ in range(TRIALS_PER_HESSIAN):
        mu = shift + nu * scale
        p = -torch.linalg.solve(safe_hess + mu[:, None, None] * eye, safe_grad.unsqueeze(-1)).squeeze(-1)
        trial = x + p
        with torch.enable_grad() if create_graph else torch.no_grad():
            tv = objective(trial).detach()
        predicted = -((safe_grad * p).sum(-1) + 0.5 * (p.unsqueeze(-2) @ safe_hess @ p.unsqueeze(-1)).flatten()).detach()
        ratio = (f0 - tv) / predicted.clamp_min(torch.finfo(x.dtype).tiny)
        # A predicted decrease below the rounding noise of f cannot be checked by evaluating f
        # (an objective that is a sum of large cancelling terms rounds far above eps * |f|):
        # there the quadratic model is trusted, else the damping would grow without end.
        unresolved = predicted <= NOISE_ULPS * torch.finfo(x.dtype).eps * (1 + f0.abs())
        ratio = torch.where(unresolved, torch.ones_like(ratio), ratio)
        in_bounds = torch.isfinite(tv) & (trial.detach().abs().amax(-1) <= max_abs)
        accept = pending & in_bounds & ((tv <= f0 + _slack(value)) | unresolved)
        new_x = torch.where(accept[:, None], trial, new_x)
        nu = torch.where(accept & (ratio > 0.75), (nu / 10).clamp_min(tiny), nu)
        nu = torch.where(accept & (ratio < 0.25), (nu * 4).clamp_max(1e8), nu)
        rejected = pending & ~accept
        nu = torch.where(rejected, (nu * 8).clamp_max(1e8), nu)
        pending = rejected
        if check and not bool(pending.any()):  # without a host read: all trials, masked
            break
    return new_x, nu, pending


def _curvature_where_stepping(curvature, curvature_rows, x, stepping, check, create_graph):
    """The curvature of the problems about to step, the identity for the others (a problem that has
    just converged costs one gradient, not a Hessian), and which rows were built. Subsets need the
    per-problem args (``compact``) and this iteration's host read (``check``); else all rows."""
    xc = x if create_graph else x.detach()
    idx = stepping.nonzero().squeeze(1) if (check and curvature_rows is not None) else None
    if idx is None or len(idx) == len(stepping):
        hess = curvature(xc)
        built = torch.ones_like(stepping)
    else:
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).repeat(x.shape[0], 1, 1)
        hess = eye.index_put((idx,), curvature_rows(xc[idx], idx))
        built = stepping
    return (hess if create_graph else hess.detach()), built


def _first_order_iteration(state, k, *, objective, method, tol, lr, momentum, betas, clip, max_abs,
                           create_graph, check, **_):
    """Evaluate at x; undo a step that made things worse (halve that problem's step); step again."""
    x, step_size, m1, m2 = state["x"], state["step_size"], state["m1"], state["m2"]
    value, grad = _value_and_grad(objective, x, create_graph)
    finite = torch.isfinite(value.detach()) & torch.isfinite(grad.detach()).all(-1)
    diverged = state["diverged"] | (state["active"] & ~finite)
    active = state["active"] & finite
    worse = active & (value.detach() > state["prev_value"].detach() + _slack(state["prev_value"]))
    w = worse[:, None]
    x = torch.where(w, state["prev_x"], x)
    value = torch.where(worse, state["prev_value"], value)
    grad = torch.where(w, state["prev_grad"], grad)
    m1 = torch.where(w, torch.zeros_like(m1), m1)
    step_size = torch.where(worse, step_size / 2, step_size)
    active = active & (relative_stationarity(value, grad) > tol)
    stopped = {**state, "x": x, "step_size": step_size, "m1": m1, "m2": m2, "active": active,
               "diverged": diverged, "prev_x": x, "prev_value": value, "prev_grad": grad,
               "iterations": state["iterations"] - worse.long()}  # an undone step is not an update
    if check and not bool(active.any()):
        return stopped
    g = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
    if clip is not None:
        norm = g.detach().norm(dim=-1)
        g = g * (clip / norm.clamp_min(1e-12)).clamp(max=1.0).unsqueeze(-1)
    if method == "sgd":
        m1 = momentum * m1 + g
        update = m1
    else:
        b1, b2 = betas
        t = k + 1
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        # sqrt(v + tiny): the plain sqrt has an infinite derivative at 0 (NaN in an unrolled backward).
        update = (m1 / (1 - b1**t)) / ((m2 / (1 - b2**t) + 1e-16).sqrt() + 1e-8)
    proposal = x - step_size[:, None] * update
    out = ~torch.isfinite(proposal.detach()).all(-1) | (proposal.detach().abs().amax(-1) > max_abs)
    diverged = diverged | (out & active)
    active = active & ~out
    return {**stopped, "x": torch.where(active[:, None], proposal, x), "m1": m1, "m2": m2, "active": active,
            "diverged": diverged, "iterations": stopped["iterations"] + active.long()}


def _finish(state, x0, objective, tol, max_abs) -> MinimizeResult:
    """Final evaluation at the returned point: value, stationarity, convergence; x0 where diverged."""
    x = state["x"]
    value, grad = _value_and_grad(objective, x, create_graph=False)
    iterations = state["iterations"]
    if "prev_x" in state:  # first-order: the last step is undone if it made things worse
        worse = value > state["prev_value"].detach() + _slack(state["prev_value"])
        if bool(worse.any()):
            x = torch.where(worse[:, None], state["prev_x"], x)
            value, grad = _value_and_grad(objective, x, create_graph=False)
            iterations = iterations - worse.long()
    finite = torch.isfinite(value) & torch.isfinite(grad).all(-1)
    diverged = state["diverged"] | ~finite
    if bool(diverged.any()):
        warnings.warn(
            f"minimize: {int(diverged.sum())}/{x.shape[0]} problems diverged (NaN/Inf or |x| > {max_abs}); "
            "they fall back to x0. Lower the step size or enable clipping.",
            MinimizeDivergenceWarning, stacklevel=3)
        x = torch.where(diverged[:, None], x0, x)
        value, grad = _value_and_grad(objective, x, create_graph=False)
    stat = relative_stationarity(value, grad)
    hessian = state.get("hess")
    if hessian is not None:
        hessian = torch.where(diverged[:, None, None], torch.full_like(hessian, math.nan), hessian)
    return MinimizeResult(x=x, value=value, grad_norm=grad.norm(dim=-1), stationarity=stat,
                          iterations=iterations, converged=(stat <= tol) & ~diverged,
                          diverged=diverged, tol=tol, hessian=hessian)
