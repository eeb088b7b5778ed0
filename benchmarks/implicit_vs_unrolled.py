"""Implicit (IFT) vs unrolled differentiation on the ridge-regression hypergradient.

For each dimension ``d`` (``2d`` training and ``d`` validation rows, Gaussian data) and each number of
gradient-descent iterations ``K`` of the inner solver, both methods compute ``d L_val / d lambda``,
side by side in one run:

- implicit: GD under ``torch.no_grad()``, then ``implicit_argmin`` (CG on ``X^T X + lambda I``);
- unrolled: GD with the autograd graph, then backpropagation through all ``K`` steps.

Reported per (d, K, method): median wall time of forward + backward, bytes of tensors saved for
backward (unique storages seen by ``saved_tensors_hooks``, data matrices included), and the relative
error of the hypergradient against the closed form. The methods are interleaved within each repeat.

A second table times the backward alone of the IFT core against torchopt 0.7.3's ``custom_root``
(same ``w*``, same optimality condition ``grad_w`` of the same objective, same CG tolerance and
maxiter; interleaved, the order alternating between repeats). torchopt is optional (the ``bench``
extra plus ``pip install --no-deps torchopt==0.7.3``); without it that table is skipped with a
message. Writes JSON and markdown.

    python benchmarks/implicit_vs_unrolled.py            # default grid, ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from ift.implicit import CG, LinearSolveInfo, default_tol, implicit_argmin
from ift.implicit.examples import (
    ridge_gradient_descent,
    ridge_hypergradient_closed_form,
    ridge_objective,
    ridge_validation_loss,
)

RESULTS = Path(__file__).parent / "results"
TORCHOPT_INSTALL = "pip install optree graphviz && pip install --no-deps torchopt==0.7.3"


def import_torchopt():
    """torchopt, or None with a message saying how to install it."""
    # torchopt 0.7.3 calls the deprecated functorch.vjp: one FutureWarning per backward otherwise.
    warnings.filterwarnings("ignore", message=".*functorch.vjp.*", category=FutureWarning)
    try:
        import torchopt
    except ImportError as err:
        print(f"torchopt not available ({err}); skipping the torchopt comparison. Install: {TORCHOPT_INSTALL}")
        return None
    if torchopt.__version__ != "0.7.3":
        print(f"note: torchopt {torchopt.__version__} installed, the comparison was written for 0.7.3")
    return torchopt


class SavedBytes:
    """Bytes of unique storages autograd saves for backward inside the block; ``bytes_beyond_data``
    leaves out the storages of the given data tensors (which exist whether or not they are saved)."""

    def __init__(self, data: tuple[torch.Tensor, ...] = ()) -> None:
        self.bytes = 0
        self.bytes_beyond_data = 0
        self._data = {(str(t.device), t.untyped_storage().data_ptr()) for t in data}
        self._seen: set[tuple[str, int]] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
            if key not in self._data:
                self.bytes_beyond_data += storage.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def make_problem(d: int, seed: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, dtype=dtype, generator=g)
    X = torch.randn(2 * d, d, dtype=dtype, generator=g)
    Xv = torch.randn(d, d, dtype=dtype, generator=g)
    y = X @ w_true + torch.randn(2 * d, dtype=dtype, generator=g)
    yv = Xv @ w_true + torch.randn(d, dtype=dtype, generator=g)
    return [t.to(device) for t in (X, y, Xv, yv)]


def hypergradient(method: str, X, y, Xv, yv, lam0: float, iters: int, infos: list[LinearSolveInfo]):
    """One forward + backward; returns (gradient, SavedBytes)."""
    lam = torch.tensor(lam0, dtype=X.dtype, device=X.device, requires_grad=True)
    with SavedBytes(data=(X, y, Xv, yv)) as saved:
        if method == "implicit":
            with torch.no_grad():
                w_star = ridge_gradient_descent(X, y, lam, iters)
            w = implicit_argmin(ridge_objective, w_star, X, y, lam, on_solve=infos.append)
        else:
            w = ridge_gradient_descent(X, y, lam, iters)
        loss = ridge_validation_loss(w, Xv, yv)
    (grad,) = torch.autograd.grad(loss, lam)
    return grad, saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(dims, iters_list, repeats, lam_per_dim, device, dtype) -> list[dict]:
    rows = []
    for d in dims:
        lam = lam_per_dim * d  # keeps the penalty's share of the spectrum of X^T X (~ d) fixed across d
        X, y, Xv, yv = make_problem(d, seed=d, device=device, dtype=dtype)
        _, grad_exact = ridge_hypergradient_closed_form(X, y, Xv, yv, torch.tensor(lam, dtype=dtype, device=device))
        for iters in iters_list:
            methods = ("implicit", "unrolled")
            times = {m: [] for m in methods}
            infos, last = [], {}
            for _ in range(repeats):
                for method in methods:  # interleaved: both see the same machine load
                    synchronize(device)
                    start = time.perf_counter()
                    last[method] = hypergradient(method, X, y, Xv, yv, lam, iters, infos)
                    synchronize(device)
                    times[method].append(time.perf_counter() - start)
            for method in methods:
                grad, saved = last[method]
                rows.append(
                    {
                        "d": d,
                        "lam": lam,
                        "iters": iters,
                        "method": method,
                        "time_s": statistics.median(times[method]),
                        "saved_bytes": saved.bytes,
                        "saved_bytes_beyond_data": saved.bytes_beyond_data,
                        "grad": float(grad),
                        "grad_exact": float(grad_exact),
                        "rel_grad_error": float((grad - grad_exact).abs() / grad_exact.abs()),
                        "cg_iterations": infos[-1].max_iterations if method == "implicit" else None,
                    }
                )
                r = rows[-1]
                print(
                    f"d={d:5d} K={iters:5d} {method:8s} time={r['time_s'] * 1e3:9.1f} ms "
                    f"saved={saved.bytes / 2**20:9.2f} MiB (beyond data {saved.bytes_beyond_data / 2**20:8.3f}) rel.err={r['rel_grad_error']:.2e}",
                    flush=True,
                )
    return rows


class Stopwatch:
    """Wall seconds and CPU seconds of this thread (on CPU autograd runs the backward here, so the CPU
    time is less disturbed by other processes on a shared machine than the wall time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter() - self._wall, time.thread_time() - self._cpu


def backward_ift(w_star, X, y, Xv, yv, lam, tol, maxiter):
    """Seconds of the IFT core's backward alone, the gradient and the solve's info."""
    lam = torch.tensor(lam, dtype=X.dtype, device=X.device, requires_grad=True)
    infos: list[LinearSolveInfo] = []
    w = implicit_argmin(ridge_objective, w_star, X, y, lam, linear_solver=CG(tol=tol, maxiter=maxiter), on_solve=infos.append)
    loss = ridge_validation_loss(w, Xv, yv)
    with Stopwatch(X.device) as clock:
        (grad,) = torch.autograd.grad(loss, lam)
    return clock, grad, infos[0]


def backward_torchopt(torchopt, w_star, X, y, Xv, yv, lam, tol, maxiter):
    """The same with torchopt's ``custom_root`` and its CG (``solve_cg``)."""

    # lam leads: torchopt 0.7.3 indexes the differentiated arguments by position, so they must come first.
    def optimality(w, lam, X, y):
        return torch.func.grad(ridge_objective)(w, X, y, lam)

    solve = torchopt.linear_solve.solve_cg(rtol=tol, maxiter=maxiter)
    solver = torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)(lambda w, lam, X, y: w_star)
    lam = torch.tensor(lam, dtype=X.dtype, device=X.device, requires_grad=True)
    loss = ridge_validation_loss(solver(w_star, lam, X, y), Xv, yv)
    with Stopwatch(X.device) as clock:
        (grad,) = torch.autograd.grad(loss, lam)
    return clock, grad


