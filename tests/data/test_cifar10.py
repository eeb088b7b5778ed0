"""CIFAR-10: the clear error for missing files and for a failed download; real files if present."""

import os
import urllib.error
from pathlib import Path

import pytest
import torch

from ift.data import CIFAR10DataModule, DatasetNotFoundError

CIFAR_ROOT = os.environ.get("IFT_CIFAR10_ROOT", "")


def test_missing_files_give_one_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10DataModule(str(tmp_path)).setup()
    message = str(info.value)
    assert f"data.root={tmp_path}" in message and "cifar-10-batches-py" in message
    assert "data=digits" in message and "data.download=true" in message


def test_failed_download_becomes_the_clear_error(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", offline)
    dm = CIFAR10DataModule(str(tmp_path), download=True)
    dm.prepare_data()
    with pytest.raises(DatasetNotFoundError, match="data=digits.*download failed.*no network"):
        dm.setup()


@pytest.mark.skipif(not (Path(CIFAR_ROOT) / "cifar-10-batches-py").is_dir(), reason="set IFT_CIFAR10_ROOT to test real files")
def test_real_cifar10():
    dm = CIFAR10DataModule(CIFAR_ROOT, batch_size=16)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45000, 5000, 10000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10
