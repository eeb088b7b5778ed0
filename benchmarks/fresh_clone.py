"""What a new user waits for: a clean clone of the committed tree, timed command by command.

Clones HEAD into a temporary folder (``git clone``: committed files only, no .venv, no caches of
this checkout) and times, in that clone, the README's commands one after the other:

1. ``make venv``: the first install (creates .venv, installs ``-c constraints.txt -e '.[test]'``;
   pip's download cache and the machine's package index are what they are on this machine, and
   the result says whether a pip cache was present);
2. ``.ci/run``: what CI runs (``make test``, the default suite, then the results check);
3. ``make train``: ``python train.py model=savi_ift`` on the bundled digits;
4. bad input: a few mistakes from the README, each timed to its one-line error (exit code 1).

    python benchmarks/fresh_clone.py           # ~10 min on 2 idle cores (the test suite is the bulk)
    python benchmarks/fresh_clone.py --quick   # clone + install + the bad-input cases only
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ift import bench

REPO = Path(__file__).resolve().parents[1]
# What the timings measure: the install inputs and the default training command.
SOURCES = ["Makefile", "pyproject.toml", "constraints.txt", ".ci/run", "train.py", "configs"]

# (name, command): mistakes the README names; each must stop with exit code 1 and one line.
BAD_INPUT = [
    ("unknown option (Hydra, before torch)", [".venv/bin/python", "train.py", "model=no_such_model"]),
    ("trainer number (before torch)", [".venv/bin/python", "train.py", "trainer.max_epochs=abc"]),
    ("wrong data for the model (before torch)", [".venv/bin/python", "train.py", "model=imaml"]),
    ("model hyperparameter (after torch)", [".venv/bin/python", "train.py", "model.inner.eta=-1"]),
]


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    start = time.perf_counter()
    with log.open("w") as out:
        # SIGINT as in a foreground shell, also when this script runs under nohup / in the background
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "WANDB_MODE": "offline"},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seconds = time.perf_counter() - start
    home = str(Path.home())  # results hold no path of this machine (make echoes pyenv's python)
    lines = [line.replace(home, "~") for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return {"command": " ".join(cmd), "seconds": round(seconds, 1), "exit_code": done.returncode,
            "first_line": lines[0][:300] if lines else "", "last_line": lines[-1][:300] if lines else ""}


def summary_line(log: Path, prefix: str) -> str:
    """The last line of ``log`` that starts with ``prefix`` (pytest's '== N passed ... in Ts ==')."""
    hits = [line for line in log.read_text(errors="replace").splitlines() if prefix in line]
    return hits[-1].strip() if hits else ""


def main() -> None:
    parser = bench.parser(__doc__)
    args = parser.parse_args()
    run = bench.Run("fresh_clone", SOURCES, args)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    pip_cache = Path.home() / ".cache" / "pip"
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        clone, logs = Path(tmp) / "clone", Path(tmp) / "logs"
        logs.mkdir()
        subprocess.run(["git", "clone", "--quiet", "--no-local", str(REPO), str(clone)], check=True)
        commands = [("make venv", ["make", "venv"])]
        if not args.quick:
            commands += [(".ci/run", [".ci/run"]), ("make train", ["make", "train"])]
        for i, (name, cmd) in enumerate(commands):
            steps[name] = timed(cmd, clone, logs / f"step{i}.log")
            if name == ".ci/run":
                steps[name]["pytest_summary"] = summary_line(logs / f"step{i}.log", " passed")
            print(name, steps[name], flush=True)
        bad = [{"case": case, **timed(cmd, clone, logs / f"bad{i}.log")} for i, (case, cmd) in enumerate(BAD_INPUT)]
    rows = [[name, f"{s['seconds']:.0f}", s["exit_code"], s.get("pytest_summary") or s["last_line"]]
            for name, s in steps.items()]
    # Hydra's own errors put the message first and a HYDRA_FULL_ERROR hint last; ours are one line.
    bad_rows = [[b["case"], f"{b['seconds']:.1f}", b["exit_code"],
                 b["first_line"] if "HYDRA_FULL_ERROR" in b["last_line"] else b["last_line"]] for b in bad]
    markdown = (f"# A clean clone, timed\n\nClone of commit `{head[:12]}` in a temporary folder; {bench.describe(run.environment)}; "
                f"pip cache present: {pip_cache.is_dir()} (packages come from this machine's index either way).\n\n"
                + bench.table(["command", "seconds", "exit code", "outcome"], rows)
                + "\n\nBad input (each should stop with exit code 1 and one line):\n\n"
                + bench.table(["mistake", "seconds", "exit code", "message"], bad_rows))
    run.write({"commit": head, "steps": steps, "bad_input": bad, "pip_cache": pip_cache.is_dir()}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