def run_torchopt(torchopt, dims, iters, repeats, lam_per_dim, device, dtype) -> list[dict]:
    """Backward time of the core vs torchopt at the same ``w*`` (``iters`` GD steps), interleaved."""
    rows = []
    tol = default_tol(dtype)
    for d in dims:
        lam = lam_per_dim * d
        X, y, Xv, yv = make_problem(d, seed=d, device=device, dtype=dtype)
        _, grad_exact = ridge_hypergradient_closed_form(X, y, Xv, yv, torch.tensor(lam, dtype=dtype, device=device))
        maxiter = CG().default_maxiter(d)
        with torch.no_grad():
            w_star = ridge_gradient_descent(X, y, torch.tensor(lam, dtype=dtype, device=device), iters)
        times = {"ift": [], "torchopt": []}
        cpu_times = {"ift": [], "torchopt": []}
        for repeat in range(repeats + 1):  # the first round warms up and is not timed
            order = ("ift", "torchopt") if repeat % 2 else ("torchopt", "ift")
            for method in order:
                if method == "ift":
                    clock, grad_ift, info = backward_ift(w_star, X, y, Xv, yv, lam, tol, maxiter)
                else:
                    clock, grad_to = backward_torchopt(torchopt, w_star, X, y, Xv, yv, lam, tol, maxiter)
                if repeat:
                    times[method].append(clock.wall)
                    cpu_times[method].append(clock.cpu)
        row = {
            "d": d,
            "iters": iters,
            "cg_tol": tol,
            "maxiter": maxiter,
            "ift_backward_s": statistics.median(times["ift"]),
            "torchopt_backward_s": statistics.median(times["torchopt"]),
            "ift_backward_cpu_s": statistics.median(cpu_times["ift"]),
            "torchopt_backward_cpu_s": statistics.median(cpu_times["torchopt"]),
            "ift_times_s": times["ift"],
            "torchopt_times_s": times["torchopt"],
            "ift_cg_iterations": info.max_iterations,
            "ift_cg_residual": info.max_residual,
            "ift_rel_grad_error": float((grad_ift - grad_exact).abs() / grad_exact.abs()),
            "torchopt_rel_grad_error": float((grad_to - grad_exact).abs() / grad_exact.abs()),
        }
        rows.append(row)
        print(
            f"d={d:5d} backward: ift {row['ift_backward_s'] * 1e3:.2f} ms, torchopt {row['torchopt_backward_s'] * 1e3:.2f} ms "
            f"(ratio {row['torchopt_backward_s'] / row['ift_backward_s']:.2f}), CG iters {info.max_iterations}",
            flush=True,
        )
    return rows


