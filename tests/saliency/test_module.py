"""ClassifierModule: trains (natural and PGD) through Lightning, logs the metrics, runs the eval hook."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ift.saliency.module import ClassifierModule
from ift.training import instantiate_model



class TinyData(L.LightningDataModule):
    shape = (1, 8, 8)
    num_classes = 3

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(24, 1, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (24,), generator=g)

    def _loader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    train_dataloader = val_dataloader = test_dataloader = _loader


def trainer():
    return L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.parametrize("name", ["classifier", "classifier_pgd"])
def test_configs_train_and_test(compose_train, name):
    cfg = compose_train(f"model={name}", "data=digits", "data.num_classes=3")
    model = instantiate_model(cfg.model)
    assert isinstance(model, ClassifierModule) and model.arch == "small_cnn"
    assert model.hparams.pgd == (name == "classifier_pgd")
    model.hparams.eval_steps = model.eval_steps = 2
    t = trainer()
    t.fit(model, datamodule=TinyData())
    for key in ("train/loss", "val/loss", "val/acc", "val/pgd_acc"):
        assert key in t.callback_metrics, key
    t.test(model, datamodule=TinyData())
    assert {"test/acc", "test/pgd_acc"} <= set(t.callback_metrics)


def test_pgd_accuracy_not_above_natural_on_trained_model():
    torch.manual_seed(0)
    data = TinyData()
    model = ClassifierModule((1, 8, 8), 3, eps=0.3, steps=5, step_size=0.1)
    x, y = data.x, data.y
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(50):  # overfit the tiny set
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    nat = (model(x).argmax(1) == y).float().mean()
    adv = (model(model.adversarial(x, y, 5)).argmax(1) == y).float().mean()
    assert nat > 0.9 and adv < nat


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match=r"^model\.arch must be one of auto, madry_cnn"):
        ClassifierModule((1, 8, 8), 3, arch="vgg")
    with pytest.raises(ValueError, match=r"^model\.optimizer must be one of adam, sgd, got 'lbfgs'$"):
        ClassifierModule((1, 8, 8), 3, optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"^model\.lr must be a number > 0, got 0$"):
        ClassifierModule((1, 8, 8), 3, lr=0)
    with pytest.raises(ValueError, match=r"^model\.steps must be an int >= 0, got -1$"):
        ClassifierModule((1, 8, 8), 3, steps=-1)
    with pytest.raises(ValueError, match=r"^model\.eps must be a number >= 0, got -0\.1$"):
        ClassifierModule((1, 8, 8), 3, eps=-0.1)


def test_evaluate_extra_writes_table_and_returns_metrics(tmp_path):
    torch.manual_seed(0)
    model = ClassifierModule((1, 8, 8), 3)
    assert model.evaluate_extra(TinyData(), {"saliency": {"enabled": False}}, tmp_path) == {}
    saliency = {"enabled": True, "examples": 2, "sens_samples": 2, "infd_samples": 20, "sg_samples": 2, "ig_steps": 3,
                "shap_samples": 30, "nb_samples": 100, "square_sizes": [1, 2], "local": True}
    eval_cfg = {"saliency": saliency, "iwae_samples": 1000}  # other evaluations' keys are ignored
    metrics = model.evaluate_extra(TinyData(), eval_cfg, tmp_path)
    for method in ("Grad", "Grad-SG", "IG", "IG-SG", "GBP", "GBP-SG", "SHAP", "Square", "NB"):
        assert metrics[f"saliency/{method}/sens_max"] >= 0 and metrics[f"saliency/{method}/infd"] >= 0
    assert "saliency/local/Grad/infd" in metrics
    saved = json.loads((tmp_path / "saliency.json").read_text())
    assert saved["tables"]["global"]["Square"]["infd"] == metrics["saliency/Square/infd"]
    assert (tmp_path / "saliency.md").read_text().startswith("**global**")
    assert (tmp_path / "saliency.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"unknown saliency settings \['eval\.saliency\.sens_radiuss'\]"):
        model.evaluate_extra(TinyData(), {"saliency": {"enabled": True, "sens_radiuss": 1}}, tmp_path)


# ----------------------------------------------------------------------------- Appendix A.3 robustifiers
ROBUST_CONFIGS = {"classifier_gradnorm": ("grad_norm", "small_cnn"), "classifier_hessian": ("hessian", "softplus_mlp"),
                  "classifier_l2": ("l2", "small_cnn")}


@pytest.mark.parametrize("name", sorted(ROBUST_CONFIGS))
def test_robust_configs_train_a_few_steps_and_log_natural_and_pgd_accuracy(compose_train, name):
    cfg = compose_train(f"model={name}", "data=digits", "data.num_classes=3", "model.eval_steps=2")
    model = instantiate_model(cfg.model)
    robust, arch = ROBUST_CONFIGS[name]
    assert model.hparams.robust == robust and model.arch == arch and model.hparams.robust_weight > 0
    t = L.Trainer(max_steps=3, limit_val_batches=1, limit_test_batches=1, accelerator="cpu", logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t.fit(model, datamodule=TinyData())
    for key in ("train/loss", "train/ce", "train/penalty", "val/acc", "val/pgd_acc"):
        assert key in t.callback_metrics, key
    assert torch.isfinite(t.callback_metrics["train/penalty"])
    t.test(model, datamodule=TinyData())
    assert {"test/acc", "test/pgd_acc"} <= set(t.callback_metrics)


def tiny_mlp(robust, **kw):
    torch.manual_seed(0)
    return ClassifierModule((1, 2, 3), 3, arch="softplus_mlp", hidden=(5, 4), robust=robust, robust_weight=1.0,
                            **kw).double()


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 1, 2, 3, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 2])


def penalty_at(model, x, y, seed=0):
    torch.manual_seed(seed)  # the same probes for every evaluation
    return model.penalised_forward(x, y)[1]


@pytest.mark.parametrize("robust,kw", [("grad_norm", {}), ("l2", {}), ("hessian", {"hessian_probes": 2}),
                                       ("hessian", {"hessian_estimator": "power", "hessian_iters": 300})])
def test_penalty_gradient_matches_central_differences(robust, kw):
    """d R / d W along a random direction V, autograd vs (R(W + hV) - R(W - hV)) / 2h in float64.
    The power estimator detaches its eigenvector; at convergence that is still the exact gradient of
    the squared spectral norm (first-order eigenvector changes do not move ||H v||^2)."""
    model, (x, y) = tiny_mlp(robust, **kw), tiny_batch()
    w = model.net.net[1].weight
    grad = torch.autograd.grad(penalty_at(model, x, y), w)[0]
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        w += h * v
    up = penalty_at(model, x, y).detach()
    with torch.no_grad():
        w -= 2 * h * v
    down = penalty_at(model, x, y).detach()
    fd = (up - down) / (2 * h)
    assert float((grad * v).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)
    assert float(fd) != 0


def test_penalty_values_against_direct_computations():
    model, (x, y) = tiny_mlp("grad_norm"), tiny_batch()
    direct = []
    for b in range(4):
        xb = x[b:b + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xb), y[b:b + 1]), xb)
        direct.append(g.pow(2).sum())
    assert float(penalty_at(model, x, y).detach()) == pytest.approx(float(torch.stack(direct).mean()), rel=1e-10)

    model = tiny_mlp("l2")
    expected = sum(float((m.weight.detach() ** 2).sum()) for m in model.net.net if isinstance(m, torch.nn.Linear)) / 2
    assert float(penalty_at(model, x, y).detach()) == pytest.approx(expected, rel=1e-12)

    # exact per-example input Hessians of the true-class logit
    hess = [torch.autograd.functional.hessian(lambda z: model(z.view(1, 1, 2, 3))[0, y[b]], x[b].flatten()) for b in range(4)]
    model = tiny_mlp("hessian", hessian_estimator="power", hessian_iters=300)
    spectral = torch.stack([torch.linalg.matrix_norm(hm, 2) ** 2 for hm in hess]).mean()
    assert float(penalty_at(model, x, y).detach()) == pytest.approx(float(spectral), rel=1e-6)
    # Hutchinson with Rademacher probes: E ||H v||^2 = ||H||_F^2; 4000 probes, sd of the mean < 2%
    model = tiny_mlp("hessian", hessian_probes=4000)
    frob = torch.stack([hm.pow(2).sum() for hm in hess]).mean()
    assert float(penalty_at(model, x, y).detach()) == pytest.approx(float(frob), rel=0.06)


@pytest.mark.parametrize("robust", ["grad_norm", "hessian"])
def test_penalty_training_lowers_the_penalised_quantity(robust):
    """30 Adam steps on the tiny batch: the penalised model ends with a smaller R than the plain one."""
    x, y = tiny_batch()
    finals = {}
    for weight in (0.0, 1.0):
        model = tiny_mlp(robust)
        model.hparams.robust_weight = weight
        opt = torch.optim.Adam(model.parameters(), 5e-2)
        for _ in range(30):
            opt.zero_grad()
            logits, pen = model.penalised_forward(x, y)
            (torch.nn.functional.cross_entropy(logits, y) + weight * pen).backward()
            opt.step()
        finals[weight] = float(penalty_at(model, x, y).detach())
    assert finals[1.0] < 0.5 * finals[0.0], finals


def test_bad_robust_settings_are_refused_with_one_line():
    with pytest.raises(ValueError, match="model.robust must be one of"):
        ClassifierModule((1, 8, 8), 3, robust="jacobian", robust_weight=1.0)
    with pytest.raises(ValueError, match="model.robust_weight must be > 0"):
        ClassifierModule((1, 8, 8), 3, robust="grad_norm")
    with pytest.raises(ValueError, match="pick one robustifier"):
        ClassifierModule((1, 8, 8), 3, pgd=True, robust="l2", robust_weight=1.0)
    with pytest.raises(ValueError, match=r"model.robust=hessian \(arch=small_cnn\) needs a twice-differentiable.*ReLU"):
        ClassifierModule((1, 8, 8), 3, robust="hessian", robust_weight=1.0)
    with pytest.raises(ValueError, match="model.hessian_estimator"):
        ClassifierModule((1, 8, 8), 3, arch="softplus_mlp", robust="hessian", robust_weight=1.0, hessian_estimator="lanczos")


def test_eval_saliency_node_reaches_the_hook_through_the_eval_config(tmp_path):
    """train.py's run, then eval.py's config: eval.saliency.* (node keys and a `+` field) decide the table."""
    from ift.evaluation import run_evaluation
    from ift.training import run_training
    from tests.conftest import compose_config

    train_cfg = compose_config("train", ["model=classifier", "model.arch=softplus_mlp", "model.eval_pgd=false",
                                         "data=digits", "debug=fast", "logger=none", "trainer=cpu"], tmp_path / "run")
    run_training(train_cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", "eval.saliency.enabled=true", "eval.saliency.examples=3",
                                  "eval.saliency.sens_samples=2", "eval.saliency.infd_samples=10",
                                  "eval.saliency.sg_samples=2", "+eval.saliency.methods=[Grad,Square]",
                                  "eval.saliency.method_sens={}"], tmp_path / "eval")
    metrics = run_evaluation(cfg)
    assert {k for k in metrics if k.startswith("saliency/")} == {
        f"saliency/{m}/{k}" for m in ("Grad", "Square") for k in ("sens_max", "infd")}
    saved = json.loads((tmp_path / "eval" / "saliency.json").read_text())
    assert saved["n_examples"] == 3 and saved["config"]["sens_samples"] == 2 and saved["config"]["infd_samples"] == 10
