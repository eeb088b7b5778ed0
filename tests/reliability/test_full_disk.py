"""A disk that fills up while a checkpoint is written leaves the previous `last.ckpt` loadable.

The checkpoint folder is a size-limited tmpfs when this process may mount one (root); otherwise the
writer's `open` is replaced by one that fails with ENOSPC once the same byte budget is spent (the
fault a full filesystem raises). Either way the budget holds the first epoch's two checkpoints
(best and last) and half of a third, so the second epoch's first checkpoint write fails mid-file.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ift.checkpoints
from ift.errors import CheckpointError
from ift.training import run_training
from tests.conftest import compose_config

OVERRIDES = ["model=vae", "debug=fast", "logger=csv", "trainer=cpu", "test=false"]


def train(tmp_path: Path, name: str, ckpt_dir: Path, epochs: int) -> None:
    cfg = compose_config("train", [*OVERRIDES, f"trainer.max_epochs={epochs}",
                                   f"callbacks.model_checkpoint.dirpath={ckpt_dir}"], tmp_path / name)
    run_training(cfg)


def mount_tmpfs(folder: Path, size_bytes: int) -> bool:
    if shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True)
    kib = -(-size_bytes // 4096) * 4
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


class FullDiskFile:
    """A binary file whose writes fail with ENOSPC once `budget` (shared by all files) is spent."""

    def __init__(self, path, mode, budget: list[int]):
        self.f = open(path, mode)  # noqa: SIM115
        self.budget = budget

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self.budget[0]:
            self.f.write(bytes(memoryview(data).cast("B")[: self.budget[0]]))
            self.budget[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget[0] -= size
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """(folder, how): a checkpoint folder with room for 2.5 checkpoints of this model."""
    train(tmp_path, "reference", tmp_path / "reference_ckpts", epochs=1)
    size = (tmp_path / "reference_ckpts" / "last.ckpt").stat().st_size
    folder = tmp_path / "small"
    budget = int(2.5 * size)
    if mount_tmpfs(folder, budget):
        yield folder, f"tmpfs of {budget} bytes"
        subprocess.run(["umount", str(folder)], check=False)
        return
    folder.mkdir(exist_ok=True)
    remaining = [budget]
    monkeypatch.setattr(ift.checkpoints, "open", lambda p, m: FullDiskFile(p, m, remaining), raising=False)
    yield folder, f"fault-injected writer with {budget} bytes"


def test_disk_full_mid_save_keeps_the_previous_last_checkpoint(tmp_path, small_disk):
    folder, how = small_disk
    print(how)
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        train(tmp_path, "run", folder, epochs=2)
    assert "callbacks.model_checkpoint.dirpath" in str(err.value), str(err.value)
    names = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" in names and not [n for n in names if not n.endswith(".ckpt")], (how, names)
    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and state["epoch"] == 0, (how, state["global_step"])
    for ckpt in folder.glob("*.ckpt"):  # every file left there is complete
        ift.checkpoints.load_checkpoint(ckpt)


def test_atomic_writer_leaves_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    writer = ift.checkpoints.AtomicCheckpointIO()
    writer.save_checkpoint({"state_dict": {"w": torch.zeros(10)}}, path)
    remaining = [1000]
    monkeypatch.setattr(ift.checkpoints, "open", lambda p, m: FullDiskFile(p, m, remaining), raising=False)
    with pytest.raises(CheckpointError, match="previous last.ckpt is intact"):
        writer.save_checkpoint({"state_dict": {"w": torch.ones(100_000)}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(ift.checkpoints.load_checkpoint(path)["state_dict"]["w"], torch.zeros(10))


def test_temporaries_of_killed_writers_are_removed_at_the_next_save(tmp_path):
    """A SIGKILL mid-write leaves `.last.ckpt.<pid>.tmp`; the next save deletes it once its writer is
    gone and it is older than a minute (a live writer's file, or a fresh one, stays)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".last.ckpt.{dead.pid}.tmp", tmp_path / ".last.ckpt.1.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    live.write_bytes(b"partial")  # pid 1 is always alive
    os.utime(live, (1, 1))
    ift.checkpoints.AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", live.name])
    stale.write_bytes(b"partial")  # the same dead writer, but written just now: left alone
    ift.checkpoints.AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    assert stale.exists()
