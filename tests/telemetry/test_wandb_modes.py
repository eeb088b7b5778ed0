"""W&B through the real train.py: online without a key, on a terminal, with an unreachable server
and killed mid-run. Each run must end with exit 0 (or the kill) and an offline run holding the
metrics, read back from the run's `.wandb` file itself."""

from __future__ import annotations

import csv
import json
import os
import pty
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

FAST = ["model=vae", "debug=fast", "trainer=cpu", "test=false", "trainer.enable_progress_bar=false"]
FAKE_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, the format W&B checks


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No W&B credentials anywhere: no key variable, an empty HOME, no netrc, no W&B settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), NETRC=str(home / "no-netrc"), WANDB_CONFIG_DIR=str(home / "wandb-config"),
               WANDB_CACHE_DIR=str(home / "wandb-cache"), MPLCONFIGDIR=str(home / "mpl"), WANDB_MODE="online")
    env.update(extra)
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def wandb_records(path: Path):
    """Records of a `.wandb` file: W&B's header, then LevelDB-log framing (32 KiB blocks, 7-byte
    headers: crc32c, length, type full/first/middle/last) around protobuf `Record`s."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:
            break  # a record cut by the kill
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def wandb_history(run_dir: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run in {run_dir}, found {files}"
    rows = []
    for raw in wandb_records(files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def assert_offline_run_with_metrics(run_dir: Path) -> None:
    keys = set().union(*wandb_history(run_dir))
    assert {"train/elbo", "val/loss", "perf/step_time_s"} <= keys, sorted(keys)


def train(run_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *FAST, f"hydra.run.dir={run_dir}", *args],
                          cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def test_online_without_a_key_logs_offline_with_one_warning(tmp_path):
    result = train(tmp_path / "run", clean_env(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert out.count("no credentials") == 1, out[-3000:]
    assert "UsageError" not in out and "Traceback" not in out
    for noise in ("litlogger", "LeafSpec", "anonymous setting", "environment variables will be ignored"):
        assert noise not in out, noise  # third-party notices silenced at their source (ift.config)
    assert_offline_run_with_metrics(tmp_path / "run")


def test_fake_key_and_closed_port_logs_offline_within_the_bound(tmp_path):
    env = clean_env(tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    result = train(tmp_path / "run", env, "logger.wandb.online_timeout_s=10")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert out.count("unreachable") == 1 and "logging offline" in out, out[-3000:]
    assert "CommError" not in out and "Traceback" not in out
    assert_offline_run_with_metrics(tmp_path / "run")


def test_wandb_waits_at_most_online_timeout_for_a_silent_server(tmp_path, monkeypatch):
    """A server that accepts connections and never answers (the case that hung for ~110 s)."""
    from ift.wandb_utils import server_unreachable

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        start = time.monotonic()
        reason = server_unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1.0)
        waited = time.monotonic() - start
    assert reason is not None and waited < 2.0, (reason, waited)


def test_on_a_terminal_no_login_prompt_appears(tmp_path):
    """Under a pty W&B would show its "(1) Create a W&B account ... Enter your choice:" menu; nothing
    is ever typed here, so a prompt would hang the run until the timeout."""
    master, slave = pty.openpty()
    env = clean_env(tmp_path, TERM="xterm")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAST, f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    text = out.decode(errors="replace")
    try:
        returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"train.py still running after 300 s on a terminal:\n{text[-3000:]}")
    assert returncode == 0, text[-3000:]
    assert "Enter your choice" not in text and "Create a W&B account" not in text
    assert text.count("no credentials") == 1, text[-3000:]
    assert_offline_run_with_metrics(tmp_path / "run")


def csv_metrics(path: Path) -> list[tuple[int, str, float]]:
    rows = list(csv.DictReader(path.open()))
    return [(int(r["step"]), k, float(v)) for r in rows for k, v in r.items() if v and k not in ("step",)]


@pytest.mark.slow
def test_killed_run_keeps_in_wandb_what_reached_the_csv(tmp_path):
    """SIGKILL once the CSV has the first epoch's validation metrics: every CSV value that is at least
    2 x flush_every_s old at the kill is in the W&B run file too (README, "Resuming and faults")."""
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = ["model=vae", "trainer=cpu", "trainer.max_epochs=50", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=2", f"hydra.run.dir={run}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv_file, snapshot = run / "csv" / "metrics.csv", []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if csv_file.exists():
                snapshot = csv_metrics(csv_file)
                if any(k == "val/loss" for _, k, _ in snapshot):
                    break
            time.sleep(0.02)
        assert any(k == "val/loss" for _, k, _ in snapshot), "no validation metrics in the CSV"
        time.sleep(2 * 0.5)  # flush_every_s in configs/logger/wandb.yaml
    finally:
        proc.kill()
        proc.wait(timeout=60)
    history = wandb_history(run)
    logged = {(row.get("trainer/global_step"), k, v) for row in history for k, v in row.items()}
    missing = [(s, k, v) for s, k, v in snapshot
               if not any(ws == s and wk == k and v == pytest.approx(wv, rel=1e-6) for ws, wk, wv in logged)]
    assert not missing, f"{len(missing)} CSV metrics not in the W&B run: {missing[:5]}"
