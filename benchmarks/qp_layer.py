"""Speed of ift.optnet.solve_qp against qpth and cvxpylayers on random feasible QPs.

Problems as in the OptNet timing study: Q = M M^T / n + 0.1 I, G random, h = G z0 + s0, b = A z0.
Forward and forward+backward wall time (median of `--repeats`), measured side by side in one run,
and the max |z - z_ours| of each reference. Missing references are reported as "not installed".

    python benchmarks/qp_layer.py [--sizes 10 50 100] [--batch 128] [--repeats 3]
Writes benchmarks/results/qp_layer.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ift.optnet import solve_qp

RESULTS = Path(__file__).parent / "results"


def random_qp(batch, n, m, p, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    Q = M @ M.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    q = torch.randn(batch, n, generator=g, dtype=torch.float64)
    G = torch.randn(batch, m, n, generator=g, dtype=torch.float64)
    z0 = torch.randn(batch, n, generator=g, dtype=torch.float64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(batch, m, generator=g, dtype=torch.float64)
    A = torch.randn(batch, p, n, generator=g, dtype=torch.float64)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return [t.to(dtype) for t in (Q, q, G, h, A, b)]


def ours(Q, q, G, h, A, b):
    return solve_qp(Q, q, G, h, A if A.shape[1] else None, b if b.shape[1] else None, strict=False)


def make_qpth():
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return None

    def run(Q, q, G, h, A, b):
        e = torch.empty(0, dtype=Q.dtype)
        return QPFunction(verbose=-1)(Q, q, G, h, A if A.shape[1] else e, b if b.shape[1] else e)

    return run


def make_cvxpylayers(n, m, p):
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError:
        return None
    # Q enters through its square root so the problem is DPP: 1/2 |L^T z|^2 with Q = L L^T.
    Lp, qp_, Gp, hp = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    z = cp.Variable(n)
    cons = [Gp @ z <= hp]
    params = [Lp, qp_, Gp, hp]
    if p:
        Ap, bp = cp.Parameter((p, n)), cp.Parameter(p)
        cons.append(Ap @ z == bp)
        params += [Ap, bp]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp.T @ z) + qp_ @ z), cons)
    layer = CvxpyLayer(prob, parameters=params, variables=[z])

    def run(Q, q, G, h, A, b):
        L = torch.linalg.cholesky(Q)
        args = [L, q, G, h] + ([A, b] if p else [])
        return layer(*args, solver_args={"eps": 1e-8})[0]

    return run


def timed(fn, args, backward, repeats):
    times = []
    out = None
    for _ in range(repeats):
        inputs = [a.detach().clone().requires_grad_(backward) for a in args]
        start = time.perf_counter()
        out = fn(*inputs)
        if backward:
            out.sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out.detach()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cvxpylayers-max-n", type=int, default=50, help="skip cvxpylayers above this n (slow)")
    args = parser.parse_args()
    torch.manual_seed(0)

    rows = []
    for n in args.sizes:
        for p in (0, n // 2):
            for dtype in (torch.float64, torch.float32):
                qp = random_qp(args.batch, n, n, p, dtype)
                row = {"n": n, "m": n, "p": p, "batch": args.batch, "dtype": str(dtype).split(".")[-1]}
                row["ours_fwd_s"], z_ref = timed(ours, qp, False, args.repeats)
                row["ours_fwdbwd_s"], _ = timed(ours, qp, True, args.repeats)
                refs = {"qpth": make_qpth()}
                refs["cvxpylayers"] = make_cvxpylayers(n, n, p) if n <= args.cvxpylayers_max_n else "skipped"
                for name, fn in refs.items():
                    if fn is None or fn == "skipped":
                        row[f"{name}_fwd_s"] = "not installed" if fn is None else "skipped (n too large)"
                        continue
                    cast = qp if name == "qpth" else [t.double() for t in qp]  # cvxpylayers is float64
                    try:
                        row[f"{name}_fwd_s"], z = timed(fn, cast, False, args.repeats)
                        row[f"{name}_fwdbwd_s"], _ = timed(fn, cast, True, args.repeats)
                        row[f"{name}_max_abs_diff"] = (z.double() - z_ref.double()).abs().max().item()
                    except Exception as exc:  # a reference failing is a result, not a crash
                        row[f"{name}_fwd_s"] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                print(row, flush=True)
                rows.append(row)

    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qp_layer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    fmt = lambda v: f"{v * 1e3:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        f"Batch {args.batch}, m = n inequalities, p equalities; median of {args.repeats} runs, milliseconds; "
        f"torch {meta['torch']}, {meta['threads']} CPU threads.",
        "",
        "| n | p | dtype | ours fwd | ours fwd+bwd | qpth fwd | qpth fwd+bwd | qpth max diff | cvxpylayers fwd | cvxpylayers fwd+bwd | cvxpylayers max diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["n"], r["p"], r["dtype"], fmt(r["ours_fwd_s"]), fmt(r["ours_fwdbwd_s"])]
        for name in ("qpth", "cvxpylayers"):
            cells += [fmt(r[f"{name}_fwd_s"]), fmt(r.get(f"{name}_fwdbwd_s", "")),
                      f"{r[f'{name}_max_abs_diff']:.1e}" if f"{name}_max_abs_diff" in r else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (RESULTS / "qp_layer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
