"""Meta-learning an initialisation: MAML (unrolled) and iMAML (implicit), as plain torch functions.

Every task ``b`` adapts the shared meta-parameters ``theta`` (a flat vector of MLP weights) to its
support set, giving task weights ``phi_b``; the meta-loss is the query-set MSE at ``phi_b``.

- MAML (Finn et al. 2017): ``phi = K`` steps of gradient descent on the support loss from
  ``theta``; the meta-gradient backpropagates through the K steps (memory grows with K).
- iMAML (Rajeswaran et al. 2019): ``phi* = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2``,
  solved to stationarity by the core's batched minimiser without a graph; the IFT gives
  ``d phi*/d theta = lam (H + lam I)^{-1}`` with ``H`` the Hessian of the support loss at
  ``phi*``, applied by conjugate gradient on Hessian-vector products (``ift.implicit``). Memory
  does not depend on how many inner iterations the solve took. The proximal term is what makes
  ``phi*`` depend on ``theta`` at all (without it the optimum forgets its starting point).

All tasks are solved at once: weights are batched as ``(B, n)`` and the network runs with ``bmm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ift import hparams
from ift.implicit import LinearSolveInfo, MinimizeConfig, NonStationaryError, implicit_argmin, proximal_objective
from ift.implicit.core import IFTConfig as CoreIFTConfig
from ift.implicit.minimize import MinimizeResult, minimize


ACTIVATIONS = {"tanh": torch.tanh, "softplus": torch.nn.functional.softplus, "relu": torch.relu}


class FunctionalMLP:
    """An MLP whose weights are one flat vector per task: ``net(phi (B, n), x (B, m, d_in))``.

    ``phi`` of shape ``(n,)`` is shared by all tasks. Layer ``l`` stores ``W_l (out, in)`` then
    ``b_l (out,)``, in order. The activation defaults to tanh: the IFT needs a twice
    differentiable inner objective, and a gradient method cannot reach a tight stationarity on a
    ReLU network's kinks (it zigzags across them); ReLU stays available for MAML.
    """

    def __init__(self, hidden: Sequence[int] = (40, 40), in_dim: int = 1, out_dim: int = 1, activation: str = "tanh"):
        widths = [int(in_dim), *(int(h) for h in hidden), int(out_dim)]
        hparams.require(all(w >= 1 for w in widths), "hidden", "positive widths", list(hidden))
        hparams.one_of("activation", activation, sorted(ACTIVATIONS))
        self.activation = ACTIVATIONS[activation]
        self.layers = [(fan_out, fan_in) for fan_in, fan_out in zip(widths[:-1], widths[1:])]
        self.num_params = sum(o * i + o for o, i in self.layers)

    def init(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """PyTorch's ``nn.Linear`` default: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        parts = []
        for fan_out, fan_in in self.layers:
            bound = 1.0 / math.sqrt(fan_in)
            parts.append((torch.rand(fan_out * fan_in + fan_out, generator=generator, dtype=dtype) * 2 - 1) * bound)
        return torch.cat(parts)

    def __call__(self, phi: Tensor, x: Tensor) -> Tensor:
        batch = x.shape[0]
        if phi.shape[-1] != self.num_params:
            raise ValueError(f"FunctionalMLP: weights have {phi.shape[-1]} entries, the network needs {self.num_params}")
        phi = phi.expand(batch, -1) if phi.dim() == 1 else phi
        h, offset = x, 0
        for layer, (fan_out, fan_in) in enumerate(self.layers):
            weight = phi[:, offset : offset + fan_out * fan_in].reshape(batch, fan_out, fan_in)
            offset += fan_out * fan_in
            bias = phi[:, offset : offset + fan_out]
            offset += fan_out
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            if layer < len(self.layers) - 1:
                h = self.activation(h)
        return h


