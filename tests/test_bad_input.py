"""Bad configs and bad checkpoints: one clear error naming the problem, nothing executed."""

from __future__ import annotations

import os
import re
import time
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
    (["model.inner.max_iter=-1"], "model.inner.max_iter"),
    (["model.inner.eta=0"], "model.inner.eta"),
    (["model.inner.method=lbfgs"], "model.inner.method"),
    (["model.ift.linear_solver=qr"], "model.ift.linear_solver"),
    (["+model.ift.solver=cg"], "model.ift.solver was renamed model.ift.linear_solver"),
    (["model.gamma.init=0"], "gamma"),
    (["model.mode=savi"], "model.mode"),
    (["model=savi_reversible", "model.inner.method=newton"], "model.mode=savi_reversible supports"),
    (["model=savi_reversible", "model.inner.tol=1e-5"], "model.mode=savi_reversible supports"),
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
    assert "model.inner.eta must be a number > 0 or null, got -1" in result.stderr + result.stdout
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


@pytest.mark.parametrize("override,message", [
    ("+eval.saliency_examples=3", "eval.saliency_examples was renamed eval.saliency.examples "),
    ("+eval.saliency_sens_samples=5", "eval.saliency_sens_samples was renamed eval.saliency.sens_samples "),
    ("eval.saliency=true", "eval.saliency=true was renamed eval.saliency.enabled=true "),
])
def test_a_flat_saliency_eval_key_is_one_line_naming_its_new_key(tmp_path, override, message):
    cfg = compose_config("eval", ["ckpt_path=x.ckpt", override], tmp_path / "eval")
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        run_evaluation(cfg)
    assert "\n" not in str(err.value)


# --- Through train.py / eval.py as a user runs them: exit 1, one line naming the key and the fix,
# no traceback. The seconds from start to the error are printed (pytest -s) for the README.

def assert_one_line_error(result, *needles: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "Error" in line or "ERROR" in line]
    assert len(errors) == 1, errors
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def timed(script: str, args: list[str]):
    start = time.monotonic()
    result = run_script(script, args)
    print(f"{script} {' '.join(args[:2])}: error after {time.monotonic() - start:.1f} s")
    return result


def test_mnist_with_a_missing_root_names_data_root(tmp_path):
    result = timed("train.py", ["data=mnist", f"data.root={tmp_path / 'nowhere'}", "logger=none",
                                f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(result, "data.root=", "data=digits")


def test_mnist_root_without_the_files_names_data_root_and_the_files(tmp_path):
    (tmp_path / "empty").mkdir()
    result = timed("train.py", ["data=mnist", f"data.root={tmp_path / 'empty'}", "model=vae", "logger=none",
                                "trainer=cpu", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(result, "data.root=", "t10k-images-idx3-ubyte")


def test_unwritable_log_dir_names_paths_log_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    result = timed("train.py", [f"paths.log_dir={blocker / 'logs'}", "logger=none"])
    assert_one_line_error(result, "paths.log_dir=", "is a file")


def test_text_file_named_ckpt_is_one_line_for_train_and_eval(tmp_path):
    fake = tmp_path / "notes.ckpt"
    fake.write_text("these are my notes, not a checkpoint\n")
    result = timed("train.py", [f"ckpt_path={fake}", "model=vae", "logger=none", "trainer=cpu",
                                f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(result, "cannot read checkpoint", "ckpt_path=")
    result = timed("eval.py", [f"ckpt_path={fake}", f"hydra.run.dir={tmp_path / 'eval'}"])
    assert_one_line_error(result, "cannot read checkpoint", "ckpt_path=")


def foreign_run(tmp_path: Path) -> Path:
    """A run directory whose config says model=vae but whose checkpoint holds an MLP classifier."""
    from omegaconf import OmegaConf

    from ift.training import instantiate_model

    classifier = instantiate_model(compose_config("train", ["model=mlp_classifier"], tmp_path / "c").model)
    ckpt = checkpoint_in_run(tmp_path, {"state_dict": classifier.state_dict(), "global_step": 0})
    vae_cfg = compose_config("train", ["model=vae"], tmp_path / "v")
    (tmp_path / "run" / "config_resolved.yaml").write_text(OmegaConf.to_yaml(vae_cfg))
    return ckpt


def test_checkpoint_of_another_model_is_one_line_with_the_details(tmp_path):
    ckpt = foreign_run(tmp_path)
    result = timed("train.py", [f"ckpt_path={ckpt}", "model=vae", "logger=none", "trainer=cpu",
                                f"hydra.run.dir={tmp_path / 'resume'}"])
    assert_one_line_error(result, "different model", "missing", "unexpected", "config_resolved.yaml")
    result = timed("eval.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"])
    assert_one_line_error(result, "different model", "missing", "unexpected")


def test_ckpt_path_last_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    from ift.checkpoints import find_last_checkpoint

    good = tmp_path / "train" / "runs" / "a" / "checkpoints" / "last.ckpt"
    bad = tmp_path / "train" / "runs" / "b" / "checkpoints" / "last.ckpt"
    for path in (good, bad):
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": {"w": torch.ones(3)}}, path)
    bad.write_bytes(bad.read_bytes()[:100])
    os.utime(good, (1, 1))  # bad is the newest
    with caplog.at_level("WARNING"):
        assert find_last_checkpoint(tmp_path / "train") == good
    assert f"skipping {bad}" in caplog.text and f"newest valid checkpoint {good}" in caplog.text


def test_a_flat_saliency_eval_key_through_eval_py_is_one_line_before_hydra(tmp_path):
    result = timed("eval.py", ["ckpt_path=last", "eval.saliency_examples=50", f"hydra.run.dir={tmp_path / 'eval'}"])
    assert_one_line_error(result, "eval.saliency_examples was renamed eval.saliency.examples")
    assert not (tmp_path / "eval").exists()
