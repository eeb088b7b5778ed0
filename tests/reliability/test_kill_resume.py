"""A real `train.py` killed with SIGKILL at random points (some right as a checkpoint is written)
always leaves a newest `last.ckpt` that loads with `torch.load(weights_only=True)`, and resuming
from it continues the step counter and the optimizer state.

Each round starts `train.py` (the first from scratch, the others resuming from the newest
last.ckpt, alternately by explicit path and by the `ckpt_path=last` shortcut) in a fresh run
directory and kills it:
  early      a random moment before its first checkpoint (nothing new may appear)
  on_write   the instant last.ckpt is being written (a temporary file appears next to it, or
             last.ckpt itself is created, grown or replaced): a non-atomic writer is caught with a
             partial last.ckpt
  random     a random moment within the next couple of epochs after its first checkpoint
Digits trains 12 steps per epoch and checkpoints once per epoch.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ift.checkpoints import find_last_checkpoint
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 12  # digits: 1437 training images, batch 128
ROUNDS = ["on_write", "early", "random", "on_write", "random", "on_write"]
ARGS = ["model=vae", "logger=csv", "trainer=cpu", "trainer.max_epochs=50", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "test=false"]
STARTUP_TIMEOUT_S = 240


def start_train(log_dir: Path, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.out"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = [*ARGS, f"paths.log_dir={log_dir}", f"hydra.run.dir={run_dir}", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def snapshot(ckpt_dir: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of every file in the checkpoint folder: any write changes it."""
    found = {}
    try:
        for entry in os.scandir(ckpt_dir):
            try:
                st = entry.stat()
            except FileNotFoundError:  # a temporary file renamed away between listing and stat
                continue
            found[entry.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        pass
    return found


def last_ckpt_write(before: dict, now: dict) -> bool:
    """A write of last.ckpt shows up as a new temporary (non-.ckpt) file next to it, or as last.ckpt
    itself created, grown or replaced."""
    new_temp = any(not n.endswith(".ckpt") for n in set(now) - set(before))
    return new_temp or now.get("last.ckpt") != before.get("last.ckpt")


def wait_for(proc: subprocess.Popen, ckpt_dir: Path, log: Path, before: dict, event) -> dict:
    """Poll the checkpoint folder until `event(before, now)`; returns the new snapshot."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        now = snapshot(ckpt_dir)
        if event(before, now):
            return now
        if proc.poll() is not None:
            pytest.fail(f"train.py exited with {proc.returncode} before the checkpoint write we waited for:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.0005)
    proc.kill()
    pytest.fail(f"no checkpoint write within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no handler, no cleanup, no flush
    proc.wait(timeout=60)
    assert proc.returncode == -9, f"train.py ended by itself ({proc.returncode}) before the kill"


def load(ckpt: Path) -> dict:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer_states", "global_step", "epoch", "loops"} <= set(state), sorted(state)
    return state


def adam_steps(state: dict) -> set[int]:
    """The `step` count of Adam's state for every parameter: it equals the global step if the
    optimizer state was restored on resume (a fresh optimizer would count from 0 again)."""
    return {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()}


def all_last_checkpoints(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("**/checkpoints/last.ckpt"))


def test_sigkill_at_random_points_leaves_a_loadable_checkpoint_and_resume_continues(tmp_path):
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    log_dir = tmp_path / "logs"
    runs = log_dir / "train" / "runs"
    newest_step, newest, resumed_from = 0, None, None
    notes = []

    for k, how in enumerate(ROUNDS):
        run_dir = runs / f"round{k}_{how}"
        ckpt_dir = run_dir / "checkpoints"
        resume = []
        if newest is not None:
            resume = ["ckpt_path=last"] if k % 2 else [f"ckpt_path={newest}"]
        started = time.monotonic()
        proc, log = start_train(log_dir, run_dir, *resume)
        if how == "early":
            # Start-up takes seconds (imports, data): a kill in the first ones lands before any checkpoint.
            time.sleep(rng.uniform(0.5, 3.0))
            landed = "early"
            kill(proc)
        else:
            if how == "random":
                wait_for(proc, ckpt_dir, log, {}, lambda before, now: now != before)
                time.sleep(rng.uniform(0.0, 2.0))
            else:  # on_write: the instant of the 1st or 2nd write of last.ckpt in this run
                state = {}
                for _ in range(rng.randrange(1, 3)):
                    state = wait_for(proc, ckpt_dir, log, state, last_ckpt_write)
            mid_write = [n for n in snapshot(ckpt_dir) if not n.endswith(".ckpt")]
            kill(proc)
            landed = f"{how} (temporary files at kill: {mid_write})"
        notes.append(f"round {k}: {landed} after {time.monotonic() - started:.1f} s")

        # The newest last.ckpt, as `ckpt_path=last` finds it, loads with weights_only=True and is the furthest.
        candidates = all_last_checkpoints(log_dir)
        if not candidates:  # killed before the first last.ckpt of the whole chain: start afresh
            assert newest is None, notes
            continue
        steps = {p: load(p)["global_step"] for p in candidates}
        latest = find_last_checkpoint(log_dir / "train")
        assert steps[latest] == max(steps.values()), (seed, notes, steps)
        state = load(latest)
        step = state["global_step"]
        assert step % STEPS_PER_EPOCH == 0 and step >= newest_step, (seed, notes, step, newest_step)
        assert adam_steps(state) == {step}, (seed, notes, adam_steps(state), step)
        if resumed_from is not None and (ckpt_dir / "last.ckpt").exists():
            # This round resumed and wrote its own checkpoint: it continued from where it resumed.
            mine = load(ckpt_dir / "last.ckpt")["global_step"]
            assert mine > resumed_from, (seed, notes, mine, resumed_from)
        newest_step, newest = step, latest
        resumed_from = step

    # Finally, resume once more and let it finish exactly one more epoch.
    assert newest is not None, notes
    epoch = load(newest)["epoch"]
    run_dir = runs / "final"
    proc, log = start_train(log_dir, run_dir, f"ckpt_path={newest}", f"trainer.max_epochs={epoch + 2}")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    final = load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == newest_step + STEPS_PER_EPOCH, (seed, notes)
    assert final["epoch"] == epoch + 1
    assert adam_steps(final) == {final["global_step"]}
    assert (run_dir / "resumed_from.txt").read_text().strip() == str(newest.resolve())
    print(f"seed {seed}; " + "; ".join(notes) + f"; final global_step {final['global_step']}")