def torchopt_markdown(rows: list[dict], meta: dict) -> list[str]:
    if not rows:
        return ["torchopt comparison skipped: torchopt not installed (" + TORCHOPT_INSTALL + ").", ""]
    lines = [
        "## Backward only: IFT core vs torchopt 0.7.3 `custom_root`",
        "",
        f"Same `w*` ({rows[0]['iters']} GD steps), same optimality condition (`torch.func.grad` of the ridge "
        f"objective for torchopt, the objective itself for `implicit_argmin`), same CG relative tolerance "
        f"({rows[0]['cg_tol']:g}) and maxiter; median of {meta['torchopt_repeats']} interleaved runs (order "
        "alternating, one warm-up round) of `torch.autograd.grad` alone.",
        "",
        "| d | IFT core backward (ms) | torchopt backward (ms) | speed ratio torchopt/core "
        "| CPU time core / torchopt (ms) | CPU ratio | CG iters (core) "
        "| core CG residual | core rel. error | torchopt rel. error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['ift_backward_s'] * 1e3:.2f} | {r['torchopt_backward_s'] * 1e3:.2f} | "
            f"{r['torchopt_backward_s'] / r['ift_backward_s']:.2f} | "
            f"{r['ift_backward_cpu_s'] * 1e3:.2f} / {r['torchopt_backward_cpu_s'] * 1e3:.2f} | "
            f"{r['torchopt_backward_cpu_s'] / r['ift_backward_cpu_s']:.2f} | {r['ift_cg_iterations']} | "
            f"{r['ift_cg_residual']:.1e} | {r['ift_rel_grad_error']:.1e} | {r['torchopt_rel_grad_error']:.1e} |"
        )
    lines += [
        "",
        "Speed ratio > 1 means the core's backward is faster. CPU time is that of the calling thread, "
        "which runs the CPU backward (less disturbed than wall time when other processes share the machine).",
        "",
    ]
    return lines


