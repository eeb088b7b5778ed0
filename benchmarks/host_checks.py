"""Cost of the host-side stopping tests in the core's iterative loops.

Every loop of the core (``minimize``, ``fixed_point``, CG) stops each row on the device but asks
the host "has every row stopped?" to leave early; on a GPU each such read is a device
synchronisation. ``check_every`` spaces the reads out (default 1 on CPU, 8 on accelerators, 1 for
Newton everywhere). This script times whole solves with ``check_every`` 1 and 8, interleaved
(the order alternating between repeats), and reports median [min, max] of ``--repeats`` rounds
and the per-round ratio: on CPU the sparse reads cost at most the few masked iterations after the last row stops;
on a GPU they remove the synchronisations.

    python benchmarks/host_checks.py                 # CPU, ~1 min
    python benchmarks/host_checks.py --device cuda   # on a GPU
    python benchmarks/host_checks.py --quick         # smoke run (seconds; numbers meaningless)
"""

from __future__ import annotations

import torch

from ift import bench
from ift.implicit import minimize
from ift.implicit.fixed_point import fixed_point

# What the timings measure: the loops and their stopping tests.
SOURCES = ["src/ift/implicit/minimize.py", "src/ift/implicit/fixed_point.py", "src/ift/implicit/linear_solvers.py"]


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


def cases(device: str, batch: int):
    objective, args, x0 = logistic_problems(batch=batch, n=16, rows=64, device=device)
    contraction = 0.9 * torch.linspace(0.3, 1.0, batch, device=device).unsqueeze(-1)
    target = torch.randn(batch, 32, generator=torch.Generator().manual_seed(1)).to(device)
    return {
        f"minimize sgd ({batch} x 16, tol 1e-4)": lambda every: minimize(
            objective, x0, method="sgd", lr=1.0, momentum=0.5, tol=1e-4, max_iter=2000, args=args,
            compact=True, check_every=every).iterations,
        f"minimize adam ({batch} x 16, tol 1e-4)": lambda every: minimize(
            objective, x0, method="adam", lr=0.1, tol=1e-4, max_iter=2000, args=args, compact=True,
            check_every=every).iterations,
        f"minimize newton ({batch} x 16, tol 1e-5)": lambda every: minimize(
            objective, x0, method="newton", tol=1e-5, max_iter=50, args=args, compact=True,
            check_every=every).iterations,
        f"fixed_point ({batch} x 32, tol 1e-8)": lambda every: fixed_point(
            lambda x: contraction * torch.tanh(x) + target, torch.zeros_like(target), tol=1e-8,
            max_iter=1000, check_every=every).iterations,
    }


def main() -> None:
    parser = bench.parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256, help="problems per solve")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.batch = 1, 16
    torch.set_num_threads(1)
    run = bench.Run("host_checks", SOURCES, args, device=args.device)
    rows, cells = [], []
    for name, solve in cases(args.device, args.batch).items():
        times = bench.interleaved({every: (lambda every=every: solve(every)) for every in (1, 8)},
                                  repeats=args.repeats, device=args.device)
        ratio = bench.ratio(times[8], times[1])
        rows.append({"case": name, "max_iterations": int(times[1].last.max()),
                     "check_every_1": times[1].to_dict(), "check_every_8": times[8].to_dict(),
                     "ratio_8_over_1": ratio.to_dict()})
        cells.append([name, rows[-1]["max_iterations"], times[1].spread().fmt(".1f", 1e3),
                      times[8].spread().fmt(".1f", 1e3), ratio.fmt()])
        print(cells[-1], flush=True)
    markdown = (f"# Host-side stopping tests: check_every 1 vs 8\n\n{bench.describe(run.environment)}; whole "
                f"solves, {args.repeats} interleaved rounds (order alternating, one warm-up round); each cell "
                "is median [min, max]; the ratio is taken per round.\n\n"
                + bench.table(["solve", "iterations (max)", "ms, check every 1", "ms, check every 8",
                               "time 8 / 1"], cells))
    run.write({"rows": rows}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
