"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes): the default, offline dataset.

The data ships inside scikit-learn, so nothing is downloaded. Pixels are integers 0..16 and are
scaled to [0, 1] by dividing by 16. There is no official test split, so the 1797 images are
split into seeded train/val/test parts (`val_fraction`, `test_fraction`).
"""

from __future__ import annotations


import torch
from sklearn.datasets import load_digits

from ift.data.base import ImageTensorDataset, LoadedData, SplitDataModule


class DigitsDataModule(SplitDataModule):
    """8x8 digits; args as `SplitDataModule` (no `root`: the data is bundled)."""

    shape = (1, 8, 8)
    num_classes = 10
    config_name = "digits"


    def load(self) -> LoadedData:
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)  # values 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        return LoadedData(ImageTensorDataset(images, labels, scale=16.0), description="scikit-learn digits")
