"""Each configs/data/*.yaml instantiates and its shape / num_classes equal the module's.

The image/classification sets share one parametrised check. The two task sets are not images and
have no ``shape`` / ``num_classes`` of their own kind: sudoku's config is checked in test_sudoku.py,
sinusoid's (few-shot regression tasks for iMAML/MAML) at the end of this file.
"""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ift.data import DatasetNotFoundError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "data"
SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
TASK_SETS = {"sudoku", "sinusoid"}
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in TASK_SETS)


def write_test_files(folder: Path, n: int = 20) -> None:
    """Minimal t10k-* IDX files (uint8, magic 0x0803 / 0x0801)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    header = bytes([0, 0, 8, 3]) + np.array([n, 28, 28], dtype=">u4").tobytes()
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8).tobytes()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images))
    labels = bytes([0, 0, 8, 1]) + np.array([n], dtype=">u4").tobytes() + bytes(range(10)) * (n // 10)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def compose(name: str, data_dir: Path):
    """The data node as train.yaml sees it: `root` interpolates ${paths.data_dir}."""
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "data": OmegaConf.load(CONFIG_DIR / f"{name}.yaml")})
    return cfg.data


def test_all_expected_configs_exist():
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "synthetic"} <= set(NAMES)
    assert TASK_SETS <= {p.stem for p in CONFIG_DIR.glob("*.yaml")}


@pytest.mark.parametrize("name", NAMES)
def test_config_shape_and_classes_match_the_module(name, tmp_path):
    data_cfg = compose(name, tmp_path)
    assert {"_target_", "shape", "num_classes"} <= set(data_cfg)
    if name == "mnist" and (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        data_cfg.root = str(SHARED_MNIST)
    elif name in ("mnist", "fashion_mnist"):
        write_test_files(tmp_path / name)
    datamodule = instantiate(data_cfg)
    assert datamodule.shape == tuple(data_cfg.shape)
    assert datamodule.num_classes == data_cfg.num_classes
    if "root" in data_cfg:
        assert data_cfg.download is False  # nothing downloads unless asked
    if name == "cifar10" and not (Path(data_cfg.root) / "cifar-10-batches-py").is_dir():
        with pytest.raises(DatasetNotFoundError, match="data.root"):
            datamodule.setup()
        return
    datamodule.setup()
    x, y = next(iter(datamodule.val_dataloader()))
    assert tuple(x.shape[1:]) == tuple(data_cfg.shape)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < data_cfg.num_classes


@pytest.mark.parametrize("name", NAMES)
def test_config_with_wrong_shape_is_rejected(name, tmp_path):
    data_cfg = compose(name, tmp_path)
    if name == "synthetic":  # its shape is a free argument; num_classes is fixed
        data_cfg.num_classes = 10
        match = "num_classes"
    else:
        data_cfg.shape = [data_cfg.shape[0] + 1, *data_cfg.shape[1:]]
        match = "data.shape"
    # Hydra wraps the module's ValueError; its message must survive.
    with pytest.raises(InstantiationException, match=f"ValueError.*{match}") as info:
        instantiate(data_cfg)
    assert isinstance(info.value.__cause__, ValueError)


def test_sinusoid_config_builds_task_batches_of_its_declared_sizes(tmp_path):
    data_cfg = compose("sinusoid", tmp_path)
    assert "shape" not in data_cfg and "num_classes" not in data_cfg  # regression tasks, not images
    datamodule = instantiate(data_cfg)
    xs, ys, xq, yq = next(iter(datamodule.val_dataloader()))
    batch = min(data_cfg.batch_size, data_cfg.val_tasks)
    assert xs.shape == ys.shape == (batch, data_cfg.shots, 1)
    assert xq.shape == yq.shape == (batch, data_cfg.query, 1)
    assert xs.dtype == torch.float32 and bool(yq.abs().le(data_cfg.amplitude[1]).all())


def test_sinusoid_config_with_a_bad_value_is_rejected(tmp_path):
    data_cfg = compose("sinusoid", tmp_path)
    data_cfg.shots = 0
    with pytest.raises(InstantiationException, match="ValueError.*data.shots") as info:
        instantiate(data_cfg)
    assert isinstance(info.value.__cause__, ValueError)
