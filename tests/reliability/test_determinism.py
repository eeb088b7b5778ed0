"""Same seed, same config, same machine: two CPU training runs give identical metrics and weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ift.training import run_training
from tests.conftest import compose_config

FAST = ["debug=fast", "logger=csv", "trainer=cpu", "data.batch_size=16"]  # small batches: SAVI's inner solve is the cost


def train(tmp_path: Path, name: str, *overrides: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    run_dir = tmp_path / name
    metrics = run_training(compose_config("train", [*overrides, *FAST], run_dir))
    # Wall-clock timings (perf/...) are the one thing that is not meant to repeat.
    metrics = {k: v for k, v in metrics.items() if not k.startswith("perf/")}
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return metrics, weights


# savi_ift with 10 inner steps (not 50): the same code paths (inner solve, CG in backward) at a
# fifth of the cost; still ~15 s for the two runs on 2 shared cores, so in the slow suite.
@pytest.mark.parametrize("overrides", [
    pytest.param(["model=vae"], id="vae"),
    pytest.param(["model=savi_ift", "model.inner.max_iter=10"], id="savi_ift", marks=pytest.mark.slow),
])
def test_same_seed_same_metrics_and_weights(tmp_path, overrides):
    metrics_a, weights_a = train(tmp_path, "a", *overrides, "seed=7")
    metrics_b, weights_b = train(tmp_path, "b", *overrides, "seed=7")
    assert {"train/elbo", "val/loss", "test/loss"} <= set(metrics_a)
    assert metrics_a == metrics_b  # exact equality, not approximate
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_another_seed_gives_other_metrics(tmp_path):
    """The check above can fail: the seed does reach the run (initial weights and noise)."""
    metrics_a, weights_a = train(tmp_path, "a", "model=vae", "seed=7")
    metrics_b, weights_b = train(tmp_path, "b", "model=vae", "seed=8")
    assert metrics_a["val/loss"] != metrics_b["val/loss"]
    assert any(not torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
