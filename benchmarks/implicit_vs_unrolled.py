"""Implicit (IFT) vs unrolled differentiation on the ridge-regression hypergradient.

For each dimension ``d`` (``2d`` training and ``d`` validation rows, Gaussian data) and each number of
gradient-descent iterations ``K`` of the inner solver, both methods compute ``d L_val / d lambda``,
side by side in one run:

- implicit: GD under ``torch.no_grad()``, then ``implicit_argmin`` (CG on ``X^T X + lambda I``);
- unrolled: GD with the autograd graph, then backpropagation through all ``K`` steps.

Reported per (d, K, method): median wall time of forward + backward, bytes of tensors saved for
backward (unique storages seen by ``saved_tensors_hooks``, data matrices included), and the relative
error of the hypergradient against the closed form. Writes JSON and a markdown table.

    python benchmarks/implicit_vs_unrolled.py            # default grid, ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ift.implicit import LinearSolveInfo, default_tol, implicit_argmin
from ift.implicit.examples import (
    ridge_gradient_descent,
    ridge_hypergradient_closed_form,
    ridge_objective,
    ridge_validation_loss,
)

RESULTS = Path(__file__).parent / "results"


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
            for method in ("implicit", "unrolled"):
                times, infos = [], []
                for _ in range(repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    grad, saved = hypergradient(method, X, y, Xv, yv, lam, iters, infos)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                rows.append(
                    {
                        "d": d,
                        "lam": lam,
                        "iters": iters,
                        "method": method,
                        "time_s": statistics.median(times),
                        "saved_bytes": saved.bytes,
                        "saved_bytes_beyond_data": saved.bytes_beyond_data,
                        "grad": float(grad),
                        "grad_exact": float(grad_exact),
                        "rel_grad_error": float((grad - grad_exact).abs() / grad_exact.abs()),
                        "cg_iterations": infos[-1].max_iterations if infos else None,
                    }
                )
                r = rows[-1]
                print(
                    f"d={d:5d} K={iters:5d} {method:8s} time={r['time_s'] * 1e3:9.1f} ms "
                    f"saved={saved.bytes / 2**20:9.2f} MiB (beyond data {saved.bytes_beyond_data / 2**20:8.3f}) rel.err={r['rel_grad_error']:.2e}",
                    flush=True,
                )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    by_key = {(r["d"], r["iters"], r["method"]): r for r in rows}
    lines = [
        "# Implicit vs unrolled: ridge hypergradient",
        "",
        f"`{meta['command']}` on {meta['device']} ({meta['threads']} thread(s)), {meta['dtype']}, "
        f"torch {meta['torch']}, median of {meta['repeats']} runs of forward + backward. Data: X (2d x d), "
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
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--iters", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lam-per-dim", type=float, default=0.25, help="L2 penalty lambda = this * d")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--name", default="implicit_vs_unrolled", help="results/<name>.json and .md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = run(args.dims, args.iters, args.repeats, args.lam_per_dim, device, dtype)
    meta = {
        "command": "python benchmarks/implicit_vs_unrolled.py"
        + (f" --dims {' '.join(map(str, args.dims))}" if args.dims != [64, 256, 1024] else "")
        + (f" --iters {' '.join(map(str, args.iters))}" if args.iters != [100, 1000] else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "lam_per_dim": args.lam_per_dim,
        "cg_tol": default_tol(dtype),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, meta))
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
