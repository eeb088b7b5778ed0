"""Every config in configs/ composes, and every model/data pair meant to work trains one fast step."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from ift.training import run_training
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


# (model, data) pairs meant to work, each one fast training step in-process.
SAVI_MODELS = ["vae", "svi", "savi_unrolled", "savi_ift"]
PAIRS = [(m, "digits") for m in SAVI_MODELS + ["classifier", "classifier_pgd", "mlp_classifier", "optnet_classifier"]]
PAIRS += [("vae", "synthetic"), ("savi_ift", "synthetic"), ("optnet_sudoku", "sudoku"), ("conv_sudoku", "sudoku")]
PAIRS += [("vae", "mnist"), ("classifier", "mnist")]


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
    if model in ("svi", "savi_unrolled", "savi_ift"):
        # refinement improves the ELBO over the encoder's proposal, on held-out data
        assert metrics["test/amortization_gap"] > 0, metrics


def test_data_configs_instantiate_with_their_declared_shape(compose_train):
    dm = instantiate(compose_train("data=digits").data)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert tuple(x.shape[1:]) == tuple(dm.shape) == (1, 8, 8)
