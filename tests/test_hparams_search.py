"""configs/hparams_search: the Optuna sweeper runs real trials on digits with a tiny budget, the
study's best value is one of the trials' validation metrics, and ift.compare summarises the sweep."""

from __future__ import annotations

import importlib.util
import math

import pytest
import yaml

from ift.compare import summarize_sweep
from tests.conftest import run_script

pytestmark = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                                reason="hydra-optuna-sweeper not installed (pip install -e '.[optuna]')")
FAST = ["debug=fast", "logger=csv", "trainer.enable_progress_bar=false", "threads=1", "hydra.sweeper.n_trials=2"]


def sweep(tmp_path, search: str, *extra: str):
    result = run_script("train.py", ["-m", f"hparams_search={search}", *FAST, *extra, f"paths.log_dir={tmp_path}"],
                        timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "train" / "multiruns").iterdir()
    return sweep_dir, yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())


def test_savi_search_maximises_the_validation_elbo(tmp_path):
    sweep_dir, results = sweep(tmp_path, "savi_optuna")
    assert set(results["best_params"]) == {"model.inner.eta", "model.inner.tol", "model.lr"}
    rows = summarize_sweep(sweep_dir)
    assert len(rows) == 2 and {"model.inner.eta", "model.inner.tol", "model.lr", "val/elbo"} <= set(rows[0])
    assert rows[0]["val/elbo"] == pytest.approx(results["best_value"])  # the best trial, first
    assert rows[0]["val/elbo"] >= rows[1]["val/elbo"] and math.isfinite(rows[1]["val/elbo"])
    assert 0.1 <= rows[0]["model.inner.eta"] <= 10.0 and 1e-6 <= rows[0]["model.inner.tol"] <= 1e-2
    assert (sweep_dir / "sweep_summary.md").is_file()


def test_saliency_search_keeps_the_accuracy_robustness_pareto_front(tmp_path):
    sweep_dir, results = sweep(tmp_path, "saliency_optuna", "model.arch=softplus_mlp", "model.eval_steps=2")
    assert results["solutions"], results  # multi-objective: the Pareto-optimal trials
    for trial in results["solutions"]:
        assert set(trial["params"]) == {"model.robust_weight"} and len(trial["values"]) == 2
        assert 0.01 <= trial["params"]["model.robust_weight"] <= 30.0
    rows = summarize_sweep(sweep_dir)
    assert len(rows) == 2 and "model.robust_weight" in rows[0] and "val/acc" in rows[0]
