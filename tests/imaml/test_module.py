"""`train.py model=imaml|maml data=sinusoid` through the real configs, and the module's settings."""

from pathlib import Path

import pytest
import torch

from ift.data.sinusoid import SinusoidDataModule
from ift.errors import ConfigError
from ift.imaml import meta_loss, task_mse
from ift.imaml.module import MetaRegression
from ift.training import run_training

SMALL = ["data.batch_size=5", "data.train_tasks=15", "data.val_tasks=10", "data.test_tasks=10",
         "model.hidden=[16,16]", "model.inner.max_iter=60"]


@pytest.mark.parametrize("model", ["imaml", "maml"])
def test_config_pair_trains_and_tests(compose_train, model):
    cfg = compose_train(f"model={model}", "data=sinusoid", "debug=fast", "logger=csv", "trainer=cpu", *SMALL)
    metrics = run_training(cfg)
    for key in ("train/loss", "val/loss", "test/loss", "test/mse_gd0", "test/mse_gd10"):
        assert key in metrics and metrics[key] == metrics[key], (key, metrics)
    if model == "imaml":
        assert 0 <= metrics["test/inner_nonstationary_frac"] <= 1 and metrics["ift/linsolve_iters"] >= 1
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


def test_bad_model_setting_is_one_config_error(compose_train):
    cfg = compose_train("model=imaml", "data=sinusoid", "model.inner.nonstationary=skip", *SMALL)
    with pytest.raises(ConfigError, match="model.inner.nonstationary"):
        run_training(cfg)


@pytest.mark.parametrize("old,new", [("inner.cg_tol=1e-6", "model.ift.tol"), ("inner.cg_maxiter=50", "model.ift.max_iter")])
def test_old_cg_keys_fail_naming_the_new_key(compose_train, old, new):
    cfg = compose_train("model=imaml", "data=sinusoid", f"+model.{old}", *SMALL)
    with pytest.raises(ConfigError, match=rf": model\.{old.split('=')[0]} was renamed {new} \(the core's name\)"):
        run_training(cfg)


def test_ift_settings_reach_the_backward_solve():
    torch.manual_seed(0)
    model = MetaRegression(hidden=(8, 8), inner=dict(max_iter=40), ift=dict(tol=1e-2, max_iter=3))
    xs, ys, xq, yq = next(iter(SinusoidDataModule(batch_size=4, train_tasks=4).train_dataloader()))
    phi, keep = model.adapt(xs, ys, create_graph=True)
    meta_loss(task_mse(model.net, phi, xq, yq), keep).backward()
    info = model.solves.last["ift"]
    assert (info.solver, info.tol, info.max_iter) == ("cg", 1e-2, 3) and info.max_iterations <= 3


@pytest.mark.parametrize(
    "kwargs,key",
    [(dict(method="reptile"), "model.method"), (dict(lam=0.0), "model.lam"), (dict(inner_steps=0), "model.inner_steps"),
     (dict(inner=dict(tolerance=1e-3)), r"model.inner has unknown keys \['tolerance'\]"),
     (dict(inner=dict(rtol=1e-3)), "model.inner.rtol was renamed model.inner.tol"),
     (dict(ift=dict(maxiter=3)), "model.ift.maxiter was renamed model.ift.max_iter"),
     (dict(activation="gelu"), "model.activation"),
     (dict(ift=dict(linear_solver="qr")), "model.ift.linear_solver"), (dict(ift=dict(tolerance=1.0)), "model.ift has unknown keys"),
     (dict(ift=dict(solver="cg")), "model.ift.solver was renamed model.ift.linear_solver")],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        MetaRegression(**kwargs)


@pytest.mark.parametrize("method", ["maml", "imaml"])
def test_meta_training_lowers_the_adapted_query_loss(method):
    torch.manual_seed(0)
    data = SinusoidDataModule(batch_size=8, train_tasks=200)
    model = MetaRegression(method=method, hidden=(16, 16), inner_lr=0.03, meta_lr=0.02,
                           inner=dict(max_iter=100, tol=1e-3))
    optimizer = model.configure_optimizers()
    held_out = next(iter(torch.utils.data.DataLoader(data.tasks("val"), batch_size=50)))

    def adapted_query_mse() -> float:
        phi, _ = model.adapt(*held_out[:2], create_graph=False)
        return float(((model.net(phi.detach(), held_out[2]) - held_out[3]) ** 2).mean())

    before = adapted_query_mse()
    for _, (xs, ys, xq, yq) in zip(range(25), data.train_dataloader()):
        phi, keep = model.adapt(xs, ys, create_graph=True)
        loss = meta_loss(task_mse(model.net, phi, xq, yq), keep)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert adapted_query_mse() < 0.8 * before
