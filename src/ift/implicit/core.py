"""Implicit differentiation of a solution ``x*`` of ``F(x*, params) = 0`` (the IFT).

Given ``v = dL/dx*``, the IFT gives ``dL/dparams = -(dF/dparams)^T u`` with ``(dF/dx)^T u = v``.
The forward solver is any code the caller ran (under ``torch.no_grad()``); the autograd node keeps
only ``x*`` and the params, and its backward re-evaluates ``F`` once at ``x*`` to get
vector-Jacobian products, so memory does not depend on how many iterations the solver took.

Three entry points share one autograd.Function:
``implicit_root``        ``F(x, *params) = 0``
``implicit_argmin``      ``grad_x f(x, *params) = 0`` (stationary point of a scalar ``f``)
``implicit_fixed_point`` ``x = T(x, *params)``, i.e. ``F = x - T(x, *params)``

Works with ``torch.func.grad`` / ``torch.func.vjp`` but not ``vmap`` (nor ``jacrev``, which
vmaps), since the solvers stop on data-dependent tests; ``batch_dims`` covers batches.
Only first-order gradients are supported: the backward treats ``x*`` as a constant, so
differentiating the backward again (``create_graph=True``, nested ``torch.func.grad``) would miss
the second-order IFT terms; it raises instead.

Precision: the backward's linearization and linear solve run with autocast disabled, in float32
at least: ``x*``, the incoming gradient and float16 / bfloat16 tensor params are upcast (the
gradients are cast back to each param's dtype). A bf16 CG cannot reach a useful tolerance. Tensors
``F`` closes over are not upcast: pass low-precision ones as params.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from ift.implicit.config import ConfigGroup, reject_renamed  # noqa: F401  (reject_renamed: re-exported)
from ift.implicit.diagnostics import ImplicitSolveError, ImplicitSolveWarning
from ift.implicit.linear_solvers import LinearSolveInfo, LinearSolver, default_tol, get_linear_solver

_KINDS = ("root", "argmin", "fixed_point")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def at_least_float32(value: Any) -> Any:
    """Upcast a float16 / bfloat16 tensor to float32; anything else unchanged (the working precision of
    the backward's solve, and of an application's inner solve under autocast)."""
    if isinstance(value, torch.Tensor) and value.dtype in _LOW_PRECISION:
        return value.float()
    return value




@dataclass(frozen=True)
class IFTConfig(ConfigGroup):
    """Settings of an application's implicit backward, named as the arguments of
    :func:`implicit_argmin`: ``linear_solver``, ``tol`` (None: the per-dtype default), ``max_iter``,
    ``ridge``. Applications set ``group`` (their config key, for the error messages) by subclassing,
    and may add fields. ``renamed``: old keys that fail with one line naming the new key."""

    linear_solver: str = "cg"
    tol: float | None = None
    max_iter: int = 100
    ridge: float = 0.0

    group: ClassVar[str] = "ift"
    renamed: ClassVar[dict[str, str]] = {"solver": "linear_solver", "maxiter": "max_iter"}

    def __post_init__(self) -> None:
        try:  # unknown solver names and bad settings fail here, not at the first backward
            get_linear_solver(self.linear_solver, tol=self.tol, max_iter=self.max_iter, ridge=self.ridge)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.group}.linear_solver: {err}") from None

    def solver_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of implicit_root / implicit_argmin / implicit_fixed_point."""
        return {"linear_solver": self.linear_solver, "tol": self.tol, "max_iter": self.max_iter, "ridge": self.ridge}


