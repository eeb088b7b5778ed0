"""Ctrl-C (SIGINT) or SIGTERM during training: the run ends after the current batch with
`checkpoints/interrupted.ckpt` and one line saying how to resume; resuming from it continues the
step counter. The in-process test signals itself at a known step; the slow one signals a real
`train.py` from outside, as a user or a scheduler does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ift.training import run_training
from tests.conftest import ROOT

ARGS = ["model=vae", "logger=csv", "trainer=cpu", "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "test=false", "threads=1"]
STARTUP_TIMEOUT_S = 240
RESUME = re.compile(r"(SIGTERM|Ctrl-C) at epoch (\d+), step (\d+): saved (\S+)\. Resume with: (python train\.py .*)$",
                    re.MULTILINE)


def train_until_a_step_is_logged(run_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *ARGS, f"paths.log_dir={run_dir.parent}",
                                 f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a foreground run
    csv = run_dir / "csv" / "metrics.csv"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (csv.is_file() and len(csv.read_text().splitlines()) > 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"train.py did not start training (rc {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


class SignalAtStep(pl.Callback):
    """Sends this process `signum` after training step `step` (the user's Ctrl-C or kill)."""

    def __init__(self, step: int, signum: str) -> None:
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum, code", [("SIGTERM", 143), ("SIGINT", 1)], ids=["sigterm", "ctrl-c"])
def test_interrupt_in_process_saves_the_step_and_logs_the_resume_command(compose_train, caplog, signum, code):
    cfg = compose_train(*ARGS, "+callbacks.signal._target_=tests.reliability.test_interrupt.SignalAtStep",
                        "+callbacks.signal.step=2", f"+callbacks.signal.signum={signum}")
    # A shell starts background jobs (`cmd &`, nohup) with SIGINT ignored, and Python then keeps it
    # ignored: Ctrl-C is what raises KeyboardInterrupt in a foreground run, so give the test that.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as stop:
            run_training(cfg)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stop.value.code == code
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "interrupted.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 2
    match = RESUME.search(caplog.text)
    assert match and Path(match.group(4)) == ckpt and match.group(5).endswith(f"ckpt_path={ckpt}")


@pytest.mark.slow
@pytest.mark.parametrize("signum, returncode", [(signal.SIGTERM, 143), (signal.SIGINT, 1)], ids=["sigterm", "ctrl-c"])
def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(tmp_path, signum, returncode):
    run_dir, log = tmp_path / "logs" / "run", tmp_path / "train.out"
    proc = train_until_a_step_is_logged(run_dir, log)
    sent = time.monotonic()
    proc.send_signal(signum)
    proc.wait(timeout=120)
    ended_s = time.monotonic() - sent
    output = log.read_text()
    assert proc.returncode == returncode, output[-3000:]
    match = RESUME.search(output)
    assert match, output[-3000:]
    ckpt = Path(match.group(4))
    assert ckpt == run_dir / "checkpoints" / "interrupted.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == int(match.group(3)) > 0
    assert ended_s < 60, f"{ended_s:.0f} s from the signal to the end of the process"
    if signum == signal.SIGTERM:
        assert_resume_continues(match.group(5), state["global_step"], tmp_path)


def assert_resume_continues(command: str, step: int, tmp_path: Path) -> None:
    """Run the logged command (into a new run folder): training picks up at the saved step."""
    args = command.split()[2:]
    assert f"ckpt_path={args[-1].split('=', 1)[1]}" in args and "model=vae" in args
    resumed_dir = tmp_path / "logs" / "resumed"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *[a for a in args if not a.startswith("hydra.run.dir=")],
                           f"hydra.run.dir={resumed_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 3 * 12  # 3 epochs of 12 digits batches in all
    assert (resumed_dir / "resumed_from.txt").read_text().strip().endswith("interrupted.ckpt")
