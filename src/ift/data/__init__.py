"""LightningDataModules. Batches are (x, y): x float32 (B, C, H, W) in [0, 1], y int64.

Each module has `shape` (C, H, W) and `num_classes`; see CONTRIBUTING.md.
"""

from ift.data.base import DatasetNotFoundError, ImageTensorDataset, SplitDataModule
from ift.data.cifar10 import CIFAR10DataModule
from ift.data.digits import DigitsDataModule
from ift.data.mnist import FashionMNISTDataModule, MNISTDataModule
from ift.data.sudoku import SudokuDataModule
from ift.data.synthetic import DaiGenerator, SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "DaiGenerator",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageTensorDataset",
    "MNISTDataModule",
    "SplitDataModule",
    "SudokuDataModule",
    "SyntheticDataModule",
]