def markdown(rows: list[dict], meta: dict, torchopt_rows: list[dict]) -> str:
    by_key = {(r["d"], r["iters"], r["method"]): r for r in rows}
    lines = [
        "# Implicit vs unrolled: ridge hypergradient",
        "",
        f"`{meta['command']}` on {meta['device']} ({meta['threads']} thread(s)), {meta['dtype']}, "
        f"torch {meta['torch']}, median of {meta['repeats']} interleaved runs of forward + backward. Data: X (2d x d), "
        f"X_val (d x d) Gaussian, lambda = {meta['lam_per_dim']} d; CG tolerance {meta['cg_tol']:g} (relative residual).",
        "",
        "| d | GD iters K | implicit time (ms) | unrolled time (ms) | time ratio unrolled/implicit "
        "| implicit saved (MiB) | unrolled saved (MiB) | memory ratio | saved beyond data, implicit / unrolled (KiB) "
        "| implicit rel. error | unrolled rel. error | CG iters |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d, iters in sorted({(r["d"], r["iters"]) for r in rows}):
        imp, unr = by_key[(d, iters, "implicit")], by_key[(d, iters, "unrolled")]
        lines.append(
            f"| {d} | {iters} | {imp['time_s'] * 1e3:.1f} | {unr['time_s'] * 1e3:.1f} | "
            f"{unr['time_s'] / imp['time_s']:.2f} | {imp['saved_bytes'] / 2**20:.3f} | "
            f"{unr['saved_bytes'] / 2**20:.3f} | {unr['saved_bytes'] / imp['saved_bytes']:.1f} | "
            f"{imp['saved_bytes_beyond_data'] / 2**10:.1f} / {unr['saved_bytes_beyond_data'] / 2**10:.1f} | "
            f"{imp['rel_grad_error']:.1e} | {unr['rel_grad_error']:.1e} | {imp['cg_iterations']} |"
        )
    lines += [
        "",
        "Saved bytes are unique storages packed by `torch.autograd.graph.saved_tensors_hooks` during the "
        "forward, including the data matrices (which both methods keep); the 'beyond data' column leaves "
        "them out. Time ratio > 1 means implicit is faster. Relative error is against the "
        "closed form `-(X_val^T r)^T (X^T X + lambda I)^{-1} w*`; at small K both methods inherit the "
        "unconverged inner solve, the implicit one through `w_K`, the unrolled one through truncation.",
        "",
    ]
    return "\n".join(lines + torchopt_markdown(torchopt_rows, meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--iters", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torchopt-dims", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--torchopt-repeats", type=int, default=15)
    parser.add_argument("--lam-per-dim", type=float, default=0.25, help="L2 penalty lambda = this * d")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--name", default="implicit_vs_unrolled", help="results/<name>.json and .md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = run(args.dims, args.iters, args.repeats, args.lam_per_dim, device, dtype)
    torchopt = import_torchopt()
    torchopt_rows = []
    if torchopt is not None:
        torchopt_rows = run_torchopt(
            torchopt, args.torchopt_dims, max(args.iters), args.torchopt_repeats, args.lam_per_dim, device, dtype
        )
    meta = {
        "command": "python benchmarks/implicit_vs_unrolled.py"
        + (f" --dims {' '.join(map(str, args.dims))}" if args.dims != [64, 256, 1024] else "")
        + (f" --iters {' '.join(map(str, args.iters))}" if args.iters != [100, 1000] else "")
        + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
        + (f" --torchopt-dims {' '.join(map(str, args.torchopt_dims))}" if args.torchopt_dims != [256, 1024] else "")
        + (f" --torchopt-repeats {args.torchopt_repeats}" if args.torchopt_repeats != 15 else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "torchopt_repeats": args.torchopt_repeats,
        "torchopt": getattr(torchopt, "__version__", None),
        "lam_per_dim": args.lam_per_dim,
        "cg_tol": default_tol(dtype),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows, "torchopt_rows": torchopt_rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, meta, torchopt_rows))
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
