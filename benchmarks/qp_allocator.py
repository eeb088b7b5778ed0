"""Why benchmarks/qp_layer.py fixes glibc's allocator thresholds: per-process spread of the timings.

Runs `--processes` fresh Python processes with glibc's default allocator settings and as many with
qp_layer.py's ALLOCATOR_ENV (alternating), each timing forward + backward of ours and of qpth 0.0.18
at n = m = 100, p = 0, batch 128, float64, 1 thread (median of `--repeats` after one warm-up).
With the defaults, freed large blocks go back to the OS and are faulted in again on the next
call, depending on the process's history; the spread across processes shows how much that moves
each implementation. Writes benchmarks/results/qp_allocator.{json,md}; needs the `bench` extra.

    python benchmarks/qp_allocator.py        # ~3 min on an idle machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# The child reads its settings from the environment (some launchers rewrite sys.argv).
CHILD = """
import importlib.util, json, os, statistics, sys, time
import torch
spec = importlib.util.spec_from_file_location("qp_layer", os.environ["QP_LAYER_PY"])
B = importlib.util.module_from_spec(spec)
sys.modules["qp_layer"] = B
spec.loader.exec_module(B)
torch.set_num_threads(1)
n, repeats = int(os.environ["QP_N"]), int(os.environ["QP_REPEATS"])
qp = B.random_qp(128, n, n, 0, torch.float64)
W = torch.randn(128, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
impls = [B.Ours(), B.make_qpth()]
times = {f.name: [] for f in impls}
for f in impls:
    B.forward_backward(f, qp, W)
for _ in range(repeats):
    for f in impls:
        start = time.perf_counter()
        B.forward_backward(f, qp, W)
        times[f.name].append(time.perf_counter() - start)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def run_child(env_extra: dict, n: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra, QP_LAYER_PY=str(HERE / "qp_layer.py"), QP_N=str(n), QP_REPEATS=str(repeats),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _qp_layer_module():
    """benchmarks/qp_layer.py loaded from its path (no sys.path edit; it re-execs only as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qp_layer", HERE / "qp_layer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["qp_layer"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5, help="fresh processes per setting")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process (median)")
    parser.add_argument("--n", type=int, default=100)
    opts = parser.parse_args()
    ALLOCATOR_ENV = _qp_layer_module().ALLOCATOR_ENV  # the settings qp_layer.py runs under

    settings = {"glibc defaults": {}, "qp_layer.py settings": ALLOCATOR_ENV}
    runs = {name: [] for name in settings}
    for _ in range(opts.processes):
        for name, env in settings.items():  # alternating: a slow spell of the machine hits both
            runs[name].append(run_child(env, opts.n, opts.repeats))
            print(name, runs[name][-1], flush=True)
    rows = []
    for name, results in runs.items():
        for impl in ("ours", "qpth"):
            ms = [1e3 * r[impl] for r in results]
            rows.append({"setting": name, "impl": impl, "ms_per_process": ms, "min": min(ms),
                         "median": statistics.median(ms), "max": max(ms)})
    RESULTS.mkdir(exist_ok=True)
    meta = {"n": opts.n, "p": 0, "batch": 128, "dtype": "float64", "processes": opts.processes,
            "repeats": opts.repeats, "allocator_env": ALLOCATOR_ENV}
    (RESULTS / "qp_allocator.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Forward + backward ms at n = m = {opts.n}, p = 0, batch 128, float64, 1 thread; median of "
             f"{opts.repeats} calls per process, {opts.processes} fresh processes per setting (alternating).", "",
             "| allocator | implementation | min | median | max | per process |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['impl']} | {r['min']:.0f} | {r['median']:.0f} | {r['max']:.0f} | "
              + ", ".join(f"{v:.0f}" for v in r["ms_per_process"]) + " |" for r in rows]
    (RESULTS / "qp_allocator.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
