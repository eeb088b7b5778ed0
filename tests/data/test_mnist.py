"""IDX reader and the MNIST / Fashion-MNIST modules: official split, test-files-only, errors."""

import gzip
import logging
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from ift.data import DatasetNotFoundError, FashionMNISTDataModule, MNISTDataModule
from ift.data.idx import read_idx

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
# Known class counts of the 10k MNIST test set.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    """Write an IDX file by the format spec (independent of the reader under test)."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}[code]
    payload = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def fake_mnist(folder: Path, n_train: int, n_test: int, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if n == 0:
            continue
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("code", [0x08, 0x0B, 0x0C, 0x0D])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, code, gz):
    array = (np.arange(2 * 3 * 4).reshape(2, 3, 4) - 5).astype(np.float32 if code == 0x0D else np.int32)
    if code == 0x08:
        array = np.abs(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array, code)
    result = read_idx(path)
    assert tuple(result.shape) == (2, 3, 4)
    np.testing.assert_array_equal(result.numpy(), array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    write_idx(tmp_path / "full", np.zeros((4, 5), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "full").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_official_split_from_all_four_files(tmp_path):
    arrays = fake_mnist(tmp_path / "MNIST" / "raw", n_train=50, n_test=20)  # torchvision's layout
    dm = MNISTDataModule(str(tmp_path), val_fraction=0.2, test_fraction=0.3)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 20)
    assert "test" not in dm.split_indices  # the official test split, untouched
    test_images, test_labels = arrays["t10k"]
    np.testing.assert_allclose(dm.test_set.float_images()[:, 0].numpy(), test_images / 255.0, atol=1e-7)
    np.testing.assert_array_equal(dm.test_set.labels.numpy(), test_labels)
    train_images, train_labels = arrays["train"]
    idx = dm.split_indices["val"].numpy()
    np.testing.assert_allclose(dm.val_set.float_images()[:, 0].numpy(), train_images[idx] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(dm.val_set.labels.numpy(), train_labels[idx])


@pytest.mark.parametrize("gz", [True, False])
def test_test_files_only_are_split_three_ways_and_logged(tmp_path, caplog, gz):
    arrays = fake_mnist(tmp_path, n_train=0, n_test=40, gz=gz)
    dm = FashionMNISTDataModule(str(tmp_path), val_fraction=0.25, test_fraction=0.25, seed=7)
    with caplog.at_level(logging.WARNING, logger="ift.data"):
        dm.setup()
    assert "only the test files" in caplog.text and str(tmp_path) in caplog.text
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 10, 10)
    images, labels = arrays["t10k"]
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        idx = dm.split_indices[split].numpy()
        np.testing.assert_allclose(dataset.float_images()[:, 0].numpy(), images[idx] / 255.0, atol=1e-7)
        np.testing.assert_array_equal(dataset.labels.numpy(), labels[idx])


@pytest.mark.parametrize("cls, folder", [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")])
def test_missing_files_give_one_clear_error(tmp_path, cls, folder):
    dm = cls(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert "data.root=" in message and str(tmp_path / "nowhere") in message
    assert "data=digits" in message and f"{folder}/raw" in message
    assert isinstance(info.value, FileNotFoundError)


def test_failed_download_becomes_the_clear_error(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", offline)
    dm = MNISTDataModule(str(tmp_path), download=True)
    dm.prepare_data()
    with pytest.raises(DatasetNotFoundError, match="data=digits.*download failed.*no network"):
        dm.setup()


def test_failed_download_falls_back_to_test_files(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", offline)
    fake_mnist(tmp_path, n_train=0, n_test=30)
    dm = MNISTDataModule(str(tmp_path), download=True, val_fraction=0.2, test_fraction=0.2)
    dm.setup()  # no prepare_data: setup tries the download itself, once
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 6, 6)


def test_no_download_attempt_without_download_flag(tmp_path, monkeypatch):
    def must_not_run(self, *args, **kwargs):
        raise AssertionError("downloaded although download=False")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", must_not_run)
    dm = MNISTDataModule(str(tmp_path))
    dm.prepare_data()
    with pytest.raises(DatasetNotFoundError):
        dm.setup()


def test_empty_root_is_a_value_error():
    with pytest.raises(ValueError, match="data.root"):
        MNISTDataModule("")


SHARED_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
# Published class counts of the 60k MNIST training set (also in ../shared/data/mnist/README.md).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
needs_shared_test = pytest.mark.skipif(not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                                       reason="needs the real MNIST test files in ../shared/data/mnist")
needs_shared_all = pytest.mark.skipif(not all((SHARED_MNIST / f"{f}.gz").is_file() for f in SHARED_FILES),
                                      reason="needs all four real MNIST files in ../shared/data/mnist")


@needs_shared_test
def test_reader_agrees_with_torchvision_on_the_real_test_files(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((SHARED_MNIST / f"{name}.gz").read_bytes()))
    assert torch.equal(read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz"), read_image_file(str(tmp_path / "t10k-images-idx3-ubyte")))
    assert torch.equal(read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz").long(), read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")))


@needs_shared_all
def test_real_mnist_uses_the_standard_60k_10k_split(caplog):
    with caplog.at_level(logging.INFO, logger="ift.data"):
        dm = MNISTDataModule(str(SHARED_MNIST), batch_size=64, seed=0, val_fraction=0.1)
        dm.setup()
    assert "official train/test files" in caplog.text and "only the test files" not in caplog.text
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54000, 6000, 10000)
    assert torch.bincount(dm.test_set.labels).tolist() == MNIST_TEST_COUNTS  # the official test set, whole
    train_val = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert torch.bincount(train_val).tolist() == MNIST_TRAIN_COUNTS  # validation carved from the 60k
    assert set(dm.split_indices) == {"train", "val"}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(dm.test_set.float_images().min()) == 0.0 and float(dm.test_set.float_images().max()) == 1.0


@needs_shared_test
def test_real_test_files_alone_fall_back_to_a_logged_three_way_split(tmp_path, caplog):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{name}.gz").write_bytes((SHARED_MNIST / f"{name}.gz").read_bytes())
    with caplog.at_level(logging.WARNING, logger="ift.data"):
        dm = MNISTDataModule(str(tmp_path), batch_size=64, seed=0)
        dm.setup()
    assert "only the test files" in caplog.text
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8000, 1000, 1000)
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels, dm.test_set.labels])
    assert torch.bincount(labels).tolist() == MNIST_TEST_COUNTS
    again = MNISTDataModule(str(tmp_path), seed=0)
    again.setup()
    assert torch.equal(again.split_indices["test"], dm.split_indices["test"])


def test_download_runs_under_a_socket_timeout(tmp_path, monkeypatch):
    import socket

    seen = []

    def record(self, *args, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise OSError("offline")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", record)
    before = socket.getdefaulttimeout()
    MNISTDataModule(str(tmp_path), download=True).prepare_data()
    assert seen and seen[0] is not None and seen[0] > 0  # never an unbounded wait
    assert socket.getdefaulttimeout() == before  # restored afterwards
