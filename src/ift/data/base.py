"""Shared machinery of the data modules: in-memory image tensors, a seeded split, dataloaders.

Every dataset here is small enough to hold in memory, so a subclass only has to return the
images (`load`); this base class checks them against the declared `shape` / `num_classes`,
splits them with a seeded `torch.Generator` (never the global RNG, so every DDP rank gets the
same split) and builds the dataloaders.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not under `data.root` and could not be downloaded."""


@rank_zero_only
def log_once(message: str, level: int = logging.WARNING) -> None:
    """Log from the rank-zero process only (DDP ranks would repeat it otherwise)."""
    log.log(level, message)


class ImageTensorDataset(Dataset):
    """Images kept in their compact stored dtype (uint8 for MNIST/CIFAR) and scaled on access.

    `images[i] / scale` is the float32 image in [0, 1]; keeping uint8 storage makes CIFAR-10
    150 MB instead of 600 MB.
    """

    def __init__(self, images: Tensor, labels: Tensor, scale: float = 1.0):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.scale = float(scale)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index].to(torch.float32) / self.scale, self.labels[index]

    def float_images(self) -> Tensor:
        """All images as one float32 tensor (N, C, H, W), as the dataloader would yield them."""
        return self.images.to(torch.float32) / self.scale


@dataclass
class LoadedData:
    """What a subclass's `load` returns.

    `pool` is split into train/val(/test); when `official_test` is given it is the test split
    and the pool only gives train and val. `description` says where the data came from.
    """

    pool: ImageTensorDataset
    official_test: ImageTensorDataset | None = None
    description: str = ""


def as_shape(shape: Sequence[int], name: str = "shape") -> tuple[int, int, int]:
    """A (C, H, W) tuple of positive ints from any sequence (Hydra gives a ListConfig)."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) != 3:
        raise ValueError(f"{name} must be three positive ints [C, H, W], got {shape!r}")
    values = tuple(int(v) for v in shape)
    if any(v <= 0 for v in values) or any(int(v) != v for v in shape):
        raise ValueError(f"{name} must be three positive ints [C, H, W], got {list(shape)}")
    return values  # type: ignore[return-value]


class SplitDataModule(L.LightningDataModule):
    """Base class: seeded train/val/test split of in-memory images and the dataloaders.

    Subclasses set `shape`, `num_classes` and `config_name` and implement `load`.

    Args:
        batch_size: samples per batch for all three loaders.
        num_workers: dataloader worker processes (0 loads in the main process).
        seed: seed of the split (and of anything random in `load`); independent of the
            training seed so val/test stay the same across training runs.
        val_fraction: share of the pool used for validation.
        test_fraction: share of the pool used for testing, only when the dataset has no
            official test split (digits, synthetic, MNIST from its test files only).
        shape, num_classes: optional declared values (the config's `shape` / `num_classes`,
            which model configs interpolate); a `ValueError` if they disagree with the data.
    """

    shape: tuple[int, int, int]
    num_classes: int
    config_name: str = ""

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"data.batch_size must be a positive int, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an int >= 0, got {num_workers!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"data.seed must be an int, got {seed!r}")
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"data.{key} must be in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must be < 1 to leave training data, "
                f"got {val_fraction} + {test_fraction}"
            )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self._check_declared(shape, num_classes)

        self.train_set: ImageTensorDataset | None = None
        self.val_set: ImageTensorDataset | None = None
        self.test_set: ImageTensorDataset | None = None
        # Indices of each split into the pool (the test split has none if it is official).
        self.split_indices: dict[str, Tensor] = {}
        self.description = ""

    def _check_declared(self, shape: Sequence[int] | None, num_classes: int | None) -> None:
        name = self.config_name or type(self).__name__
        if shape is not None and as_shape(shape, "data.shape") != tuple(self.shape):
            raise ValueError(
                f"data.shape={list(shape)} does not match the {name} images; "
                f"set data.shape={list(self.shape)}"
            )
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"data.num_classes={num_classes!r} does not match {name}; "
                f"set data.num_classes={self.num_classes}"
            )

    def load(self) -> LoadedData:
        """Return all images of the dataset (see `LoadedData`)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # already loaded: the split is fixed, loading once serves every stage
        data = self.load()
        for part in (data.pool, data.official_test):
            if part is not None:
                self._check_loaded(part)
        self.description = data.description

        n = len(data.pool)
        n_val = round(n * self.val_fraction)
        n_test = 0 if data.official_test is not None else round(n * self.test_fraction)
        n_train = n - n_val - n_test
        if min(n_train, n_val) <= 0 or (data.official_test is None and n_test <= 0):
            raise ValueError(
                f"{n} samples with val_fraction={self.val_fraction}, "
                f"test_fraction={self.test_fraction} leave an empty split "
                f"(train={n_train}, val={n_val}, test={n_test}); use more data or other fractions"
            )
        # A private generator: identical on every rank, untouched by the training seed.
        permutation = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        self.split_indices = {
            "train": permutation[:n_train],
            "val": permutation[n_train : n_train + n_val],
        }
        self.train_set = self._subset(data.pool, self.split_indices["train"])
        self.val_set = self._subset(data.pool, self.split_indices["val"])
        if data.official_test is not None:
            self.test_set = data.official_test
        else:
            self.split_indices["test"] = permutation[n_train + n_val :]
            self.test_set = self._subset(data.pool, self.split_indices["test"])
        log_once(
            f"{self.config_name or type(self).__name__}: {self.description}; split sizes "
            f"train={len(self.train_set)} val={len(self.val_set)} test={len(self.test_set)}",
            logging.INFO,
        )

    def _check_loaded(self, part: ImageTensorDataset) -> None:
        name = self.config_name or type(self).__name__
        if tuple(part.images.shape[1:]) != tuple(self.shape):
            raise ValueError(
                f"{name}: loaded images have shape {tuple(part.images.shape[1:])}, "
                f"expected {self.shape}; are the files under data.root the right dataset?"
            )
        if len(part.labels) and not (0 <= int(part.labels.min()) and int(part.labels.max()) < self.num_classes):
            raise ValueError(f"{name}: labels outside [0, {self.num_classes}) in the loaded files")

    @staticmethod
    def _subset(data: ImageTensorDataset, indices: Tensor) -> ImageTensorDataset:
        return ImageTensorDataset(data.images[indices], data.labels[indices], data.scale)

    def _loader(self, dataset: ImageTensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def try_download(download, what: str, timeout_s: float = 30.0) -> Exception | None:
    """Run `download()` with a socket timeout; return the network/disk error instead of raising.

    torchvision opens URLs without a timeout, so an offline machine behind a silent firewall
    would hang; the default socket timeout bounds every connect and read.
    """
    import socket
    import urllib.error

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        download()
    except (OSError, RuntimeError, urllib.error.URLError, socket.timeout) as error:
        log_once(f"Downloading {what} failed: {error}")
        return error
    finally:
        socket.setdefaulttimeout(previous)
    return None


def check_root(root: str | Path | None) -> Path:
    if root is None or str(root).strip() == "":
        raise ValueError("data.root must be the folder holding the dataset files, got nothing")
    return Path(str(root)).expanduser()


class FileDataModule(SplitDataModule):
    """A SplitDataModule read from files under `root`, downloaded there only when `download`."""

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        download: bool = False,
        shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__(batch_size, num_workers, seed, val_fraction, test_fraction, shape, num_classes)
        self.root = check_root(root)
        self.download = bool(download)
        self._download_error: Exception | None = None
        self._download_attempted = False
