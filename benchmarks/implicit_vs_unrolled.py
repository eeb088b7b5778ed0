"""Implicit (IFT) vs unrolled differentiation on the ridge-regression hypergradient.

For each dimension ``d`` (``2d`` training and ``d`` validation rows, Gaussian data) and each number of
gradient-descent iterations ``K`` of the inner solver, both methods compute ``d L_val / d lambda``,
side by side in one run:

- implicit: GD under ``torch.no_grad()``, then ``implicit_argmin`` (CG on ``X^T X + lambda I``);
- unrolled: GD with the autograd graph, then backpropagation through all ``K`` steps.

Reported per (d, K, method): median wall time of forward + backward (and per (d, K) the min /
median / max of the per-round time ratio), bytes of tensors saved for
backward (unique storages seen by ``saved_tensors_hooks``, data matrices included), and the relative
error of the hypergradient against the closed form. The methods are interleaved within each repeat.

A second table times the backward alone of the IFT core against torchopt 0.7.3's ``custom_root``
(same ``w*``, same optimality condition ``grad_w`` of the same objective, same CG tolerance and
max_iter; interleaved, the order alternating between repeats). torchopt is optional (the ``bench``
extra plus ``pip install --no-deps torchopt==0.7.3``); without it that table is skipped with a
message. Both tables report the ratio as median [min, max] over the rounds. Writes JSON and markdown
through ``ift.bench``.

    python benchmarks/implicit_vs_unrolled.py            # default grid, ~4 min on one idle core
    python benchmarks/implicit_vs_unrolled.py --quick    # smoke run (~15 s; numbers meaningless)
"""

from __future__ import annotations

import warnings

import torch

from ift import bench
from ift.implicit import CG, LinearSolveInfo, default_tol, implicit_argmin
from ift.implicit.examples import (
    ridge_gradient_descent,
    ridge_hypergradient_closed_form,
    ridge_objective,
    ridge_validation_loss,
)

SOURCES = ["src/ift/implicit/core.py", "src/ift/implicit/linear_solvers.py", "src/ift/implicit/operators.py",
           "src/ift/implicit/diagnostics.py", "src/ift/implicit/examples.py"]
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


def run(dims, iters_list, repeats, lam_per_dim, device, dtype) -> tuple[list[dict], list[dict]]:
    """Per (d, K, method) rows, and per (d, K) the spread of the per-round time ratio unrolled / implicit."""
    rows, ratios = [], []
    for d in dims:
        lam = lam_per_dim * d  # keeps the penalty's share of the spectrum of X^T X (~ d) fixed across d
        X, y, Xv, yv = make_problem(d, seed=d, device=device, dtype=dtype)
        _, grad_exact = ridge_hypergradient_closed_form(X, y, Xv, yv, torch.tensor(lam, dtype=dtype, device=device))
        for iters in iters_list:
            infos: list[LinearSolveInfo] = []
            times = bench.interleaved(  # both methods see the same machine load
                {m: (lambda m=m: hypergradient(m, X, y, Xv, yv, lam, iters, infos)) for m in ("implicit", "unrolled")},
                repeats=repeats, device=str(device))
            ratio = bench.ratio(times["unrolled"], times["implicit"])
            ratios.append({"d": d, "iters": iters, "unrolled_over_implicit": ratio.to_dict()})
            for method, timing in times.items():
                grad, saved = timing.last
                rows.append(
                    {
                        "d": d,
                        "lam": lam,
                        "iters": iters,
                        "method": method,
                        "time": timing.to_dict(),
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
                    f"d={d:5d} K={iters:5d} {method:8s} time={timing.median * 1e3:9.1f} ms "
                    f"saved={saved.bytes / 2**20:9.2f} MiB (beyond data {saved.bytes_beyond_data / 2**20:8.3f}) rel.err={r['rel_grad_error']:.2e}",
                    flush=True,
                )
    return rows, ratios


def backward_ift(clock, w_star, X, y, Xv, yv, lam, tol, max_iter):
    """The IFT core's backward, timed alone by ``clock``: the gradient and the solve's info."""
    lam = torch.tensor(lam, dtype=X.dtype, device=X.device, requires_grad=True)
    infos: list[LinearSolveInfo] = []
    w = implicit_argmin(ridge_objective, w_star, X, y, lam, linear_solver=CG(tol=tol, max_iter=max_iter), on_solve=infos.append)
    loss = ridge_validation_loss(w, Xv, yv)
    with clock:
        (grad,) = torch.autograd.grad(loss, lam)
    return grad, infos[0]


def backward_torchopt(clock, torchopt, w_star, X, y, Xv, yv, lam, tol, max_iter):
    """The same with torchopt's ``custom_root`` and its CG (``solve_cg``)."""

    # lam leads: torchopt 0.7.3 indexes the differentiated arguments by position, so they must come first.
    def optimality(w, lam, X, y):
        return torch.func.grad(ridge_objective)(w, X, y, lam)

    solve = torchopt.linear_solve.solve_cg(rtol=tol, maxiter=max_iter)  # torchopt's own argument names
    solver = torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)(lambda w, lam, X, y: w_star)
    lam = torch.tensor(lam, dtype=X.dtype, device=X.device, requires_grad=True)
    loss = ridge_validation_loss(solver(w_star, lam, X, y), Xv, yv)
    with clock:
        (grad,) = torch.autograd.grad(loss, lam)
    return grad


