"""One diagnostics path: modules record their solves in a `SolveRecorder`; this callback logs them.

Backward linear solves (kind ``"ift"``) -> ``ift/linsolve_iters`` (mean), ``ift/linsolve_residual``
(max relative residual), ``ift/linsolve_unconverged`` (count); QP solves (kind ``"qp"``) ->
``qp/solver_iters`` (mean), ``qp/nonconverged_frac``. Training logs per step; validation and test
log epoch means under ``val/``, ``test/`` instead of the kind (``test/solver_iters``).
Forward inner solves (kind ``"inner"``, an `InnerSolveInfo`) -> ``inner/<name>`` for the statistics
the record names (SAVI: ``inner/steps_taken``, ``inner/stationarity`` ...; iMAML: ``inner/iterations``
...); under val/test the record's ``stage_key`` (SAVI ``inner/val_<name>``, iMAML ``val/inner_<name>``).
"""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch

from ift.implicit.diagnostics import InnerSolveInfo, LinearSolveInfo, SolveRecorder


def recorders(module: torch.nn.Module) -> list[SolveRecorder]:
    """Every `SolveRecorder` held as ``solves`` by the module or one of its submodules."""
    return [m.solves for m in module.modules() if isinstance(getattr(m, "solves", None), SolveRecorder)]


def _not_diverged(values: torch.Tensor, info: InnerSolveInfo, reduce: Callable) -> torch.Tensor:
    """``reduce`` over the problems that did not diverge (their numbers describe x0); 0 when none is left."""
    ok = ~info.diverged
    return reduce(values[ok]) if ok.any() else values.new_zeros(())


# The statistics an `InnerSolveInfo` can log; its `names` picks some and names them.
INNER_STATISTICS: dict[str, Callable[[InnerSolveInfo], torch.Tensor | None]] = {
    "mean_iterations": lambda i: i.iterations.float().mean(),
    "max_iterations": lambda i: i.iterations.max().float(),
    "mean_grad_norm": lambda i: _not_diverged(i.grad_norm, i, torch.mean),
    # relative stationarity ||grad f|| / (1 + |f|) at the returned point
    "median_stationarity": lambda i: _not_diverged(i.stationarity, i, torch.median),
    "max_stationarity": lambda i: _not_diverged(i.stationarity, i, torch.max),
    "nonstationary_frac": lambda i: (~i.converged & ~i.diverged).float().mean(),  # stopped above rtol
    "unconverged_frac": lambda i: (~i.converged).float().mean(),  # above rtol or diverged
    "diverged": lambda i: i.diverged.float().sum(),
    "fallback": lambda i: i.fallback,  # None (not logged) where the application has no fallback
}


def _inner_metrics(info: InnerSolveInfo) -> dict[str, torch.Tensor]:
    values = {name: INNER_STATISTICS[stat](info) for name, stat in info.names.items()}
    return {name: value for name, value in values.items() if value is not None}


def solve_metrics(kind: str, info: Any, stage: str = "train") -> dict[str, torch.Tensor]:
    """The logged statistics of one recorded solve: ``<kind>/<statistic>`` in training; under val/test
    ``<stage>/<statistic>``, or the record's ``stage_key`` for inner solves."""
    if hasattr(info, "to_metrics"):  # a report that names its own metrics (QPSolution)
        return {name: value.detach().float() for name, value in info.to_metrics(kind, stage).items()}
    if isinstance(info, LinearSolveInfo):
        stats = {"linsolve_iters": info.iterations.float().mean(), "linsolve_residual": info.residual.max(),
                 "linsolve_unconverged": (~info.converged).float().sum()}
    elif isinstance(info, InnerSolveInfo):
        stats = _inner_metrics(info)
    else:
        raise TypeError(f"SolverDiagnostics: don't know how to log a {type(info).__name__} recorded as {kind!r}; "
                        "record a LinearSolveInfo, an InnerSolveInfo or a QPSolution")
    if stage == "train":
        key = lambda name: f"{kind}/{name}"  # noqa: E731
    elif isinstance(info, InnerSolveInfo):
        key = lambda name: info.stage_key.format(stage=stage, name=name)  # noqa: E731
    else:
        key = lambda name: f"{stage}/{name}"  # noqa: E731
    return {key(name): value.detach().float() for name, value in stats.items()}


class SolverDiagnostics(pl.Callback):
    """Logs (and clears) what the module's solve recorders hold at every train/val/test batch end:
    the backward's linear solve has run by then, unlike at the end of ``training_step``."""

    def _log(self, pl_module: pl.LightningModule, stage: str) -> None:
        for recorder in recorders(pl_module):
            for kind, info in recorder.pop().items():
                metrics = solve_metrics(kind, info, stage)
                batch_size = int(info.iterations.numel())
                train = stage == "train"
                pl_module.log_dict(metrics, on_step=train, on_epoch=not train, batch_size=batch_size, sync_dist=not train)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._log(pl_module, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(pl_module, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._log(pl_module, "test")
