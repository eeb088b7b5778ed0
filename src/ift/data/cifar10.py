"""CIFAR-10 (3x32x32, 10 classes) through torchvision's on-disk format.

`root` is the folder holding `cifar-10-batches-py/` (where torchvision's download puts it).
Official split: validation is carved out of the 50k training images, the 10k test images are
the test split. Missing files give one `DatasetNotFoundError`; a download is tried only with
`download: true`, and its network errors end in that same error.
"""

from __future__ import annotations


import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_only

from ift.data.base import DatasetNotFoundError, FileDataModule, ImageTensorDataset, LoadedData, try_download


class CIFAR10DataModule(FileDataModule):
    """CIFAR-10; see the module docstring. Args as `SplitDataModule` plus `root`, `download`."""

    shape = (3, 32, 32)
    num_classes = 10
    config_name = "cifar10"
    folder = "cifar-10-batches-py"


    def _present(self) -> bool:
        return (self.root / self.folder).is_dir()

    def prepare_data(self) -> None:
        if not self.download or self._present():
            return
        self._download_attempted = True
        self._download_error = try_download(
            lambda: torchvision.datasets.CIFAR10(str(self.root), train=True, download=True), self.config_name
        )

    def _read(self, train: bool) -> ImageTensorDataset:
        dataset = torchvision.datasets.CIFAR10(str(self.root), train=train, download=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return ImageTensorDataset(images, torch.tensor(dataset.targets), scale=255.0)

    def load(self) -> LoadedData:
        if not self._present() and self.download and not self._download_attempted and rank_zero_only.rank == 0:
            self.prepare_data()
        try:
            train, test = self._read(train=True), self._read(train=False)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            raise DatasetNotFoundError(self._missing_message()) from error
        return LoadedData(train, official_test=test, description=f"official train/test files in {self.root}")

    def _missing_message(self) -> str:
        message = (
            f"cifar10 files not found or corrupted under data.root={self.root} "
            f"(expected {self.root / self.folder}/ as torchvision writes it). "
            f"Point data.root at the folder holding {self.folder}/, set data.download=true on a "
            f"machine with network, or use data=digits (bundled with scikit-learn, needs no files)."
        )
        if self._download_error is not None:
            message += f" The download failed: {self._download_error}"
        return message
