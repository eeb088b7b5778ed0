"""One diagnostics path: modules record their solves in a `SolveRecorder`; this callback logs them.

Every record names its own metrics (``to_metrics(kind, stage)``, ``batch_size``), so this callback
knows no solve type. Today's records: backward linear solves (kind ``"ift"``, a `LinearSolveInfo`) ->
``ift/linsolve_iters`` (mean), ``ift/linsolve_residual`` (max relative residual),
``ift/linsolve_unconverged`` (count); QP solves (kind ``"qp"``) -> ``qp/solver_iters`` (mean),
``qp/nonconverged_frac``; forward inner solves (kind ``"inner"``, an `InnerSolveInfo` subclass) ->
``inner/<name>`` for the statistics the application names (SAVI: ``inner/steps_taken``,
``inner/stationarity`` ...; iMAML: ``inner/iterations`` ...). Training logs per step; validation and
test log epoch means under the stage (``val/linsolve_iters``; SAVI ``inner/val_<name>``, iMAML
``val/inner_<name>``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from ift.implicit.diagnostics import SolveRecorder
from ift.implicit.minimize import INNER_STATISTICS  # noqa: F401  (re-exported: the statistics a record can name)


def recorders(module: torch.nn.Module) -> list[SolveRecorder]:
    """Every `SolveRecorder` held as ``solves`` by the module or one of its submodules."""
    return [m.solves for m in module.modules() if isinstance(getattr(m, "solves", None), SolveRecorder)]


def solve_metrics(kind: str, info: Any, stage: str = "train") -> dict[str, torch.Tensor]:
    """The logged statistics of one recorded solve, as the record names them (``info.to_metrics``)."""
    if not callable(getattr(info, "to_metrics", None)):
        raise TypeError(f"SolverDiagnostics: a {type(info).__name__} recorded as {kind!r} has no "
                        "to_metrics(kind, stage); record a LinearSolveInfo, an InnerSolveInfo or a QPSolution "
                        "(or any report with to_metrics and batch_size)")
    return {name: value.detach().float() for name, value in info.to_metrics(kind, stage).items()}


class SolverDiagnostics(pl.Callback):
    """Logs (and clears) what the module's solve recorders hold at every train/val/test batch end:
    the backward's linear solve has run by then, unlike at the end of ``training_step``."""

    def _log(self, pl_module: pl.LightningModule, stage: str) -> None:
        for recorder in recorders(pl_module):
            for kind, info in recorder.pop().items():
                metrics = solve_metrics(kind, info, stage)
                batch_size = int(info.batch_size)
                train = stage == "train"
                pl_module.log_dict(metrics, on_step=train, on_epoch=not train, batch_size=batch_size, sync_dist=not train)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._log(pl_module, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(pl_module, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(pl_module, "test")
