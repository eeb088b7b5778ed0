"""The one diagnostics path: a savi_ift step's backward linear solve and the SAVI / iMAML forward inner
solves reach the logger through the module's SolveRecorder and the SolverDiagnostics callback (under the
names the benchmarks read), the modules log none of it themselves, and no module-level state changes."""

import sys

import lightning as L
import pytest
import torch

from ift.data import DigitsDataModule
from ift.implicit import SolveRecorder
from ift.savi.module import NonStationaryWarning, SAVIModule
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
    module.solves.record = lambda info, kind="ift": (kind == "ift" and seen.append(info), record(info, kind))
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
    from ift.telemetry.diagnostics import solve_metrics

    with pytest.raises(TypeError, match="LinearSolveInfo, an InnerSolveInfo or a QPSolution"):
        solve_metrics("inner", object())


# --- forward inner solves (kind "inner") -----------------------------------------------------------

def fit_one_step(module, datamodule, callbacks):
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def savi_ift_module(**kwargs):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32)
    return SAVIModule(input_shape=list(dm.shape), mode="savi_ift", latent_dim=4, hidden=[32], **kwargs), dm


def test_savi_ift_inner_solve_is_logged_by_the_callback_under_its_names():
    module, dm = savi_ift_module(inner={"max_iter": 2})  # truncated: some examples stay above tolerance
    results = []  # what refine returned, in order: the training step, then the validation step
    refine = module.refine
    module.refine = lambda *a: results.append(refine(*a)) or results[-1]
    with pytest.warns(NonStationaryWarning):
        metrics = fit_one_step(module, dm, [SolverDiagnostics()])
    train, val = results
    ok = ~train.diverged
    assert metrics["inner/steps_taken"] == float(train.iterations.float().mean()) >= 1
    assert metrics["inner/grad_norm_final"] == pytest.approx(float(train.grad_norm[ok].mean()))
    assert metrics["inner/stationarity"] == float(train.stationarity[ok].median())
    assert metrics["inner/stationarity_max"] == float(train.stationarity[ok].max())
    assert metrics["inner/nonstationary_frac"] == float((~train.converged & ok).float().mean())
    assert metrics["inner/diverged"] == float(train.diverged.sum())
    # fallback: examples trained at lambda_0 (policy drop: diverged or above tolerance)
    assert metrics["inner/fallback"] == float((~train.converged).sum()) > 0
    # validation: the same statistics as inner/val_* (no IFT attach, so no fallback)
    assert metrics["inner/val_steps_taken"] == float(val.iterations.float().mean())
    assert metrics["inner/val_stationarity"] == float(val.stationarity[~val.diverged].median())
    assert "inner/val_fallback" not in metrics and "val/inner_steps_taken" not in metrics
    assert module.solves.last == {}


def test_savi_module_no_longer_logs_its_inner_solve_itself():
    module, dm = savi_ift_module()
    metrics = fit_one_step(module, dm, [])
    assert "train/elbo" in metrics and "val/elbo" in metrics
    assert not [k for k in metrics if "inner" in k or k.startswith("ift/")], metrics


def imaml_module_and_data():
    from ift.data.sinusoid import SinusoidDataModule
    from ift.imaml.module import MetaRegression

    torch.manual_seed(0)
    dm = SinusoidDataModule(batch_size=6, train_tasks=12, val_tasks=6, test_tasks=6)
    model = MetaRegression(method="imaml", hidden=(8, 8), inner=dict(max_iter=40, tol=1e-3))
    return model, dm


def test_imaml_inner_solve_is_logged_by_the_callback_and_equals_a_direct_solve():
    from ift.imaml.meta import solve_inner

    model, dm = imaml_module_and_data()
    calls = []  # (theta, support x, support y) of every adaptation: training step, then validation
    adapt = model.adapt
    model.adapt = lambda xs, ys, create_graph: calls.append((model.theta.detach().clone(), xs, ys)) or adapt(
        xs, ys, create_graph)
    metrics = fit_one_step(model, dm, [SolverDiagnostics()])
    (theta, xs, ys), (theta_val, xs_val, ys_val) = calls
    direct = solve_inner(model.net, theta, xs, ys, model.lam, model.inner)  # the core's minimize, again
    assert metrics["inner/iterations"] == float(direct.iterations.float().mean()) >= 1
    assert metrics["inner/max_iterations"] == float(direct.iterations.max())
    assert metrics["inner/stationarity"] == float(direct.stationarity.max())
    assert metrics["inner/nonstationary_frac"] == float((~direct.converged).float().mean())
    assert metrics["inner/nonstationary_frac"] > 0  # max_iter 40 leaves tasks above tol: the statistic is live
    val = solve_inner(model.net, theta_val, xs_val, ys_val, model.lam, model.inner)
    assert metrics["val/inner_iterations"] == float(val.iterations.float().mean())
    assert metrics["val/inner_nonstationary_frac"] == float((~val.converged).float().mean())
    assert "inner/steps_taken" not in metrics and "inner/val_iterations" not in metrics
    assert metrics["ift/linsolve_iters"] >= 1


def test_imaml_module_no_longer_logs_its_inner_solve_itself():
    model, dm = imaml_module_and_data()
    metrics = fit_one_step(model, dm, [])
    assert "train/loss" in metrics and "val/loss" in metrics
    assert not [k for k in metrics if "inner" in k or k.startswith("ift/")], metrics


# --- every report names its own metrics ---------------------------------------------------------------

def test_linear_and_inner_reports_name_their_metrics_as_logged():
    from ift.implicit import InnerSolveInfo, LinearSolveInfo
    from ift.imaml.module import IMAMLInnerInfo
    from ift.savi.module import SAVIInnerInfo
    from ift.telemetry.diagnostics import solve_metrics

    lin = LinearSolveInfo("cg", torch.tensor([2, 4]), torch.tensor([1e-6, 3e-6]), torch.tensor([True, False]), 1e-5, 9)
    assert lin.batch_size == 2
    assert solve_metrics("ift", lin) == {"ift/linsolve_iters": torch.tensor(3.0),
                                         "ift/linsolve_residual": torch.tensor(3e-6),
                                         "ift/linsolve_unconverged": torch.tensor(1.0)}
    assert sorted(solve_metrics("ift", lin, "val")) == ["val/linsolve_iters", "val/linsolve_residual",
                                                         "val/linsolve_unconverged"]
    args = (torch.tensor([1, 3]), torch.tensor([0.1, 0.2]), torch.tensor([1e-6, 1e-2]), torch.tensor([True, False]),
            torch.tensor([False, False]), 1e-5)
    savi = solve_metrics("inner", SAVIInnerInfo(*args, fallback=torch.tensor(1.0)), "val")
    assert savi["inner/val_steps_taken"] == 2.0 and savi["inner/val_nonstationary_frac"] == 0.5
    assert savi["inner/val_fallback"] == 1.0 and "inner/steps_taken" in solve_metrics("inner", SAVIInnerInfo(*args))
    imaml = solve_metrics("inner", IMAMLInnerInfo(*args), "test")
    assert sorted(imaml) == ["test/inner_iterations", "test/inner_max_iterations", "test/inner_nonstationary_frac",
                             "test/inner_stationarity"]
    core = solve_metrics("inner", InnerSolveInfo(*args))  # the core's default: every statistic under its own name
    assert "inner/mean_iterations" in core and "inner/fallback" not in core  # no fallback: not logged
