"""MNIST and Fashion-MNIST (1x28x28, 10 classes), read from their IDX files.

Where the files may be, in order: `root/<file>[.gz]` and `root/<MNIST|FashionMNIST>/raw/<file>[.gz]`
(torchvision's layout, where `download: true` puts them).

- All four files present: the official 60k/10k split; validation is carved out of the 60k.
- Only the two test files present (an offline machine with just `t10k-*`): the 10k test images
  are split into seeded train/val/test parts, and a warning says so.
- Nothing found: one `DatasetNotFoundError` naming `data.root` and suggesting `data=digits`.
  A download is attempted only with `download: true`; its network errors end in that same error.
"""

from __future__ import annotations

from pathlib import Path

import torchvision
from lightning.pytorch.utilities import rank_zero_only

from ift.data.base import (
    DatasetNotFoundError,
    FileDataModule,
    ImageTensorDataset,
    LoadedData,
    log_once,
    try_download,
)
from ift.data.idx import find_idx_file, read_idx

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}



class MNISTDataModule(FileDataModule):
    """MNIST digits; see the module docstring for where files are looked for.

    Args:
        root: folder with the IDX files (or torchvision's `MNIST/raw/` below it).
        download: try torchvision's download when files are missing (needs network).
        Others: see `SplitDataModule`. `test_fraction` is used only in the test-files-only case.
    """

    shape = (1, 28, 28)
    num_classes = 10
    config_name = "mnist"
    torchvision_folder = "MNIST"
    torchvision_class = torchvision.datasets.MNIST


    def _files(self) -> dict[str, Path | None]:
        return {key: find_idx_file(self.root, stem, self.torchvision_folder) for key, stem in IDX_FILES.items()}

    def prepare_data(self) -> None:
        if not self.download or all(self._files().values()):
            return
        self._download_attempted = True
        self._download_error = try_download(
            lambda: self.torchvision_class(str(self.root), train=True, download=True),
            self.config_name,
        )

    def load(self) -> LoadedData:
        files = self._files()
        # Lightning calls prepare_data before setup; this covers calling setup() by hand.
        if not all(files.values()) and self.download and not self._download_attempted and rank_zero_only.rank == 0:
            self.prepare_data()
            files = self._files()

        if files["test_images"] is None or files["test_labels"] is None:
            raise DatasetNotFoundError(self._missing_message())
        test = ImageTensorDataset(
            read_idx(files["test_images"]).unsqueeze(1), read_idx(files["test_labels"]), scale=255.0
        )
        if files["train_images"] is not None and files["train_labels"] is not None:
            train = ImageTensorDataset(
                read_idx(files["train_images"]).unsqueeze(1), read_idx(files["train_labels"]), scale=255.0
            )
            return LoadedData(train, official_test=test, description=f"official train/test files in {self.root}")

        log_once(
            f"{self.config_name}: only the test files were found under data.root={self.root}; "
            f"splitting their {len(test)} images into seeded train/val/test parts "
            f"(val_fraction={self.val_fraction}, test_fraction={self.test_fraction}, seed={self.seed}). "
            f"Results are not comparable with the official train/test split."
        )
        return LoadedData(test, description=f"{len(test)} test-file images in {self.root} split three ways")

    def _missing_message(self) -> str:
        stems = ", ".join(f"{IDX_FILES[k]}[.gz]" for k in ("test_images", "test_labels"))
        message = (
            f"{self.config_name} files not found under data.root={self.root}: looked for {stems} "
            f"(and optionally the train-* files) in {self.root} and "
            f"{self.root / self.torchvision_folder / 'raw'}. Point data.root at a folder holding them, "
            f"set data.download=true on a machine with network, or use data=digits "
            f"(bundled with scikit-learn, needs no files)."
        )
        if self._download_error is not None:
            message += f" The download failed: {self._download_error}"
        return message


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST: same file names and layout as MNIST (torchvision folder `FashionMNIST`)."""

    config_name = "fashion_mnist"
    torchvision_folder = "FashionMNIST"
    torchvision_class = torchvision.datasets.FashionMNIST
