"""Why benchmarks/qp_layer.py fixes glibc's allocator thresholds: per-process spread of the timings.

Runs `--processes` fresh Python processes with glibc's default allocator settings and as many with
qp_layer.py's ALLOCATOR_ENV (alternating), each timing forward + backward of ours and of qpth 0.0.18
at n = m = 100, p = 0, batch 128, float64, 1 thread (`ift.bench.interleaved`: one warm-up round,
then `--repeats` rounds, order alternating; the process's median). With the defaults, freed large
blocks go back to the OS and are faulted in again on the next call, depending on the process's
history; the spread across processes shows how much that moves each implementation.
Writes <out>/qp_allocator.{json,md}; needs the `bench` extra (qpth).

    python benchmarks/qp_allocator.py            # ~3 min on an idle machine
    python benchmarks/qp_allocator.py --quick    # smoke run (seconds; numbers meaningless)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QP_LAYER = HERE / "qp_layer.py"
# What the result measures: the solver (through qp_layer.py's Ours) and qp_layer.py's settings.
SOURCES = ["benchmarks/qp_layer.py", "src/ift/optnet/qp.py", "src/ift/optnet/kkt.py", "src/ift/optnet/scaling.py",
           "src/ift/implicit/core.py"]


def qp_layer_module():
    """benchmarks/qp_layer.py loaded from its path (no sys.path edit; it re-execs only as a script)."""
    spec = importlib.util.spec_from_file_location("qp_layer", QP_LAYER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["qp_layer"] = module
    spec.loader.exec_module(module)
    return module


def child() -> None:
    """One fresh process: time ours and qpth, print their median seconds as one JSON line."""
    import torch

    from ift import bench

    B = qp_layer_module()
    torch.set_num_threads(1)
    n, repeats, batch = (int(os.environ[k]) for k in ("QP_N", "QP_REPEATS", "QP_BATCH"))
    qp = B.random_qp(batch, n, n, 0, torch.float64)
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    impls = {f.name: f for f in (B.Ours(), B.make_qpth())}
    times = bench.interleaved({k: (lambda f=f: B.forward_backward(f, qp, W)) for k, f in impls.items()}, repeats=repeats)
    print(json.dumps({k: t.median for k, t in times.items()}))


def run_child(env_extra: dict, n: int, repeats: int, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra, QP_N=str(n), QP_REPEATS=str(repeats), QP_BATCH=str(batch),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"qp_allocator: a child process failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:] == ["--child"]:  # the child reads its settings from the environment
        child()
        return
    from ift import bench

    parser = bench.parser(__doc__)
    parser.add_argument("--processes", type=int, default=None, help="fresh processes per setting (default 5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per process (default 5)")
    parser.add_argument("--n", type=int, default=None, help="n = m (default 100)")
    parser.add_argument("--batch", type=int, default=None, help="problems per call (default 128)")
    args = parser.parse_args()
    for key, full, quick in (("processes", 5, 1), ("repeats", 5, 1), ("n", 100, 10), ("batch", 128, 8)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if qp_layer_module().make_qpth() is None:
        parser.error("qpth is not installed: pip install -e '.[bench]'")
    run = bench.Run("qp_allocator", SOURCES, args)
    allocator_env = qp_layer_module().ALLOCATOR_ENV  # the settings qp_layer.py runs under
    settings = {"glibc defaults": {}, "qp_layer.py settings": allocator_env}
    runs = {name: [] for name in settings}
    for _ in range(args.processes):
        for name, env in settings.items():  # alternating: a slow spell of the machine hits both
            runs[name].append(run_child(env, args.n, args.repeats, args.batch))
            print(name, runs[name][-1], flush=True)
    rows, cells = [], []
    for name, results in runs.items():
        for impl in ("ours", "qpth"):
            ms = [1e3 * r[impl] for r in results]
            s = bench.Spread.of(ms)
            rows.append({"setting": name, "impl": impl, "ms_per_process": ms, **s.to_dict()})
            cells.append([name, impl, f"{s.min:.0f}", f"{s.median:.0f}", f"{s.max:.0f}", ", ".join(f"{v:.0f}" for v in ms)])
        ratios = bench.Spread.of([r["qpth"] / r["ours"] for r in results])
        rows.append({"setting": name, "impl": "qpth / ours", "per_process": [r["qpth"] / r["ours"] for r in results],
                     **ratios.to_dict()})
        cells.append([name, "qpth / ours", f"{ratios.min:.2f}", f"{ratios.median:.2f}", f"{ratios.max:.2f}",
                      ", ".join(f"{r['qpth'] / r['ours']:.2f}" for r in results)])
    markdown = (f"# Allocator settings and the QP timings\n\nForward + backward ms at n = m = {args.n}, p = 0, batch "
                f"{args.batch}, float64, 1 thread; median of {args.repeats} interleaved rounds per process, "
                f"{args.processes} fresh processes per setting (alternating); qp_layer.py settings: "
                + " ".join(f"{k}={v}" for k, v in allocator_env.items()) + ".\n\n"
                + bench.table(["allocator", "implementation", "min", "median", "max", "per process"], cells,
                              align="llrrrl"))
    run.write({"settings": {"n": args.n, "p": 0, "batch": args.batch, "dtype": "float64", "processes": args.processes,
                            "repeats": args.repeats, "allocator_env": allocator_env}, "rows": rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
