"""LightningModule: meta-learn an MLP initialisation on few-shot regression with MAML or iMAML.

A batch is ``B`` tasks ``(x_support, y_support, x_query, y_query)`` (``ift.data.sinusoid``). The
meta-parameters are one flat vector ``theta``; each task adapts it to ``phi_b`` on its support set
(``method=maml``: ``inner_steps`` unrolled gradient steps; ``method=imaml``: the proximal problem
solved to stationarity, differentiated by the IFT) and the meta-loss is the query MSE at ``phi_b``.

Logged: ``train/loss`` (meta-loss); for iMAML, recorded in ``solves`` and logged by
``ift.telemetry.SolverDiagnostics``: ``inner/*`` (the inner solve: mean and max iterations, max
stationarity, share of tasks above tolerance; val/test ``{stage}/inner_*``) and ``ift/linsolve_*``
(CG iterations and residual of the backward solve); for val/test ``{stage}/loss`` = query MSE
after the method's own adaptation, plus
``{stage}/mse_gd{k}`` = query MSE after ``k`` plain gradient steps of size ``eval_lr`` for every
``k`` in ``eval_steps``: the same protocol for both methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from ift import hparams
from ift.implicit import InnerSolveInfo, SolveRecorder
from ift.imaml.meta import (
    FunctionalMLP,
    IFTConfig,
    InnerSolver,
    gradient_steps,
    imaml_adapt,
    meta_loss,
    solve_inner,
    task_mse,
)

METHODS = ("maml", "imaml")


class IMAMLInnerInfo(InnerSolveInfo):
    """iMAML's names for its inner-solve statistics (``nonstationary_frac``: the tasks kept out of
    the meta-loss by ``nonstationary=drop``, diverged ones included)."""

    names: ClassVar[dict[str, str]] = {"iterations": "mean_iterations", "max_iterations": "max_iterations",
                                       "stationarity": "max_stationarity", "nonstationary_frac": "unconverged_frac"}
    stage_key: ClassVar[str] = "{stage}/{kind}_{name}"


class MetaRegression(L.LightningModule):
    """MAML / iMAML on few-shot regression.

    Args:
        method: ``maml`` (unrolled inner loop) or ``imaml`` (implicit meta-gradient).
        hidden: hidden widths of the MLP (Finn et al.: 40, 40); input and output are scalars.
        activation: ``tanh`` (default; smooth, see ``FunctionalMLP``), ``softplus`` or ``relu``.
        inner_steps, inner_lr: MAML's inner loop (gradient steps on the support MSE).
        lam: iMAML's proximal strength (``lam/2 ||phi - theta||^2``).
        inner: iMAML's inner solver settings (``InnerSolver`` fields).
        ift: iMAML's IFT linear solve (``IFTConfig`` fields: ``linear_solver``, ``tol``, ``max_iter``, ``ridge``).
        meta_lr: Adam learning rate of ``theta``.
        eval_steps, eval_lr: val/test adaptation budgets (gradient steps) and step size
            (default ``inner_lr``).
        init_seed: seed of the initial ``theta``.
    """

    def __init__(
        self,
        method: str = "imaml",
        hidden: Sequence[int] = (40, 40),
        activation: str = "tanh",
        inner_steps: int = 5,
        inner_lr: float = 0.03,
        lam: float = 2.0,
        inner: dict[str, Any] | None = None,
        ift: dict[str, Any] | None = None,
        meta_lr: float = 0.003,
        eval_steps: Sequence[int] = (0, 1, 5, 10),
        eval_lr: float | None = None,
        init_seed: int = 0,
    ):
        super().__init__()
        self.method = hparams.one_of("method", method, METHODS)
        self.save_hyperparameters()
        self.inner_steps = hparams.integer("inner_steps", inner_steps, 1)
        self.inner_lr = hparams.positive("inner_lr", inner_lr)
        self.lam = hparams.positive("lam", lam)
        self.meta_lr = hparams.positive("meta_lr", meta_lr)
        self.eval_lr = self.inner_lr if eval_lr is None else hparams.positive("eval_lr", eval_lr)
        self.eval_steps = [hparams.integer("eval_steps", k) for k in eval_steps]
        self.ift = IFTConfig.from_dict(ift)
        self.inner = InnerSolver.from_dict(inner)
        self.net = FunctionalMLP(hidden, activation=activation)
        self.theta = nn.Parameter(self.net.init(torch.Generator().manual_seed(hparams.integer("init_seed", init_seed))))
        self.solves = SolveRecorder()  # the inner solve and the backward's CG solve, logged by SolverDiagnostics

    # --- adaptation ---

    def adapt(self, xs: Tensor, ys: Tensor, create_graph: bool) -> tuple[Tensor, Tensor | None]:
        """Task weights ``phi`` (B, n) and the mask of tasks kept in the meta-loss (None: all). iMAML
        records its inner solve in ``solves`` (kind ``"inner"``)."""
        if self.method == "maml":
            return gradient_steps(self.net, self.theta, xs, ys, self.inner_steps, self.inner_lr, create_graph), None
        if create_graph:
            phi, result = imaml_adapt(self.net, self.theta, xs, ys, self.lam, self.inner, self.ift,
                                      on_solve=self.solves.record)
        else:
            result = solve_inner(self.net, self.theta, xs, ys, self.lam, self.inner)
            phi = result.x
        self.solves.record(IMAMLInnerInfo.from_result(result), "inner")
        keep = result.converged if self.inner.nonstationary == "drop" else None
        return phi, keep

    # --- Lightning hooks ---

    def training_step(self, batch, batch_idx):
        xs, ys, xq, yq = batch
        phi, keep = self.adapt(xs, ys, create_graph=True)
        loss = meta_loss(task_mse(self.net, phi, xq, yq), keep)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(xs))
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        # Adaptation needs gradients even in validation (Lightning runs it under no_grad).
        with torch.inference_mode(False), torch.enable_grad():
            xs, ys, xq, yq = (t.clone() for t in batch)
            phi, _ = self.adapt(xs, ys, create_graph=False)
            results = {f"{stage}/loss": task_mse(self.net, phi.detach(), xq, yq).mean()}
            for k in self.eval_steps:
                phi_k = gradient_steps(self.net, self.theta.detach(), xs, ys, k, self.eval_lr, create_graph=False)
                results[f"{stage}/mse_gd{k}"] = task_mse(self.net, phi_k, xq, yq).mean()
        self.log_dict(results, prog_bar=False, batch_size=len(xs))

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam([self.theta], lr=self.meta_lr)
