"""Finding and loading checkpoints safely (never unpickling arbitrary objects)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ift.errors import CheckpointError

RESOLVED_CONFIG = "config_resolved.yaml"


def find_last_checkpoint(log_dir: str | Path) -> Path:
    """Newest `last.ckpt` under `log_dir` (the `ckpt_path=last` shortcut)."""
    candidates = sorted(Path(log_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {log_dir}; pass ckpt_path=<run>/checkpoints/last.ckpt")
    return candidates[-1]


def resolve_checkpoint(ckpt_path: str | None, log_dir: str | Path) -> Path | None:
    if ckpt_path is None:
        return None
    path = find_last_checkpoint(log_dir) if str(ckpt_path) == "last" else Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={ckpt_path} does not exist; expected a file like logs/train/runs/<run>/checkpoints/last.ckpt "
            f"(or ckpt_path=last for the newest one)")
    return path


def run_dir_of(ckpt: Path) -> Path:
    """A checkpoint at <run>/checkpoints/x.ckpt belongs to <run>."""
    return ckpt.resolve().parent.parent


def load_checkpoint(path: Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)`: tensors and plain containers only, so a checkpoint carrying a
    pickled object (code) is refused instead of executed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, "
            f"which could run code ({first}). Only load checkpoints written by this project's train.py."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch checkpoint "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this project (no 'state_dict' entry)")
    return state