def run_torchopt(torchopt, dims, iters, repeats, lam_per_dim, device, dtype) -> list[dict]:
    """Backward time of the core vs torchopt at the same ``w*`` (``iters`` GD steps), interleaved."""
    rows = []
    tol = default_tol(dtype)
    for d in dims:
        lam = lam_per_dim * d
        X, y, Xv, yv = make_problem(d, seed=d, device=device, dtype=dtype)
        _, grad_exact = ridge_hypergradient_closed_form(X, y, Xv, yv, torch.tensor(lam, dtype=dtype, device=device))
        max_iter = CG().default_max_iter(d)
        with torch.no_grad():
            w_star = ridge_gradient_descent(X, y, torch.tensor(lam, dtype=dtype, device=device), iters)
        times = bench.interleaved(
            {"ift": lambda clock: backward_ift(clock, w_star, X, y, Xv, yv, lam, tol, max_iter),
             "torchopt": lambda clock: backward_torchopt(clock, torchopt, w_star, X, y, Xv, yv, lam, tol, max_iter)},
            repeats=repeats, device=str(device), section=True)
        (grad_ift, info), grad_to = times["ift"].last, times["torchopt"].last
        row = {
            "d": d,
            "iters": iters,
            "cg_tol": tol,
            "max_iter": max_iter,
            "ift_backward": times["ift"].to_dict(),
            "torchopt_backward": times["torchopt"].to_dict(),
            "torchopt_over_ift": bench.ratio(times["torchopt"], times["ift"]).to_dict(),
            "torchopt_over_ift_cpu": bench.ratio(times["torchopt"], times["ift"], cpu=True).to_dict(),
            "ift_cg_iterations": info.max_iterations,
            "ift_cg_residual": info.max_residual,
            "ift_rel_grad_error": float((grad_ift - grad_exact).abs() / grad_exact.abs()),
            "torchopt_rel_grad_error": float((grad_to - grad_exact).abs() / grad_exact.abs()),
        }
        rows.append(row)
        print(
            f"d={d:5d} backward: ift {times['ift'].median * 1e3:.2f} ms, torchopt {times['torchopt'].median * 1e3:.2f} ms "
            f"(ratio {bench.ratio(times['torchopt'], times['ift']).fmt()}), CG iters {info.max_iterations}",
            flush=True,
        )
    return rows


def spread(d: dict) -> bench.Spread:
    return bench.Spread(**d)


def ms(timing: dict) -> str:
    return bench.Spread(timing["min_s"], timing["median_s"], timing["max_s"], len(timing["wall_s"])).fmt(".2f", 1e3)


def torchopt_markdown(rows: list[dict], meta: dict) -> str:
    if not rows:
        return "torchopt comparison skipped: torchopt not installed (" + TORCHOPT_INSTALL + ").\n"
    cells = [[r["d"], ms(r["ift_backward"]), ms(r["torchopt_backward"]), spread(r["torchopt_over_ift"]).fmt(),
              spread(r["torchopt_over_ift_cpu"]).fmt(), r["ift_cg_iterations"], f"{r['ift_cg_residual']:.1e}",
              f"{r['ift_rel_grad_error']:.1e}", f"{r['torchopt_rel_grad_error']:.1e}"] for r in rows]
    return (
        f"## Backward only: IFT core vs torchopt {meta['torchopt']} `custom_root`\n\n"
        f"Same `w*` ({rows[0]['iters']} GD steps), same optimality condition (`torch.func.grad` of the ridge "
        f"objective for torchopt, the objective itself for `implicit_argmin`), same CG relative tolerance "
        f"({rows[0]['cg_tol']:g}) and max_iter; {meta['torchopt_repeats']} interleaved rounds (order "
        "alternating, one warm-up round) of `torch.autograd.grad` alone. Times: median [min, max]; ratios: "
        "median [min, max] of the per-round ratios.\n\n"
        + bench.table(["d", "IFT core backward (ms)", "torchopt backward (ms)", "speed ratio torchopt/core",
                       "CPU-time ratio torchopt/core", "CG iters (core)", "core CG residual", "core rel. error",
                       "torchopt rel. error"], cells)
        + "\nSpeed ratio > 1 means the core's backward is faster. CPU time is that of the calling thread, "
        "which runs the CPU backward (less disturbed than wall time when other processes share the machine).\n"
    )


