"""A small reader for the IDX format of the MNIST / Fashion-MNIST files (`*-ubyte[.gz]`).

Format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a dtype code, the number of
dimensions, then each dimension as a big-endian uint32, then the values in big-endian order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> Tensor:
    """Read one IDX file (gzip-compressed if its name ends in `.gz`) into a tensor."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes of data), "
            f"file has {len(raw) - header}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def find_idx_file(root: Path, stem: str, torchvision_folder: str) -> Path | None:
    """The first of `root/stem[.gz]`, `root/<folder>/raw/stem[.gz]` that exists, else None."""
    for folder in (root, root / torchvision_folder / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None