def task_mse(net: FunctionalMLP, phi: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of each task, shape ``(B,)``."""
    return (net(phi, x) - y).pow(2).mean(dim=(1, 2))


def task_objective(net: FunctionalMLP, phi: Tensor, theta: Tensor, x: Tensor, y: Tensor, lam: float) -> Tensor:
    """iMAML's inner objective per task: ``L_support(phi) + lam/2 ||phi - theta||^2`` (the core's
    proximal objective with ``eta = 1 / lam``), shape ``(B,)``."""
    return proximal_objective(lambda p: task_mse(net, p, x, y), theta, 1.0 / lam)(phi)


def gradient_steps(
    net: FunctionalMLP, theta: Tensor, x: Tensor, y: Tensor, steps: int, lr: float, create_graph: bool
) -> Tensor:
    """``steps`` plain gradient steps on each task's support MSE from ``theta``: MAML's inner loop
    (``create_graph=True``: differentiable, every step kept in the graph) and the fixed-budget
    adaptation used at meta-test time for every method."""
    phi = theta.expand(x.shape[0], -1)
    if not create_graph:
        phi = phi.detach()
    for _ in range(steps):
        with torch.enable_grad():
            if not phi.requires_grad:
                phi = phi.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(task_mse(net, phi, x, y).sum(), phi, create_graph=create_graph)
        phi = phi - lr * grad
        if not create_graph:
            phi = phi.detach()
    return phi


@dataclass(frozen=True)
class IFTConfig(CoreIFTConfig):
    """iMAML's IFT linear solve (``model.ift.*``): the core's ``IFTConfig`` under iMAML's key."""

    group: ClassVar[str] = "model.ift"


@dataclass(frozen=True)
class InnerSolver(MinimizeConfig):
    """Settings of iMAML's inner solve (``model.inner.*``): the core's ``MinimizeConfig`` with iMAML's
    defaults; the IFT's linear solve is set by :class:`IFTConfig` (``model.ift.*``).

    ``nonstationary``: what to do with tasks whose inner solve stopped above ``tol`` (the IFT's
    condition 1 fails there, so their meta-gradient is not the derivative of anything):
    ``drop`` them from the meta-loss (default), ``ift`` (use the IFT anyway) or ``error``.
    """

    method: str = "sgd"
    max_iter: int = 300
    tol: float = 1e-3
    lr: float = 0.05
    momentum: float = 0.9

    group: ClassVar[str] = "model.inner"
    renamed: ClassVar[dict[str, str]] = {**MinimizeConfig.renamed, "cg_tol": "model.ift.tol",
                                         "cg_maxiter": "model.ift.max_iter"}

    def __post_init__(self) -> None:
        super().__post_init__()
        hparams.integer("inner.max_iter", self.max_iter, 1)
        hparams.positive("inner.tol", self.tol)
        hparams.in_range("inner.momentum", self.momentum, 0, 1)


def solve_inner(net: FunctionalMLP, theta: Tensor, x: Tensor, y: Tensor, lam: float, inner: InnerSolver) -> MinimizeResult:
    """Minimise every task's proximal objective from ``theta``, without a graph. The per-task data go
    through ``args`` so that the minimiser can drop finished tasks (``compact``): the slowest tasks
    then cost what they cost, not what the whole meta-batch costs."""
    theta_b = theta.detach().expand(x.shape[0], -1)
    return minimize(
        lambda phi, t, xs, ys: task_objective(net, phi, t, xs, ys, lam),
        theta_b.clone(),
        args=(theta_b, x, y),
        compact=True,
        **inner.minimize_kwargs(),
    )


def imaml_adapt(
    net: FunctionalMLP,
    theta: Tensor,
    x: Tensor,
    y: Tensor,
    lam: float,
    inner: InnerSolver,
    ift: IFTConfig = IFTConfig(),
    on_solve: Callable[[LinearSolveInfo], Any] | None = None,
) -> tuple[Tensor, MinimizeResult]:
    """Task weights ``phi*`` (B, n) attached to ``theta`` by the IFT, and the inner solve's report."""
    result = solve_inner(net, theta, x, y, lam, inner)
    if inner.nonstationary == "error" and not bool(result.converged.all()):
        raise NonStationaryError(
            f"iMAML: {int((~result.converged).sum())}/{len(result.converged)} inner solves stopped above "
            f"model.inner.tol={inner.tol} (max stationarity {float(result.stationarity.max()):.2e}); raise "
            "model.inner.max_iter or lam, or set model.inner.nonstationary=drop"
        )
    phi = implicit_argmin(
        lambda p, t: task_objective(net, p, t, x, y, lam).sum(),
        result.x,
        theta,
        batch_dims=1,
        **ift.solver_kwargs(),
        on_solve=on_solve,
    )
    return phi, result


def meta_loss(per_task: Tensor, keep: Tensor | None = None) -> Tensor:
    """Mean query loss over the kept tasks (all when ``keep`` is None; 0 with no graph if none kept)."""
    if keep is None:
        return per_task.mean()
    weights = keep.to(per_task.dtype)
    return (per_task * weights).sum() / weights.sum().clamp_min(1.0)
