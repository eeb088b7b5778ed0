"""The real train.py / eval.py as a user runs them: eval reproduces test metrics, resume, DDP, W&B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_script

FAST = ["debug=fast", "trainer=cpu", "trainer.limit_test_batches=1.0"]


def train(run_dir: Path, *args: str, timeout: int = 300) -> Path:
    result = run_script("train.py", [*FAST, f"hydra.run.dir={run_dir}", *args], timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("train") / "run", "model=vae", "logger=wandb")


def test_eval_reproduces_the_test_metrics_of_training(trained_run, tmp_path):
    result = run_script("eval.py", [f"ckpt_path={trained_run}/checkpoints/last.ckpt",
                                    f"hydra.run.dir={tmp_path}", "eval.iwae_samples=10"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test/elbo_amortized") == 1, result.stdout  # one table, not Lightning's too
    assert "IWAE, 10 samples" in result.stdout  # the IWAE progress bar
    logged = json.loads((trained_run / "test_metrics.json").read_text())["metrics"]
    evaluated = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert set(logged) <= set(evaluated)
    for key, value in logged.items():
        assert evaluated[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_wandb_offline_run_has_summary_with_elbo_and_step_time(trained_run):
    summaries = list(trained_run.glob("wandb/offline-run-*/files/wandb-summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert "train/elbo" in summary and "perf/step_time_s" in summary
    assert summary["perf/step_time_s"] > 0


def test_resume_from_last_checkpoint_continues_the_step_counter(trained_run, tmp_path):
    first = global_step(trained_run / "checkpoints" / "last.ckpt")
    assert first == 3  # debug=fast: 3 batches of one epoch
    resumed = train(tmp_path / "resumed", "model=vae", "logger=csv",
                    f"ckpt_path={trained_run}/checkpoints/last.ckpt", "trainer.max_epochs=2")
    assert global_step(resumed / "checkpoints" / "last.ckpt") == 2 * first
    assert (resumed / "resumed_from.txt").read_text().strip().endswith("last.ckpt")


def test_eval_missing_checkpoint_is_one_clear_error(tmp_path):
    result = run_script("eval.py", [f"ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 1
    assert "does not exist" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_ddp_cpu_two_processes_through_train_py(tmp_path):
    run = tmp_path / "ddp"
    result = run_script("train.py", [*FAST, f"hydra.run.dir={run}", "model=vae", "logger=csv", "trainer=ddp_cpu"],
                        timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    # Epoch metrics are reduced across ranks (sync_dist) without Lightning's warnings about it.
    assert "sync_dist" not in result.stderr + result.stdout, result.stderr[-3000:]
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["epoch_000.ckpt", "last.ckpt"]
    # 3 batches per rank, each rank sees half the data: the step counter counts optimizer steps.
    assert global_step(run / "checkpoints" / "last.ckpt") == 3
    assert json.loads((run / "test_metrics.json").read_text())["metrics"]["test/loss"] > 0
