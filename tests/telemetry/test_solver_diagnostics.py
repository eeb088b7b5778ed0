"""The one diagnostics path: a savi_ift step's backward linear solve reaches the logger through the
module's SolveRecorder and the SolverDiagnostics callback, and no module-level state changes."""

import sys

import lightning as L
import torch

from ift.data import DigitsDataModule
from ift.implicit import SolveRecorder
from ift.savi.module import SAVIModule
from ift.telemetry import SolverDiagnostics


def ift_module_globals() -> dict[str, int]:
    """Identity of every global of every loaded ift module: rebinding one (a 'last info') changes it."""
    return {f"{name}.{key}": id(value) for name, mod in list(sys.modules.items())
            if name == "ift" or name.startswith("ift.") for key, value in vars(mod).items()}


def test_savi_ift_step_logs_linear_solve_through_the_callback_and_keeps_no_global_state():
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32)
    module = SAVIModule(input_shape=list(dm.shape), mode="savi_ift", latent_dim=4, hidden=[32])
    seen = []
    record = module.solves.record
    module.solves.record = lambda info, kind="ift": (seen.append(info), record(info, kind))
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[SolverDiagnostics()])
    before = ift_module_globals()
    trainer.fit(module, datamodule=dm)
    assert ift_module_globals() == before  # nothing written at module level by the solves
    (info,) = seen  # one training step, one backward linear solve
    metrics = trainer.callback_metrics
    assert float(metrics["ift/linsolve_iters"]) == float(info.iterations.float().mean()) >= 1
    assert float(metrics["ift/linsolve_residual"]) == float(info.residual.max()) <= info.tol
    assert float(metrics["ift/linsolve_unconverged"]) == 0.0
    assert module.solves.last == {}  # logged once, then cleared


def test_no_module_level_last_solve_info():
    import ift.implicit
    import ift.implicit.diagnostics as diagnostics

    assert not hasattr(ift.implicit, "last_solve_info") and not hasattr(diagnostics, "_last_info")
    assert not any(isinstance(v, SolveRecorder) for v in vars(diagnostics).values())


def test_unknown_record_is_one_clear_error():
    import pytest

    from ift.telemetry.diagnostics import solve_metrics

    with pytest.raises(TypeError, match="LinearSolveInfo or a QPSolution"):
        solve_metrics("inner", object())
