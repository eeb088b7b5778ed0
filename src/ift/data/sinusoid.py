"""Few-shot sinusoid regression (Finn et al. 2017), generated on the fly: no files.

A task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[amplitude]`` and phase ``~ U[phase]``;
its inputs are ``x ~ U[x_range]``. Each item is one task: ``shots`` support points (to adapt on)
and ``query`` points (to evaluate the adapted model), so a batch is

    (x_support, y_support, x_query, y_query),  shapes (B, shots, 1), (B, shots, 1), (B, query, 1) x2

with ``B`` tasks (``batch_size``). Task ``i`` of a split is drawn from its own generator seeded by
``(seed, split, i)``, so every split is fixed and reproducible and identical on every DDP rank.
Training uses a fixed pool of ``train_tasks`` tasks (reshuffled each epoch); make it large to
approach the original infinite task stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

_SPLITS = {"train": 0, "val": 1, "test": 2}
_MAX_TASKS = 500_000  # task i of a split seeds its parameters with base + i and its inputs with base + i + _MAX_TASKS


def _check_int(key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"data.{key} must be an int >= {low}, got {value!r}")
    return value


def _check_range(key: str, value: Sequence[float], positive: bool = False) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"data.{key} must be [low, high], got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high) and low <= high) or (positive and low < 0):
        raise ValueError(f"data.{key} must be finite [low, high] with low <= high{' and low >= 0' if positive else ''}, got {list(value)}")
    return low, high


class SinusoidTasks(Dataset):
    """``num_tasks`` sinusoid tasks; ``__getitem__(i)`` draws task ``i`` from its own seeded generator."""

    def __init__(
        self,
        num_tasks: int,
        shots: int,
        query: int,
        seed: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ):
        if num_tasks > _MAX_TASKS:
            raise ValueError(f"data: at most {_MAX_TASKS} tasks per split (the per-task seeds must not overlap), got {num_tasks}")
        self.num_tasks, self.shots, self.query, self.seed = num_tasks, shots, query, seed
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> tuple[float, float]:
        """(amplitude, phase) of task ``index``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * float(u[0])
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * float(u[1])
        return amp, phase

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"task {index} out of range [0, {self.num_tasks})")
        amp, phase = self.task(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + _MAX_TASKS)
        low, high = self.x_range
        x = low + (high - low) * torch.rand(self.shots + self.query, 1, generator=g)
        y = amp * torch.sin(x - phase)
        return x[: self.shots], y[: self.shots], x[self.shots :], y[self.shots :]


class SinusoidDataModule(L.LightningDataModule):
    """Train / val / test sets of sinusoid tasks (see the module docstring).

    Args:
        shots: support points per task (K in "K-shot").
        query: query points per task (the meta-loss and the reported MSE use them).
        train_tasks, val_tasks, test_tasks: tasks per split (per epoch for train).
        batch_size: tasks per batch (the meta-batch).
        amplitude, phase, x_range: [low, high] of the uniform task and input distributions.
        seed: seeds every split (independent of the training seed).
    """

    config_name = "sinusoid"

    def __init__(
        self,
        shots: int = 10,
        query: int = 10,
        train_tasks: int = 2000,
        val_tasks: int = 100,
        test_tasks: int = 500,
        batch_size: int = 25,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.shots = _check_int("shots", shots, 1)
        self.query = _check_int("query", query, 1)
        self.num_tasks = {
            "train": _check_int("train_tasks", train_tasks, 1),
            "val": _check_int("val_tasks", val_tasks, 1),
            "test": _check_int("test_tasks", test_tasks, 1),
        }
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.seed = _check_int("seed", seed, 0)
        self.ranges = dict(
            amplitude=_check_range("amplitude", amplitude, positive=True),
            phase=_check_range("phase", phase),
            x_range=_check_range("x_range", x_range),
        )

    def tasks(self, split: str) -> SinusoidTasks:
        """The tasks of ``split`` ("train", "val" or "test")."""
        return SinusoidTasks(self.num_tasks[split], self.shots, self.query, self.seed * 3 + _SPLITS[split], **self.ranges)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.tasks(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