def markdown(rows: list[dict], ratios: list[dict], meta: dict, env: dict, torchopt_rows: list[dict]) -> str:
    by_key = {(r["d"], r["iters"], r["method"]): r for r in rows}
    cells = []
    for pair in ratios:
        d, iters = pair["d"], pair["iters"]
        imp, unr = by_key[(d, iters, "implicit")], by_key[(d, iters, "unrolled")]
        cells.append([
            d, iters, f"{imp['time']['median_s'] * 1e3:.1f}", f"{unr['time']['median_s'] * 1e3:.1f}",
            spread(pair["unrolled_over_implicit"]).fmt(), f"{imp['saved_bytes'] / 2**20:.3f}",
            f"{unr['saved_bytes'] / 2**20:.3f}", f"{unr['saved_bytes'] / imp['saved_bytes']:.1f}",
            f"{imp['saved_bytes_beyond_data'] / 2**10:.1f} / {unr['saved_bytes_beyond_data'] / 2**10:.1f}",
            f"{imp['rel_grad_error']:.1e}", f"{unr['rel_grad_error']:.1e}", imp["cg_iterations"]])
    return (
        "# Implicit vs unrolled: ridge hypergradient\n\n"
        f"{bench.describe(env)}, {meta['dtype']}; {meta['repeats']} interleaved rounds of forward + backward "
        f"(one warm-up round); times are medians, the time ratio is median [min, max] of the per-round ratios. "
        f"Data: X (2d x d), X_val (d x d) Gaussian, lambda = {meta['lam_per_dim']} d; CG tolerance "
        f"{meta['cg_tol']:g} (relative residual).\n\n"
        + bench.table(["d", "GD iters K", "implicit time (ms)", "unrolled time (ms)", "time ratio unrolled/implicit",
                       "implicit saved (MiB)", "unrolled saved (MiB)", "memory ratio",
                       "saved beyond data, implicit / unrolled (KiB)", "implicit rel. error", "unrolled rel. error",
                       "CG iters"], cells)
        + "\nSaved bytes are unique storages packed by `torch.autograd.graph.saved_tensors_hooks` during the "
        "forward, including the data matrices (which both methods keep); the 'beyond data' column leaves "
        "them out. Time ratio > 1 means implicit is faster. Relative error is against the "
        "closed form `-(X_val^T r)^T (X^T X + lambda I)^{-1} w*`; at small K both methods inherit the "
        "unconverged inner solve, the implicit one through `w_K`, the unrolled one through truncation.\n\n"
        + torchopt_markdown(torchopt_rows, meta)
    )


def main() -> None:
    parser = bench.parser(__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--iters", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torchopt-dims", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--torchopt-repeats", type=int, default=15)
    parser.add_argument("--lam-per-dim", type=float, default=0.25, help="L2 penalty lambda = this * d")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    args = parser.parse_args()
    if args.quick:
        args.dims, args.iters, args.repeats, args.torchopt_dims, args.torchopt_repeats = [32], [10, 50], 1, [32], 1

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    run_ = bench.Run("implicit_vs_unrolled", SOURCES, args, device=args.device)
    rows, ratios = run(args.dims, args.iters, args.repeats, args.lam_per_dim, device, dtype)
    torchopt = import_torchopt()
    torchopt_rows = []
    if torchopt is not None:
        torchopt_rows = run_torchopt(
            torchopt, args.torchopt_dims, max(args.iters), args.torchopt_repeats, args.lam_per_dim, device, dtype
        )
    meta = {
        "dtype": args.dtype,
        "repeats": args.repeats,
        "torchopt_repeats": args.torchopt_repeats,
        "torchopt": getattr(torchopt, "__version__", None),
        "lam_per_dim": args.lam_per_dim,
        "cg_tol": default_tol(dtype),
    }
    text = markdown(rows, ratios, meta, run_.environment, torchopt_rows)
    run_.write({"meta": meta, "rows": rows, "ratios": ratios, "torchopt_rows": torchopt_rows}, text)
    print(text)


if __name__ == "__main__":
    main()
