"""ClassifierModule: trains (natural and PGD) through Lightning, logs the metrics, runs the eval hook."""

import json
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from ift.saliency.module import ClassifierModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


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
def test_configs_train_and_test(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg = OmegaConf.merge({"data": {"shape": [1, 8, 8], "num_classes": 3}}, {"model": cfg})
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
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
    with pytest.raises(ValueError, match="arch"):
        ClassifierModule((1, 8, 8), 3, arch="vgg")
    with pytest.raises(ValueError, match="optimizer"):
        ClassifierModule((1, 8, 8), 3, optimizer="lbfgs")
    with pytest.raises(ValueError, match="eps"):
        ClassifierModule((1, 8, 8), 3, eps=-0.1)


def test_evaluate_extra_writes_table_and_returns_metrics(tmp_path):
    torch.manual_seed(0)
    model = ClassifierModule((1, 8, 8), 3)
    assert model.evaluate_extra(TinyData(), {"saliency": False}, tmp_path) == {}
    eval_cfg = {"saliency": True, "saliency_examples": 2, "saliency_sens_samples": 2, "saliency_infd_samples": 20,
                "saliency_sg_samples": 2, "saliency_ig_steps": 3, "saliency_shap_samples": 30,
                "saliency_nb_samples": 100, "saliency_square_sizes": [1, 2], "saliency_local": True,
                "iwae_samples": 1000}  # other evaluations' keys are ignored
    metrics = model.evaluate_extra(TinyData(), eval_cfg, tmp_path)
    for method in ("Grad", "Grad-SG", "IG", "IG-SG", "GBP", "GBP-SG", "SHAP", "Square", "NB"):
        assert metrics[f"saliency/{method}/sens_max"] >= 0 and metrics[f"saliency/{method}/infd"] >= 0
    assert "saliency/local/Grad/infd" in metrics
    saved = json.loads((tmp_path / "saliency.json").read_text())
    assert saved["tables"]["global"]["Square"]["infd"] == metrics["saliency/Square/infd"]
    assert (tmp_path / "saliency.md").read_text().startswith("**global**")
    assert (tmp_path / "saliency.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown saliency settings"):
        model.evaluate_extra(TinyData(), {"saliency": True, "saliency_sens_radiuss": 1}, tmp_path)
