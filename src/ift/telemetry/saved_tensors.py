"""Bytes of tensors autograd holds for backward, counted with `saved_tensors_hooks`.

This is the memory that grows with an unrolled inner loop and stays flat under the IFT, so it
is the number our memory claims are made in. Two readings:

- `live_bytes`: tensors saved inside the block that are still held by a graph when you ask
  (read it just before `backward()`): what the backward pass has to keep in memory. Graphs that
  were already freed (e.g. an inner loop's per-step gradient graphs without `create_graph`) do
  not count.
- `total_bytes`: everything packed inside the block, freed or not.

Each storage counts once, however often it is saved (a weight used by many layers is saved many
times but costs its bytes once).
"""

from __future__ import annotations

import weakref

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[tuple, int]:
    """(key, bytes) of the storage behind ``tensor``. Inside ``torch.func`` transforms (``jvp``: the
    latent-space Hessian of unrolled Newton) a saved tensor's storage has no readable data pointer;
    such a tensor counts once per tensor object with its storage's bytes."""
    storage = tensor.untyped_storage()
    try:
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except RuntimeError:
        return (str(tensor.device), "tensor", id(tensor)), storage.nbytes()


class SavedTensorCounter:
    """`with SavedTensorCounter() as c: loss = f(x)`, then `c.live_bytes` before `loss.backward()`."""

    def __init__(self) -> None:
        self._records: list[tuple[weakref.ref, tuple[str, int], int]] = []
        self._total: dict[tuple[str, int], int] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(tensor)
        self._records.append((weakref.ref(tensor), key, nbytes))
        self._total[key] = nbytes
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None

    @property
    def live_bytes(self) -> int:
        live = {key: nbytes for ref, key, nbytes in self._records if ref() is not None}
        return sum(live.values())

    @property
    def total_bytes(self) -> int:
        return sum(self._total.values())
