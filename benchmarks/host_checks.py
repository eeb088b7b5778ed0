"""Cost of the host-side stopping tests in the core's iterative loops.

Every loop of the core (``minimize``, ``fixed_point``, CG) stops each row on the device but asks
the host "has every row stopped?" to leave early; on a GPU each such read is a device
synchronisation. ``check_every`` spaces the reads out (default 1 on CPU, 8 on accelerators, 1 for
Newton everywhere). This script times whole solves with ``check_every`` 1 and 8, interleaved
(the order alternating between repeats), median of ``--repeats``, and reports iterations per
second: on CPU the sparse reads cost at most the few masked iterations after the last row stops;
on a GPU they remove the synchronisations.

    python benchmarks/host_checks.py                 # CPU, ~1 min
    python benchmarks/host_checks.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ift.implicit import minimize
from ift.implicit.fixed_point import fixed_point

RESULTS = Path(__file__).parent / "results"


def logistic_problems(batch: int, n: int, rows: int, device: str, seed: int = 0):
    """Per-problem L2-regularised logistic regressions (smooth, strongly convex, varied conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, rows, n, generator=gen).to(device)
    y = (torch.rand(batch, rows, generator=gen) < 0.5).float().to(device)
    reg = torch.logspace(-2, 0, batch).to(device)

    def objective(w, X, y, reg):
        logits = (X @ w.unsqueeze(-1)).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(-1)
        return loss + 0.5 * reg * w.pow(2).sum(-1)

    return objective, (X, y, reg), torch.zeros(batch, n, device=device)


def cases(device: str):
    objective, args, x0 = logistic_problems(batch=256, n=16, rows=64, device=device)
    contraction = 0.9 * torch.linspace(0.3, 1.0, 256, device=device).unsqueeze(-1)
    target = torch.randn(256, 32, generator=torch.Generator().manual_seed(1)).to(device)
    return {
        "minimize sgd (256 x 16, rtol 1e-4)": lambda every: minimize(
            objective, x0, method="sgd", lr=1.0, momentum=0.5, rtol=1e-4, max_iter=2000, args=args,
            compact=True, check_every=every).iterations,
        "minimize adam (256 x 16, rtol 1e-4)": lambda every: minimize(
            objective, x0, method="adam", lr=0.1, rtol=1e-4, max_iter=2000, args=args, compact=True,
            check_every=every).iterations,
        "minimize newton (256 x 16, rtol 1e-5)": lambda every: minimize(
            objective, x0, method="newton", rtol=1e-5, max_iter=50, args=args, compact=True,
            check_every=every).iterations,
        "fixed_point (256 x 32, tol 1e-8)": lambda every: fixed_point(
            lambda x: contraction * torch.tanh(x) + target, torch.zeros_like(target), tol=1e-8,
            max_iter=1000, check_every=every).iterations,
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "host_checks"))
    opts = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, run in cases(opts.device).items():
        times = {1: [], 8: []}
        iterations = {}
        for rep in range(opts.repeats + 1):  # the first round warms up and is dropped
            for every in ((1, 8) if rep % 2 else (8, 1)):
                sync(opts.device)
                start = time.perf_counter()
                its = run(every)
                sync(opts.device)
                if rep:
                    times[every].append(time.perf_counter() - start)
                iterations[every] = int(its.max())
        med = {every: statistics.median(t) for every, t in times.items()}
        rows.append({"case": name, "max_iterations": iterations[1], "ms_check_every_1": 1e3 * med[1],
                     "ms_check_every_8": 1e3 * med[8], "ratio_8_over_1": med[8] / med[1]})
        print(rows[-1], flush=True)
    meta = {"device": torch.cuda.get_device_name() if opts.device.startswith("cuda") else platform.processor()
            or platform.machine(), "torch": torch.__version__, "threads": 1, "repeats": opts.repeats}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Device {meta['device']} ({opts.device}), torch {meta['torch']}, 1 thread; whole solves, median of "
             f"{opts.repeats} interleaved runs.", "",
             "| solve | iterations (max) | ms, check every 1 | ms, check every 8 | time 8 / 1 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['max_iterations']} | {r['ms_check_every_1']:.1f} | {r['ms_check_every_8']:.1f} "
              f"| {r['ratio_8_over_1']:.2f} |" for r in rows]
    Path(opts.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
