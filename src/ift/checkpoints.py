"""Writing checkpoints atomically, finding the newest good one, loading safely (no arbitrary objects)."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ift.errors import CheckpointError

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config_resolved.yaml"
INTERRUPTED = "interrupted.ckpt"  # written at Ctrl-C / SIGTERM by InterruptCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in the destination folder, fsynced, then renamed.

    The rename stays on one filesystem, so it is atomic: a reader (or a resume after a kill or a
    full disk) sees either the previous complete file or the new complete file, never a partial one.
    Lightning's own writer stages through fsspec's temporary file, which can live on another
    filesystem (then the final move is a copy that a full disk or a kill cuts short).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except Exception as err:  # torch.save reports a full disk as a RuntimeError around the OSError
            tmp.unlink(missing_ok=True)
            cause = os_error_in(err)
            why = os.strerror(cause.errno) if cause is not None and cause.errno else first_line(err)
            full = cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise CheckpointError(
                f"could not write checkpoint {path} ({why}); {kept}. {'Free some space' if full else 'Fix the folder'} "
                f"or set callbacks.model_checkpoint.dirpath=<a writable folder with room>") from None


def remove_stale_temporaries(path: Path, min_age_s: float = 60.0) -> None:
    """Delete `.<name>.<pid>.tmp` files left by writers killed mid-save (their process is gone and
    the file has not changed for `min_age_s`), so repeated kills do not fill the disk."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:-4]
        try:
            if not pid.isdigit() or time.time() - tmp.stat().st_mtime < min_age_s or process_alive(int(pid)):
                continue
            tmp.unlink()
        except OSError:  # gone already, or not ours to delete
            continue


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind `err` (itself, or in its __cause__ / __context__ chain)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it must not bring back the old name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_checkpoint(path: Path) -> dict[str, Any]:
    """`torch.load(weights_only=True)`: tensors and plain containers only, so a checkpoint carrying a
    pickled object (code) is refused instead of executed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, "
            f"which could run code ({first_line(err)}). Only load checkpoints written by this project's train.py."
        ) from None
    except Exception as err:  # truncated zip, a text file (KeyError from the unpickler), a folder, ...
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch checkpoint "
            f"({first_line(err)}); pass ckpt_path=<run>/checkpoints/last.ckpt of a finished save"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a Lightning checkpoint of this project (no 'state_dict' entry)")
    return state


def find_last_checkpoint(log_dir: str | Path) -> Path:
    """Newest `last.ckpt` (or `interrupted.ckpt`, written at Ctrl-C / SIGTERM) under `log_dir` that
    loads (the `ckpt_path=last` shortcut); unreadable newer ones are skipped with a warning naming them."""
    found = [*Path(log_dir).glob("**/checkpoints/last.ckpt"), *Path(log_dir).glob(f"**/checkpoints/{INTERRUPTED}")]
    candidates = sorted(found, key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {log_dir}; pass ckpt_path=<run>/checkpoints/last.ckpt")
    skipped = []
    for path in reversed(candidates):
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            skipped.append(f"{path} ({err})")
            continue
        for note in skipped:
            log.warning("ckpt_path=last: skipping %s", note)
        if skipped:
            log.warning("ckpt_path=last: using the newest valid checkpoint %s", path)
        return path
    raise CheckpointError(f"ckpt_path=last: none of the {len(candidates)} last.ckpt files under {log_dir} loads: "
                          f"{skipped[0]}")


def resolve_checkpoint(ckpt_path: str | None, log_dir: str | Path) -> Path | None:
    """The checkpoint `ckpt_path` names (`last`: the newest one that loads)."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        return find_last_checkpoint(log_dir)
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={ckpt_path} does not exist; expected a file like logs/train/runs/<run>/checkpoints/last.ckpt "
            f"(or ckpt_path=last for the newest one)")
    return path


def run_dir_of(ckpt: Path) -> Path:
    """A checkpoint at <run>/checkpoints/x.ckpt belongs to <run>."""
    return ckpt.resolve().parent.parent


def check_matches(model: torch.nn.Module, state: dict[str, Any], ckpt: Path, fix: str) -> None:
    """One line if the checkpoint's weights do not fit `model` (another model or other sizes)."""
    mine = model.state_dict()
    theirs = state["state_dict"]
    missing = sorted(set(mine) - set(theirs))
    unexpected = sorted(set(theirs) - set(mine))
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(mine[k].shape)}" for k in sorted(set(mine) & set(theirs))
              if hasattr(theirs[k], "shape") and tuple(theirs[k].shape) != tuple(mine[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("other shapes (checkpoint vs model)", shapes)):
        if items:
            parts.append(f"{len(items)} {name}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
    raise CheckpointError(f"{ckpt} holds weights of a different model ({'; '.join(parts)}); {fix}")



def resume_command(ckpt: Path) -> str:
    """The command line that continues this run from `ckpt`: the run's own overrides (Hydra's record
    of them), any earlier ckpt_path replaced."""
    import shlex

    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # composed without Hydra's runtime record (tests, notebooks)
        overrides = []
    kept = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    return " ".join(["python", "train.py", *map(shlex.quote, kept), shlex.quote(f"ckpt_path={ckpt}")])


class InterruptCheckpoint(pl.Callback):
    """Ctrl-C or SIGTERM during training: save `<run>/checkpoints/interrupted.ckpt` (weights, optimizer
    and loop state where the run stopped; the epoch-end checkpoints may be an epoch old) and log the
    command that resumes from it. Lightning stops a SIGTERMed run at the end of the current batch."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != TrainerFn.FITTING:
            return
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        path = self.dirpath / INTERRUPTED
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning("%s at epoch %d, step %d: saved %s. Resume with: %s", what, trainer.current_epoch,
                        trainer.global_step, path, resume_command(path))
