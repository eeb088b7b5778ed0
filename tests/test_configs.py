"""Every config in configs/ composes, and every model/data pair meant to work trains one fast step."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from ift.config import model_data_pairs
from ift.training import instantiate_model, run_training
from tests.conftest import CONFIGS, SHARED_MNIST

GROUPS = ["data", "model", "trainer", "logger", "callbacks", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes(compose_train, group, option):
    cfg = compose_train(f"{group}={option}")
    assert cfg.data._target_ and cfg.model._target_ and cfg.trainer._target_


def test_eval_config_composes(tmp_path):
    from tests.conftest import compose_config

    cfg = compose_config("eval", ["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.eval.iwae_samples == 1000


# (model, data) pairs meant to work: every data config each configs/model/*.yaml declares (`runs_on`),
# each one fast training step in-process.
PAIRS = model_data_pairs()


def test_every_model_config_declares_data_configs_that_exist(compose_train):
    from ift.validation import check_runs_on

    for model in options("model"):
        cfg = compose_train(f"model={model}")
        assert list(cfg.model.get("runs_on") or []), f"configs/model/{model}.yaml declares no runs_on (its data configs)"
        check_runs_on(cfg.model)
    assert {m for m, _ in PAIRS} == set(options("model"))


@pytest.mark.parametrize("declared,message", [
    (["digits", "imagenet"], r"^model\.runs_on names data config 'imagenet', which configs/data/ does not have; "
                             r"use some of: cifar10, digits, "),
    ("digits", r"^model\.runs_on must be a non-empty list of data config names"),
    ([], r"^model\.runs_on must be a non-empty list of data config names"),
])
def test_an_unknown_or_malformed_runs_on_is_one_line_naming_the_key(compose_train, declared, message):
    from omegaconf import open_dict

    from ift.errors import ConfigError
    from ift.validation import validate_config

    cfg = compose_train("model=vae")
    with open_dict(cfg):
        cfg.model.runs_on = declared
    with pytest.raises(ConfigError, match=message) as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)


def test_runs_on_is_not_passed_to_the_module(compose_train):
    from ift.config import module_config

    cfg = compose_train("model=mlp_classifier")
    assert "runs_on" in cfg.model and "runs_on" not in module_config(cfg.model)
    assert "runs_on" not in instantiate_model(cfg.model).hparams


@pytest.mark.parametrize("model,data", PAIRS)
def test_model_data_pair_trains_one_fast_step(compose_train, model, data):
    overrides = [f"model={model}", f"data={data}", "debug=fast", "logger=csv", "trainer=cpu"]
    if data == "mnist":
        if not SHARED_MNIST.exists():
            pytest.skip("no ../shared/data/mnist here")
        overrides.append(f"data.root={SHARED_MNIST}")
    cfg = compose_train(*overrides)
    metrics = run_training(cfg)
    assert "val/loss" in metrics and "test/loss" in metrics
    assert all(v == v for v in metrics.values()), f"NaN metric in {metrics}"
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()
    if model in ("svi", "savi_unrolled", "savi_checkpointed", "savi_reversible", "savi_kim", "savi_ift"):
        # refinement improves the ELBO over the encoder's proposal, on held-out data
        assert metrics["test/amortization_gap"] > 0, metrics


def test_data_configs_instantiate_with_their_declared_shape(compose_train):
    dm = instantiate(compose_train("data=digits").data)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert tuple(x.shape[1:]) == tuple(dm.shape) == (1, 8, 8)


# --- DDP and SLURM: explicit device counts and one run directory per job.

def compose_with_hydra(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_derives_tasks_per_node_from_the_explicit_device_count():
    from ift.validation import validate_config

    import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (a declared dependency: fail, never skip)
    cfg = compose_with_hydra("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    validate_config(cfg)


@pytest.mark.parametrize("devices", [None, "-1", "auto"])
def test_ddp_without_an_explicit_device_count_is_one_clear_error(devices):
    from ift.errors import ConfigError
    from ift.validation import validate_config

    cfg = compose_with_hydra("trainer=ddp", *([f"trainer.devices={devices}"] if devices else []))
    with pytest.raises(ConfigError, match=r"trainer\.devices must be an explicit positive count"):
        validate_config(cfg)


def test_slurm_multirun_without_device_counts_stops_before_submitting(capsys):
    from ift.config import Preflight

    cfg = compose_with_hydra("hydra/launcher=slurm", "trainer=ddp")
    with pytest.raises(SystemExit):
        Preflight().on_multirun_start(config=cfg)
    assert "trainer.devices" in capsys.readouterr().err


def test_ranks_of_one_slurm_step_share_the_run_directory(monkeypatch):
    """Under `srun` every rank composes its own config: the folder must not depend on when."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    dirs = {str(compose_with_hydra("trainer=ddp", "trainer.devices=4").hydra.run.dir) for _ in range(3)}
    assert len(dirs) == 1 and dirs.pop().endswith("/train/runs/slurm-4242.0")
    for key in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key)
    dirs = {str(compose_with_hydra().hydra.run.dir) for _ in range(2)}
    assert len(dirs) == 2, dirs  # outside SLURM: one folder per start (date-time to the microsecond)