class SuppliedSolve(LinearSolver):
    """The adjoint hook: the backward's linear solve ``(dF/dx)^T u = v`` done by the application.

    ``inverse(v) -> u`` maps ``v`` of shape ``(B, n)`` (one row per problem, ``batch_dims``
    flattened as for every solver) to ``u`` of the same shape, typically by reusing a factorisation
    the forward solver already built (a QP's KKT factor, a sparse or banded LU). The core does not
    trust it: the answer is verified with one true product of ``(dF/dx)^T`` (plus ``ridge I``, so a
    damped solve must solve the damped system) and reported as a :class:`LinearSolveInfo` through
    ``on_solve`` like any solver's; a row whose relative residual is above ``tol`` (a wrong or
    stale factor) is not converged and triggers the usual :class:`ImplicitSolveWarning`.
    ``max_iter`` > 1 allows that many solves in total, the later ones as iterative refinement
    ``u += correct(v - (dF/dx)^T u)`` of the unconverged rows, each verified by one more product;
    ``correct`` defaults to ``inverse`` (pass a cheaper map with the same factor, e.g. a solve
    without the application's own refinement). The default ``max_iter`` 1 is one solve and one
    verifying product.

    Pass an instance as ``linear_solver``: ``implicit_root(F, x, *params,
    linear_solver=SuppliedSolve(factor.solve))``.
    """

    name = "supplied"

    def __init__(self, inverse: Callable[[torch.Tensor], torch.Tensor], tol: float | None = None,
                 max_iter: int | None = 1, ridge: float = 0.0,
                 correct: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(tol, max_iter, ridge)
        for name, fn in (("inverse", inverse), ("correct", correct)):
            if fn is not None and not callable(fn) or fn is None and name == "inverse":
                raise TypeError(f"SuppliedSolve: {name} must be a callable v -> u, got {type(fn).__name__}")
        self.inverse, self.correct = inverse, inverse if correct is None else correct

    def default_max_iter(self, n: int) -> int:
        return 1

    def solve(self, matvec, b: torch.Tensor) -> tuple[torch.Tensor, LinearSolveInfo]:
        """``u = inverse(b)``, refined up to ``max_iter`` applications, and its verified residual."""
        tol = self.tol if self.tol is not None else default_tol(b.dtype)
        max_iter = self.max_iter if self.max_iter is not None else 1
        op = self._damped(matvec)
        u = self._applied(self.inverse, b, b)
        iterations = torch.ones(b.shape[0], dtype=torch.long, device=b.device)
        b_norm = b.norm(dim=-1)
        scale = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        while True:
            r = b - op(u)  # the one true product per application: nothing unverified is reported
            rel = r.norm(dim=-1) / scale
            unfinished = ~(rel <= tol)
            if int(iterations.max()) >= max_iter or not bool(unfinished.any()):
                break
            u = torch.where(unfinished.unsqueeze(-1), u + self._applied(self.correct, r, b), u)
            iterations = iterations + unfinished.long()
        converged = (rel <= tol) & torch.isfinite(rel)
        return u, LinearSolveInfo(solver=self.name, iterations=iterations, residual=rel.detach(),
                                  converged=converged, tol=tol, max_iter=max_iter)

    @staticmethod
    def _applied(fn, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        u = fn(v)
        if not isinstance(u, torch.Tensor) or u.shape != b.shape:
            got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"SuppliedSolve: inverse(v) must return a tensor shaped like v {tuple(b.shape)}, got {got}")
        return u.to(b.dtype)


@dataclass(frozen=True)
class _Problem:
    """Everything the backward needs besides the saved tensors."""

    kind: str
    fn: Callable[..., torch.Tensor]
    solver: LinearSolver
    batch_dims: int
    on_solve: Callable[[LinearSolveInfo], Any] | None
    tensor_slots: tuple[bool, ...]  # which params are tensors (the others are passed through)

    def residual(self, x: torch.Tensor, params: Sequence[Any]) -> torch.Tensor:
        """``F(x, *params)`` for root / fixed point; for argmin the caller differentiates ``f``."""
        if self.kind == "fixed_point":
            return x - self._checked_output(self.fn(x, *params), x, "T")
        return self._checked_output(self.fn(x, *params), x, "F")

    @staticmethod
    def _checked_output(out: Any, x: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{name}(x, *params) must return a tensor shaped like x {tuple(x.shape)}, got {shape}")
        return out


def _merge(params: Sequence[Any], picked: Sequence[int], values: Sequence[torch.Tensor]) -> list[Any]:
    merged = list(params)
    for i, value in zip(picked, values):
        merged[i] = value
    return merged


def _scalar_objective(f: Callable[..., torch.Tensor], x: torch.Tensor, params: Sequence[Any]) -> torch.Tensor:
    value = f(x, *params)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"implicit_argmin: f(x, *params) must return a scalar, got {shape}; for a batch of "
            "independent problems return the SUM of the per-problem objectives and set batch_dims"
        )
    return value.reshape(())


def _functorch_level() -> int | None:
    """Current torch.func transform level, None outside torch.func transforms."""
    return torch._C._functorch.maybe_current_level()


class _AutogradLinearization:
    """VJPs of ``F`` at ``x*`` from one retained autograd graph (plain eager mode)."""

    def __init__(self, problem: _Problem, x_star: torch.Tensor, params: list[Any], picked: list[int]):
        with torch.enable_grad():
            self.x = x_star.detach().requires_grad_(True)
            self.inputs = [params[i].detach().requires_grad_(True) for i in picked]
            merged = _merge(params, picked, self.inputs)
            if problem.kind == "argmin":
                value = _scalar_objective(problem.fn, self.x, merged)
                if not value.requires_grad:
                    raise ImplicitSolveError("implicit_argmin: f does not depend on x or params; nothing to differentiate")
                (grad,) = torch.autograd.grad(value, self.x, create_graph=True, allow_unused=True)
                self.value = grad if grad is not None else torch.zeros_like(self.x)
            else:
                self.value = problem.residual(self.x, merged)

    def vjp_x(self, w: torch.Tensor) -> torch.Tensor:
        if not self.value.requires_grad:
            return torch.zeros_like(self.x)
        (out,) = torch.autograd.grad(self.value, self.x, w, retain_graph=True, allow_unused=True)
        return out if out is not None else torch.zeros_like(self.x)

    def vjp_params(self, w: torch.Tensor) -> list[torch.Tensor | None]:
        if not self.value.requires_grad:
            return [None] * len(self.inputs)
        return list(torch.autograd.grad(self.value, self.inputs, w, allow_unused=True))


class _FuncLinearization:
    """The same VJPs with torch.func, so the implicit layer composes with torch.func.grad / jacrev."""

    def __init__(self, problem: _Problem, x_star: torch.Tensor, params: list[Any], picked: list[int]):
        self.problem, self.x_star, self.params, self.picked = problem, x_star, params, picked
        self.value, self._vjp_x = torch.func.vjp(lambda x: self._residual(x, params), x_star)

    def _residual(self, x: torch.Tensor, params: Sequence[Any]) -> torch.Tensor:
        if self.problem.kind == "argmin":
            return torch.func.grad(lambda y: _scalar_objective(self.problem.fn, y, params))(x)
        return self.problem.residual(x, params)

    def vjp_x(self, w: torch.Tensor) -> torch.Tensor:
        return self._vjp_x(w)[0]

    def vjp_params(self, w: torch.Tensor) -> list[torch.Tensor | None]:
        chosen = [self.params[i] for i in self.picked]
        _, vjp_fn = torch.func.vjp(lambda *p: self._residual(self.x_star, _merge(self.params, self.picked, p)), *chosen)
        return list(vjp_fn(w))


def _refuse_higher_order(tensors: Sequence[torch.Tensor]) -> None:
    """Raise when the backward itself would be differentiated (its result would miss terms)."""
    functorch = torch._C._functorch

    def differentiated_again(t: torch.Tensor) -> bool:
        if functorch.is_gradtrackingtensor(t):
            # Inside torch.func.grad / vjp the outer wrapper is the level being differentiated now;
            # a second wrapper underneath means an enclosing transform differentiates this backward.
            return functorch.is_gradtrackingtensor(functorch.get_unwrapped(t))
        return torch.is_grad_enabled() and t.requires_grad  # plain autograd with create_graph=True

    higher = any(differentiated_again(t) for t in tensors)
    if higher:
        raise RuntimeError(
            "implicit differentiation supports first-order gradients only: the backward would be "
            "differentiated again (create_graph=True or nested torch.func.grad/hessian), which would "
            "silently drop second-order IFT terms. Differentiate once, or unroll the solver instead."
        )


class _ImplicitFunction(torch.autograd.Function):
    """Identity on ``x*`` in forward; the IFT in backward. Saves only ``x*`` and tensor params."""

    @staticmethod
    def forward(problem: _Problem, x_star: torch.Tensor, *params: Any) -> torch.Tensor:
        return x_star.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, x_star, *params = inputs
        ctx.problem = problem
        ctx.non_tensors = [None if is_tensor else p for p, is_tensor in zip(params, problem.tensor_slots)]
        ctx.save_for_backward(x_star, *[p for p in params if isinstance(p, torch.Tensor)])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        problem: _Problem = ctx.problem
        x_star, params = _saved_inputs(ctx)
        picked = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        if not picked:
            return (None, None) + (None,) * len(params)
        _refuse_higher_order([params[i] for i in picked])
        _refuse_vmap(problem, grad_output)
        if bool(torch.isfinite(grad_output).all()):
            grads = _ift_gradients_in_working_precision(problem, x_star, params, picked, grad_output)
        else:
            grads = _nan_gradients(problem, params, picked)
        out: list[torch.Tensor | None] = [None] * len(params)
        for i, g in zip(picked, grads):
            out[i] = g
        return (None, None, *out)


def _saved_inputs(ctx) -> tuple[torch.Tensor, list[Any]]:
    """``x*`` and the params in their original order: saved tensors merged with the non-tensors."""
    x_star, *saved = ctx.saved_tensors
    saved_iter = iter(saved)
    params = [next(saved_iter) if is_tensor else p for p, is_tensor in zip(ctx.non_tensors, ctx.problem.tensor_slots)]
    return x_star, params


def _refuse_vmap(problem: _Problem, grad_output: torch.Tensor) -> None:
    """Raise under torch.func.vmap: the solvers' data-dependent stopping cannot be batched that way."""
    if torch._C._functorch.is_batchedtensor(grad_output):
        raise RuntimeError(
            f"implicit_{problem.kind} does not support torch.func.vmap (nor jacrev/jacfwd/hessian, which "
            "use it): its iterative linear solvers stop on data-dependent tests. Use batch_dims for "
            "batches of problems and torch.autograd.functional.jacobian for Jacobians."
        )


def _nan_gradients(problem: _Problem, params: list[Any], picked: list[int]) -> list[torch.Tensor]:
    """NaN gradients for a NaN/Inf incoming gradient: propagated, as plain autograd would (e.g.
    AMP's GradScaler relies on seeing the Inf), with a warning."""
    warnings.warn(ImplicitSolveWarning(f"implicit_{problem.kind}: incoming gradient has NaN/Inf; gradients are NaN"))
    return [torch.full_like(params[i], float("nan")) for i in picked]


def _ift_gradients_in_working_precision(
    problem: _Problem, x_star: torch.Tensor, params: list[Any], picked: list[int], grad_output: torch.Tensor
) -> list[torch.Tensor | None]:
    """:func:`_ift_gradients` without autocast, in float32 at least; each gradient in its param's dtype."""
    with torch.autocast(device_type=x_star.device.type, enabled=False):
        grads = _ift_gradients(problem, at_least_float32(x_star), [at_least_float32(p) for p in params], picked,
                               at_least_float32(grad_output))
    return [g if g is None else g.to(params[i].dtype) for i, g in zip(picked, grads)]


def _ift_gradients(
    problem: _Problem, x_star: torch.Tensor, params: list[Any], picked: list[int], grad_output: torch.Tensor
) -> list[torch.Tensor | None]:
    """``-(dF/dparams)^T u`` with ``(dF/dx)^T u = grad_output``, for the params in ``picked``."""
    linearization_cls = _AutogradLinearization if _functorch_level() is None else _FuncLinearization
    lin = linearization_cls(problem, x_star, params, picked)
    _check_finite_residual(problem, lin.value)
    u = _adjoint_solve(problem, lin, x_star.shape, grad_output)
    return lin.vjp_params(-u)


def _check_finite_residual(problem: _Problem, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        name = "grad_x f" if problem.kind == "argmin" else "F"
        raise ImplicitSolveError(
            f"implicit_{problem.kind}: {name}(x_star, *params) contains NaN/Inf; check x_star and the "
            "params (the forward solver may have diverged)"
        )


def _adjoint_solve(problem: _Problem, lin: _AutogradLinearization | _FuncLinearization, shape: torch.Size, grad_output: torch.Tensor) -> torch.Tensor:
    """``u`` (shaped like ``x*``) with ``(dF/dx)^T u = grad_output``: one linear system per problem,
    solved by the batched solver and reported through ``on_solve``."""
    batch = int(torch.Size(shape[: problem.batch_dims]).numel())
    u, info = problem.solver.solve(lambda w: lin.vjp_x(w.reshape(shape)).reshape(batch, -1), grad_output.reshape(batch, -1))
    info.root_residual = lin.value.detach().reshape(batch, -1).norm(dim=-1)
    if not bool(torch.isfinite(u).all()):
        raise ImplicitSolveError(
            f"implicit_{problem.kind}: the {info.solver} linear solve gave NaN/Inf: dF/dx is singular or the "
            "solver diverged at x_star (IFT condition 3); try ridge > 0 or linear_solver='direct'"
        )
    _report(problem, info)
    return u.reshape(shape)


def _report(problem: _Problem, info: LinearSolveInfo) -> None:
    if problem.on_solve is not None:
        problem.on_solve(info)
    if not info.all_converged:
        warnings.warn(
            ImplicitSolveWarning(
                f"implicit_{problem.kind}: backward linear solve did not converge ({info.summary()}). "
                "dF/dx may be singular or ill-conditioned at x_star (IFT condition 3), so the gradient "
                "is inaccurate; raise max_iter, add ridge damping, or use linear_solver='direct'."
            ),
            stacklevel=2,
        )


def _implicit(
    kind: str,
    fn: Callable[..., torch.Tensor],
    x_star: torch.Tensor,
    params: tuple[Any, ...],
    batch_dims: int,
    linear_solver: str | LinearSolver | type[LinearSolver],
    tol: float | None,
    max_iter: int | None,
    ridge: float | None,
    on_solve: Callable[[LinearSolveInfo], Any] | None,
) -> torch.Tensor:
    name = f"implicit_{kind}"
    if not callable(fn):
        raise TypeError(f"{name}: the first argument must be a callable, got {type(fn).__name__}")
    if not isinstance(x_star, torch.Tensor) or not x_star.is_floating_point():
        got = x_star.dtype if isinstance(x_star, torch.Tensor) else type(x_star).__name__
        raise TypeError(f"{name}: x_star must be a floating-point tensor, got {got}")
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or not 0 <= batch_dims <= x_star.dim():
        raise ValueError(
            f"{name}: batch_dims must be an int in [0, x_star.dim()={x_star.dim()}] (the number of leading "
            f"dims indexing independent problems), got {batch_dims!r}"
        )
    if on_solve is not None and not callable(on_solve):
        raise TypeError(f"{name}: on_solve must be a callable taking a LinearSolveInfo, got {type(on_solve).__name__}")
    for i, p in enumerate(params):
        if isinstance(p, torch.Tensor) and p.requires_grad and not p.is_floating_point():
            raise TypeError(f"{name}: params[{i}] requires grad but has dtype {p.dtype}")
    problem = _Problem(
        kind=kind,
        fn=fn,
        solver=get_linear_solver(linear_solver, tol=tol, max_iter=max_iter, ridge=ridge),
        batch_dims=batch_dims,
        on_solve=on_solve,
        tensor_slots=tuple(isinstance(p, torch.Tensor) for p in params),
    )
    # x_star's own history (if the solver ran with grad) is replaced by the IFT, so it is cut here.
    return _ImplicitFunction.apply(problem, x_star.detach(), *params)


def implicit_root(
    F: Callable[..., torch.Tensor],
    x_star: torch.Tensor,
    *params: Any,
    batch_dims: int = 0,
    linear_solver: str | LinearSolver | type[LinearSolver] = "gmres",
    tol: float | None = None,
    max_iter: int | None = None,
    ridge: float | None = None,
    on_solve: Callable[[LinearSolveInfo], Any] | None = None,
) -> torch.Tensor:
    """Attach a root ``x_star`` of ``F(x, *params) = 0`` to the autograd graph via the IFT.

    Args:
        F: residual, ``F(x, *params)`` returns a tensor shaped like ``x``.
        x_star: a solution found by any solver (its autograd history is ignored).
        *params: tensors (or other objects, passed through) ``F`` depends on; each tensor that
            requires grad receives ``-(dF/dparam)^T (dF/dx)^{-T} v``. Tensors ``F`` closes over
            instead of receiving them here get no gradient.
        batch_dims: number of leading dims of ``x_star`` indexing independent problems; ``F`` must
            not mix them (block-diagonal ``dF/dx``). Each problem keeps its own solver state.
        linear_solver: "gmres" (default, any nonsingular ``dF/dx``), "bicgstab" (cheaper per
            iteration, can break down on symmetric indefinite systems such as KKT matrices),
            "cg" (symmetric definite ``dF/dx``), "direct" (small problems), "neumann", or a
            :class:`LinearSolver` class / instance.
        tol, max_iter, ridge: settings of a solver given by name or class. ``ridge`` solves with
            ``dF/dx + ridge I`` (damping: biases the gradient, helps near-singular problems).
        on_solve: called with the :class:`LinearSolveInfo` of each backward solve.

    Returns:
        A tensor equal to ``x_star``.
    """
    return _implicit("root", F, x_star, params, batch_dims, linear_solver, tol, max_iter, ridge, on_solve)


def implicit_argmin(
    f: Callable[..., torch.Tensor],
    x_star: torch.Tensor,
    *params: Any,
    batch_dims: int = 0,
    linear_solver: str | LinearSolver | type[LinearSolver] = "cg",
    tol: float | None = None,
    max_iter: int | None = None,
    ridge: float | None = None,
    on_solve: Callable[[LinearSolveInfo], Any] | None = None,
) -> torch.Tensor:
    """Attach a minimiser ``x_star`` of a scalar ``f(x, *params)`` to the autograd graph via the IFT.

    Uses ``F = grad_x f`` and Hessian-vector products, solving ``H u = v`` (``H`` symmetric).

    Sign conventions: any stationary point with a nonsingular Hessian gets the right gradient,
    whether a minimum or a maximum (the IFT formula is invariant to ``f -> -f``). The default
    ``cg`` needs ``H`` definite: positive at a minimum, negative at a maximum; both work. For a
    saddle use "gmres" or "direct". ``ridge`` solves with ``H + ridge I``, which damps a
    *minimisation* (positive definite ``H``); for a maximisation pass ``-objective`` so that
    ridge damping moves the spectrum away from zero rather than towards it.

    Batched problems: with ``batch_dims=k``, ``f`` returns the SUM over the ``k`` leading dims of
    independent per-problem objectives, so the Hessian is block-diagonal; each problem then keeps
    its own CG step sizes and stopping test. See :func:`implicit_root` for the other arguments.
    """
    return _implicit("argmin", f, x_star, params, batch_dims, linear_solver, tol, max_iter, ridge, on_solve)


def implicit_fixed_point(
    T: Callable[..., torch.Tensor],
    x_star: torch.Tensor,
    *params: Any,
    batch_dims: int = 0,
    linear_solver: str | LinearSolver | type[LinearSolver] = "gmres",
    tol: float | None = None,
    max_iter: int | None = None,
    ridge: float | None = None,
    on_solve: Callable[[LinearSolveInfo], Any] | None = None,
) -> torch.Tensor:
    """Attach a fixed point ``x_star = T(x_star, *params)`` to the autograd graph via the IFT.

    Uses ``F = x - T(x, *params)``, so the backward solves ``(I - dT/dx)^T u = v``; for a
    contraction ``T`` the "neumann" solver with ``alpha=1`` is the classical series
    ``u = sum_k (dT/dx^T)^k v``. See :func:`implicit_root` for the other arguments.
    """
    return _implicit("fixed_point", T, x_star, params, batch_dims, linear_solver, tol, max_iter, ridge, on_solve)
