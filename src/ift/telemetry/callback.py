"""Per-step speed and memory telemetry, logged as `perf/*` metrics."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch

from ift.telemetry.saved_tensors import SavedTensorCounter


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def batch_size_of(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 1


class TelemetryCallback(pl.Callback):
    """Logs, per training step: `perf/step_time_s`, `perf/samples_per_s`, `perf/peak_mem_mb`
    (CUDA max allocated, reset every step, on GPU; process peak RSS on CPU) and, when
    `saved_tensors=True`, `perf/saved_tensor_mb` (bytes held for backward when backward starts).
    """

    def __init__(self, saved_tensors: bool = False) -> None:
        self.saved_tensors = saved_tensors
        self._start = 0.0
        self._counter: SavedTensorCounter | None = None
        self._saved_mb: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if self.saved_tensors:
            self._counter = SavedTensorCounter().__enter__()
        self._start = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._counter is not None:
            self._saved_mb = self._counter.live_bytes / 2**20

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_time = time.perf_counter() - self._start
        if device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak_mb = process_peak_rss_mb()
        metrics = {
            "perf/step_time_s": step_time,
            "perf/samples_per_s": batch_size_of(batch) / max(step_time, 1e-12),
            "perf/peak_mem_mb": peak_mb,
        }
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        if self._saved_mb is not None:
            metrics["perf/saved_tensor_mb"] = self._saved_mb
            self._saved_mb = None
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size_of(batch))

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
