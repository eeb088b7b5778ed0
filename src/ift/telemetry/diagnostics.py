"""One diagnostics path: modules record their solves in a `SolveRecorder`; this callback logs them.

Backward linear solves (kind ``"ift"``) -> ``ift/linsolve_iters`` (mean), ``ift/linsolve_residual``
(max relative residual), ``ift/linsolve_unconverged`` (count); QP solves (kind ``"qp"``) ->
``qp/solver_iters`` (mean), ``qp/nonconverged_frac``. Training logs per step; validation and test
log epoch means under ``val/``, ``test/`` instead of the kind (``test/solver_iters``).
Forward inner-solve statistics (SAVI, iMAML ``inner/*``) stay logged by their modules, where they
are computed.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from ift.implicit.diagnostics import LinearSolveInfo, SolveRecorder


def recorders(module: torch.nn.Module) -> list[SolveRecorder]:
    """Every `SolveRecorder` held as ``solves`` by the module or one of its submodules."""
    return [m.solves for m in module.modules() if isinstance(getattr(m, "solves", None), SolveRecorder)]


def solve_metrics(kind: str, info: Any) -> dict[str, torch.Tensor]:
    """The logged statistics of one recorded solve, named ``<kind>/<statistic>``."""
    if isinstance(info, LinearSolveInfo):
        stats = {"linsolve_iters": info.iterations.float().mean(), "linsolve_residual": info.residual.max(),
                 "linsolve_unconverged": (~info.converged).float().sum()}
    elif hasattr(info, "status"):  # a QPSolution: per-example interior-point status
        stats = {"solver_iters": info.iterations.float().mean(),
                 "nonconverged_frac": (~info.converged).float().mean()}
    else:
        raise TypeError(f"SolverDiagnostics: don't know how to log a {type(info).__name__} recorded as {kind!r}; "
                        "record a LinearSolveInfo or a QPSolution")
    return {f"{kind}/{name}": value.detach().float() for name, value in stats.items()}


class SolverDiagnostics(pl.Callback):
    """Logs (and clears) what the module's solve recorders hold at every train/val/test batch end:
    the backward's linear solve has run by then, unlike at the end of ``training_step``."""

    def _log(self, pl_module: pl.LightningModule, stage: str) -> None:
        for recorder in recorders(pl_module):
            for kind, info in recorder.pop().items():
                metrics = solve_metrics(kind, info)
                if stage != "train":  # qp/solver_iters -> test/solver_iters (the names results refer to)
                    metrics = {f"{stage}/{k.split('/', 1)[1]}": v for k, v in metrics.items()}
                batch_size = int(info.iterations.numel())
                train = stage == "train"
                pl_module.log_dict(metrics, on_step=train, on_epoch=not train, batch_size=batch_size, sync_dist=not train)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._log(pl_module, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(pl_module, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(pl_module, "test")
