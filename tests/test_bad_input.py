"""Bad configs and bad checkpoints: one clear error naming the problem, nothing executed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ift.errors import CheckpointError, ConfigError
from ift.evaluation import run_evaluation
from ift.training import run_training
from tests.conftest import compose_config, run_script

BAD_CONFIGS = [
    (["model.lr=0"], "model.lr"),
    (["data.batch_size=0"], "data.batch_size"),
    (["model.inner.steps=-1"], "model.inner.steps"),
    (["model.inner.eta=0"], "model.inner.eta"),
    (["model.inner.optimizer=lbfgs"], "model.inner.optimizer"),
    (["model.ift.solver=qr"], "model.ift.solver"),
    (["model.gamma.init=0"], "gamma"),
    (["model.mode=savi"], "model.mode"),
    (["model=classifier_pgd", "model.eps=-0.1"], "eps"),
    (["callbacks.nonfinite_guard.policy=ignore"], "policy"),
]


@pytest.mark.parametrize("overrides,key", BAD_CONFIGS)
def test_bad_config_value_is_one_clear_error_naming_the_key(tmp_path, overrides, key):
    cfg = compose_config("train", [*overrides, "logger=none", "trainer=cpu"], tmp_path / "run")
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        run_training(cfg)


def test_bad_config_through_train_py_prints_one_line_without_traceback(tmp_path):
    result = run_script("train.py", ["model.inner.eta=-1", "logger=none", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 1
    assert "model.inner.eta must be > 0" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


class Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_in_run(tmp_path: Path, content) -> Path:
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(content, ckpt)
    (tmp_path / "run" / "config_resolved.yaml").write_text("{}\n")
    return ckpt


def evaluate(tmp_path: Path, ckpt: Path):
    return run_evaluation(compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path / "eval"))


def test_malicious_checkpoint_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = checkpoint_in_run(tmp_path, {"state_dict": {}, "hyper_parameters": Payload(marker)})
    with pytest.raises(CheckpointError, match="refusing to load"):
        evaluate(tmp_path, ckpt)
    result = run_script("eval.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval2'}"])
    assert result.returncode == 1 and "refusing to load" in result.stderr + result.stdout
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    ckpt = checkpoint_in_run(tmp_path, {"state_dict": {"w": torch.randn(1000)}})
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        evaluate(tmp_path, ckpt)


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    ckpt = checkpoint_in_run(tmp_path, {"weights": torch.randn(3)})
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        evaluate(tmp_path, ckpt)


def test_checkpoint_outside_a_run_directory_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "a" / "b.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(CheckpointError, match="config_resolved.yaml"):
        evaluate(tmp_path, ckpt)


def test_ckpt_path_last_without_runs_is_a_clear_error(tmp_path):
    cfg = compose_config("train", ["ckpt_path=last", "logger=none"], tmp_path / "run")
    with pytest.raises(CheckpointError, match="no checkpoints/last.ckpt"):
        run_training(cfg)
