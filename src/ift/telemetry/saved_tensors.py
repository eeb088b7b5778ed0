"""Bytes of tensors autograd saves for backward, counted with `saved_tensors_hooks`.

This is the memory that grows with an unrolled inner loop and stays flat under the IFT, so it
is the number our memory claims are made in. Each storage is counted once, however often it is
saved (a weight used by many layers is saved many times but costs its bytes once).
"""

from __future__ import annotations

import torch


class SavedTensorCounter:
    """Context manager: `with SavedTensorCounter() as c: loss = f(x)` then `c.bytes`.

    Counts unique storages saved for backward by the autograd graph built inside the block.
    `include_parameters=False` skips tensors that are leaf parameters (their memory exists anyway).
    """

    def __init__(self, include_parameters: bool = True) -> None:
        self.include_parameters = include_parameters
        self._seen: set[tuple[torch.device, int]] = set()
        self.bytes = 0
        self.count = 0
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.include_parameters or not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            key = (tensor.device, storage.data_ptr())
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += storage.nbytes()
                self.count += 1
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None

    @property
    def megabytes(self) -> float:
        return self.bytes / 2**20
