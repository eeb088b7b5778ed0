"""The Lightning options users override most are in configs/trainer/default.yaml with Lightning's
defaults (so `trainer.limit_train_batches=30` needs no `+`), `limit_batches` limits every split,
the debug variants compose and run, bad values and model/data mismatches are one line, `threads`."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from ift.errors import ConfigError
from ift.training import apply_threads, auto_threads, run_training
from ift.validation import validate_config
from tests.conftest import run_script

# Ours on purpose (the config's comments say why), or Lightning's None spelled out (precision 32-true,
# the model summary and progress bar on); every other key is Lightning's default.
OURS = {"_target_", "default_root_dir", "min_epochs", "max_epochs", "devices", "log_every_n_steps",
        "deterministic", "precision", "inference_mode", "enable_model_summary", "enable_progress_bar",
        "limit_train_batches", "limit_val_batches", "limit_test_batches"}


def build_trainer(cfg) -> pl.Trainer:
    return instantiate(cfg.trainer, logger=False, enable_checkpointing=False)


def test_trainer_defaults_are_lightnings(compose_train):
    cfg = compose_train()
    defaults = inspect.signature(pl.Trainer.__init__).parameters
    for key, value in cfg.trainer.items():
        assert key in defaults or key == "_target_", f"trainer.{key} is not a Trainer argument"
        if key not in OURS:
            assert value == defaults[key].default, f"trainer.{key}: {value!r} vs Lightning's {defaults[key].default!r}"
    # limit_batches=null -> Lightning's default (all batches) for the three splits
    assert {cfg.trainer[f"limit_{s}_batches"] for s in ("train", "val", "test")} == {defaults["limit_train_batches"].default}


def test_common_options_override_without_plus(compose_train):
    cfg = compose_train("trainer.limit_train_batches=30", "trainer.val_check_interval=0.5",
                        "trainer.accumulate_grad_batches=2", "trainer.max_steps=7", "trainer.gradient_clip_val=1.0",
                        "trainer.num_sanity_val_steps=0", "trainer.max_time=00:00:10:00")
    validate_config(cfg)
    trainer = build_trainer(cfg)
    assert trainer.limit_train_batches == 30 and trainer.val_check_interval == 0.5
    assert trainer.accumulate_grad_batches == 2 and trainer.max_steps == 7
    assert trainer.gradient_clip_val == 1.0 and trainer.num_sanity_val_steps == 0


def test_limit_batches_limits_every_split_and_each_split_can_differ(compose_train):
    trainer = build_trainer(compose_train("limit_batches=4"))
    assert trainer.limit_train_batches == trainer.limit_val_batches == trainer.limit_test_batches == 4
    trainer = build_trainer(compose_train("limit_batches=4", "trainer.limit_val_batches=1"))
    assert (trainer.limit_train_batches, trainer.limit_val_batches, trainer.limit_test_batches) == (4, 1, 4)


def test_limit_batches_run_reads_only_that_many_batches(compose_train):
    cfg = compose_train("model=vae", "logger=csv", "trainer=cpu", "limit_batches=2", "trainer.max_epochs=1",
                        "trainer.enable_progress_bar=false", "threads=1")
    run_training(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    loops = ckpt["loops"]
    assert loops["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"] == 2


@pytest.mark.parametrize("option, expected", [("limit", {"limit_train_batches": 5, "limit_val_batches": 5, "max_epochs": 3}),
                                              ("overfit", {"overfit_batches": 3, "max_epochs": 20}),
                                              ("fast", {"limit_train_batches": 3, "max_epochs": 1})])
def test_debug_variants_compose(compose_train, option, expected):
    trainer = compose_train(f"debug={option}").trainer
    assert {k: trainer[k] for k in expected} == expected


def test_debug_overfit_trains_on_the_same_batches(compose_train):
    cfg = compose_train("debug=overfit", "model=vae", "logger=csv", "trainer=cpu", "trainer.max_epochs=2",
                        "trainer.enable_progress_bar=false", "test=false", "threads=1")
    run_training(cfg)
    assert torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_debug_profiler_writes_its_report(compose_train):
    cfg = compose_train("debug=profiler", "model=vae", "logger=csv", "trainer=cpu", "limit_batches=2",
                        "trainer.enable_progress_bar=false", "test=false", "threads=1")
    run_training(cfg)
    report = Path(cfg.paths.output_dir) / "fit-profile.txt"
    assert report.is_file() and "run_training_batch" in report.read_text()


@pytest.mark.parametrize("override, key", [
    ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer"),
    ("trainer.max_steps=null", "trainer.max_steps must be an integer"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an integer >= 1"),
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches must be a batch count"),
    ("limit_batches=-3", "trainer.limit_train_batches must be a batch count"),
    ("trainer.val_check_interval=often", "trainer.val_check_interval must be a batch count"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be a number >= 0"),
    ("threads=0", "threads must be `auto` or an integer >= 1"),
    ("model=imaml", "model=imaml (ift.imaml.module.MetaRegression) meta-learns from few-shot regression tasks: "
                    "it needs data=sinusoid, got data=digits"),
    ("data=sinusoid", "data=sinusoid yields few-shot regression tasks, not images: use model=imaml or model=maml"),
])
def test_bad_trainer_value_or_mismatched_data_is_one_error_naming_it(compose_train, override, key):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_train(override))
    assert key in str(err.value)


@pytest.mark.parametrize("override, message", [("trainer.max_epochs=abc", "trainer.max_epochs must be an integer"),
                                               ("model=maml", "it needs data=sinusoid, got data=digits")])
def test_train_py_answers_with_one_line(tmp_path, override, message):
    result = run_script("train.py", [override, "logger=none", f"paths.log_dir={tmp_path}"], timeout=120)
    assert result.returncode == 1
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert auto_threads() == 4 and auto_threads(processes=2) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 1.0, 1.0))  # three cores busy
    assert auto_threads() == 1 and auto_threads(processes=2) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert auto_threads() == 1


def test_threads_setting_is_applied():
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
        assert 1 <= apply_threads("auto") <= max(1, len(os.sched_getaffinity(0)))
    finally:
        torch.set_num_threads(before)
