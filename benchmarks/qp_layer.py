"""ift.optnet.solve_qp against qpth 0.0.18 and cvxpylayers: accuracy and speed.

Problems as in the OptNet timing study: Q = M M^T / n + 0.1 I, G random (m = n rows),
h = G z0 + s0, A random (p rows), b = A z0; batch 128; loss sum(W * z) with a fixed random W.

Accuracy (float64 and float32 inputs): max abs error of z and of the gradients of the loss
w.r.t. all six arguments against an exact reference: numpy solves the equality-constrained KKT
system of the active set proposed by our solution (lam > s) and certifies it (kept multipliers
> 1e-6, dropped slacks > 1e-6); only certified, i.e. nondegenerate, problems are compared (their
count is reported). Also the max differences ours - qpth. cvxpylayers gets Q through its Cholesky
factor (DPP form), so its Q gradient goes through torch's Cholesky backward.

Speed: forward+backward wall time, 1 torch thread (and 1 BLAS thread for the LAPACK calls made
through scipy), the implementations interleaved in one run, median of `--repeats`; qpth/ours
ratios. The script restarts itself with fixed glibc allocator thresholds (ALLOCATOR_ENV): with
the defaults, freed large blocks go back to the OS and are faulted in again on the next call,
and how often depends on the process's history (benchmarks/qp_allocator.py measures the effect:
qpth is hit harder than ours). Both implementations run under the same settings. Ours runs with
its default precision policy ("mixed": float32 interior point, float64 polish and backward); the
accuracy part also reports float32 inputs solved entirely in float32.

    python benchmarks/qp_layer.py                                   # full run (about 15 min, idle machine)
    python benchmarks/qp_layer.py --part accuracy                   # accuracy: any machine
    python benchmarks/qp_layer.py --part speed                      # timings: an otherwise idle machine
    python benchmarks/qp_layer.py --sizes 10 50 --repeats 3         # quick look
Writes benchmarks/results/qp_layer.json and .md. Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Keep freed memory in the heap (mmap only above 32 MiB, never trim): set before anything
# allocates, i.e. by re-executing this script before torch is imported.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from ift.optnet import QPStatus, solve_qp_with_info  # noqa: E402
from ift.optnet.kkt import cholesky_unchecked  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NAMES = ("Q", "q", "G", "h", "A", "b")


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


# --- the three implementations: (Q, q, G, h, A, b) -> z, differentiable ---------------------


class Ours:
    name = "ours"

    def __init__(self, precision="mixed"):
        self.last, self.precision = None, precision

    def __call__(self, Q, q, G, h, A, b):
        p = A.shape[1]
        self.last = solve_qp_with_info(Q, q, G, h, A if p else None, b if p else None, precision=self.precision)
        return self.last.z


def make_qpth():
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return None

    def qpth(Q, q, G, h, A, b):
        e = torch.empty(0, dtype=Q.dtype, device=Q.device)
        return QPFunction(verbose=-1)(Q, q, G, h, A if A.shape[1] else e, b if b.shape[1] else e)

    qpth.name = "qpth"
    return qpth


# diffcp's default derivative is an LSQR solve (gradient errors of order 1 at n >= 50 here); "dense"
# factorises the derivative system exactly. One job each way: the comparison is single-threaded.
CVX_ARGS = {"eps": 1e-10, "mode": "dense", "n_jobs_forward": 1, "n_jobs_backward": 1}


def make_cvxpylayers(n, m, p):
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError:
        return None
    # Q enters through its Cholesky factor so the problem is DPP: 1/2 |L^T z|^2 with Q = L L^T.
    Lp, qp_, Gp, hp = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    z = cp.Variable(n)
    cons = [Gp @ z <= hp]
    params = [Lp, qp_, Gp, hp]
    if p:
        Ap, bp = cp.Parameter((p, n)), cp.Parameter(p)
        cons.append(Ap @ z == bp)
        params += [Ap, bp]
    layer = CvxpyLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp.T @ z) + qp_ @ z), cons),
                       parameters=params, variables=[z])

    def cvxpylayers(Q, q, G, h, A, b):
        args = [torch.linalg.cholesky(Q.double()), q.double(), G.double(), h.double()]
        args += [A.double(), b.double()] if p else []
        return layer(*args, solver_args=CVX_ARGS)[0].to(Q.dtype)

    cvxpylayers.name = "cvxpylayers"
    return cvxpylayers


def forward_backward(fn, qp, W):
    """z and the gradients of sum(W * z) w.r.t. the six arguments (None where there is none)."""
    args = [t.detach().clone().requires_grad_() for t in qp]
    z = fn(*args)
    (z * W.to(z.device, z.dtype)).sum().backward()
    return z.detach().double().cpu(), [None if a.grad is None else a.grad.double().cpu() for a in args]


# --- exact reference ---------------------------------------------------------------------------


def exact_reference(Q, q, G, h, A, b, active, W):
    """Solution, gradients and nondegeneracy margin of one problem with the given active set."""
    n, m, p = q.shape[0], h.shape[0], b.shape[0]
    C = np.vstack([A, G[active]])
    k = C.shape[0]
    K = np.block([[Q, C.T], [C, np.zeros((k, k))]])
    sol = np.linalg.solve(K, np.concatenate([-q, b, h[active]]))
    z, nu, lam_act = sol[:n], sol[n : n + p], sol[n + p :]
    lam = np.zeros(m)
    lam[active] = lam_act
    margin = min(lam_act.min(initial=np.inf), (h - G @ z)[~active].min(initial=np.inf))
    adj = np.linalg.solve(K, np.concatenate([W, np.zeros(k)]))
    u, v_eq, v = adj[:n], adj[n : n + p], np.zeros(m)
    v[active] = adj[n + p :]
    grads = [-0.5 * (np.outer(u, z) + np.outer(z, u)), -u, -(np.outer(lam, u) + np.outer(v, z)), v,
             -(np.outer(nu, u) + np.outer(v_eq, z)), v_eq]
    return z, grads, margin


def reference_batch(qp, W, active):
    data = [t.double().numpy() for t in qp]
    out = [exact_reference(*(d[i] for d in data), active[i], W[i].numpy()) for i in range(W.shape[0])]
    z = torch.tensor(np.stack([o[0] for o in out]))
    grads = [torch.tensor(np.stack([o[1][j] for o in out])) for j in range(6)]
    certified = torch.tensor([o[2] > 1e-6 for o in out])
    return z, grads, certified


def max_errors(z, grads, z_ref, grads_ref, rows):
    """Max abs error of z and of all available gradients over the selected problems."""
    g_err = max((float((g - r)[rows].abs().max()) for g, r in zip(grads, grads_ref)
                 if g is not None and r[rows].numel()), default=float("nan"))
    return float((z - z_ref)[rows].abs().max()), g_err


def accuracy_row(n, p, dtype, batch, cvx_max_n, cvx_batch, device="cpu"):
    qp_cpu = random_qp(batch, n, n, p, dtype)
    qp = [t.to(device) for t in qp_cpu]
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = Ours()
    z, grads = forward_backward(ours, qp, W)
    sol = ours.last
    z_ref, grads_ref, certified = reference_batch(qp_cpu, W, (sol.lam > sol.slack).cpu().numpy())
    rows = certified
    scale = max(float(r[rows].abs().max()) for r in grads_ref if r[rows].numel())
    row = {"n": n, "p": p, "dtype": str(dtype).split(".")[-1], "batch": batch, "device": str(device),
           "certified": int(certified.sum()), "grad_scale": scale,
           "ours_not_converged": int((sol.status != QPStatus.CONVERGED).sum()),
           "ours_iters_mean": float(sol.iterations.float().mean()), "ours_iters_max": int(sol.iterations.max()),
           "ours_statuses": {QPStatus(s).name: int((sol.status == s).sum()) for s in sol.status.unique().tolist()}}
    row["ours_z_err"], row["ours_grad_err"] = max_errors(z, grads, z_ref, grads_ref, rows)
    if dtype == torch.float32:  # the non-default policy: everything in float32
        native = Ours(precision="input")
        zn, gn = forward_backward(native, qp, W)
        row["native32_z_err"], row["native32_grad_err"] = max_errors(zn, gn, z_ref, grads_ref, rows)
        row["native32_not_converged"] = int((native.last.status != QPStatus.CONVERGED).sum())
    qpth = make_qpth()
    if qpth is not None:
        zq, gq = forward_backward(qpth, qp, W)
        row["qpth_z_err"], row["qpth_grad_err"] = max_errors(zq, gq, z_ref, grads_ref, rows)
        row["ours_minus_qpth_z"], row["ours_minus_qpth_grad"] = max_errors(z, grads, zq, gq, torch.ones_like(rows))
    cvx = make_cvxpylayers(n, n, p) if n <= cvx_max_n else None
    if cvx is not None:  # on the first cvx_batch problems: it solves them one by one (on the CPU)
        sub = [t[:cvx_batch] for t in qp_cpu]
        zc, gc = forward_backward(cvx, sub, W[:cvx_batch])
        row["cvxpylayers_z_err"], row["cvxpylayers_grad_err"] = max_errors(
            zc, gc, z_ref[:cvx_batch], [r[:cvx_batch] for r in grads_ref], rows[:cvx_batch])
    return row


# --- speed -------------------------------------------------------------------------------------


def speed_row(n, p, dtype, batch, repeats, cvx_max_n, device="cpu"):
    qp = [t.to(device) for t in random_qp(batch, n, n, p, dtype)]
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cvx = make_cvxpylayers(n, n, p) if n <= cvx_max_n and str(device) == "cpu" else None
    impls = [Ours()] + [f for f in (make_qpth(), cvx) if f]
    times = {f.name: [] for f in impls}
    for f in impls:  # warm up (first-call allocations, cvxpylayers' canonicalisation)
        forward_backward(f, qp, W)
    for _ in range(repeats):  # interleaved: a slow spell of the machine hits every implementation
        for f in impls:
            start = time.perf_counter()
            forward_backward(f, qp, W)  # ends with a copy to the CPU: the device has finished
            times[f.name].append(time.perf_counter() - start)
    row = {"n": n, "p": p, "dtype": str(dtype).split(".")[-1], "batch": batch, "repeats": repeats,
           "device": str(device)}
    for name, ts in times.items():
        row[f"{name}_fwdbwd_s"] = statistics.median(ts)
        row[f"{name}_all_s"] = ts
    for name in times:
        if name != "ours":
            row[f"{name}_over_ours"] = row[f"{name}_fwdbwd_s"] / row["ours_fwdbwd_s"]
    return row


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def markdown(meta, acc, speed):
    lines = [
        f"torch {meta['torch']}, qpth {meta['qpth']}, cvxpylayers {meta['cvxpylayers']}, "
        f"{meta['threads']} thread(s) (torch, and BLAS under numpy/scipy); batch {meta['batch']}, m = n inequalities, p equalities; "
        + " ".join(f"{k}={v}" for k, v in (meta.get("allocator_env") or {}).items()) + ".",
        "",
        "### Accuracy: max abs error against the exact active-set reference (certified problems)",
        "",
        "| n | p | dtype | certified | ours: not converged, iterations mean/max | grad scale | z: ours | z: qpth "
        "| z: cvxpylayers | grad: ours | grad: qpth | grad: cvxpylayers | ours - qpth: z | ours - qpth: grad |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in acc:
        lines.append("| " + " | ".join([
            str(r["n"]), str(r["p"]), r["dtype"], f"{r['certified']}/{r['batch']}",
            f"{r['ours_not_converged']}, {r['ours_iters_mean']:.1f}/{r['ours_iters_max']}",
            fmt(r["grad_scale"], ".1f"),
            *(fmt(r.get(f"{k}_z_err"), ".1e") for k in ("ours", "qpth", "cvxpylayers")),
            *(fmt(r.get(f"{k}_grad_err"), ".1e") for k in ("ours", "qpth", "cvxpylayers")),
            fmt(r.get("ours_minus_qpth_z"), ".1e"), fmt(r.get("ours_minus_qpth_grad"), ".1e")]) + " |")
    native = [r for r in acc if "native32_z_err" in r]
    if native:
        lines += ["", 'float32 inputs solved entirely in float32 (`precision="input"`, not the default):', "",
                  "| n | p | not converged | z error | grad error |", "|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['p']} | {r['native32_not_converged']} | {fmt(r['native32_z_err'], '.1e')} | "
                  f"{fmt(r['native32_grad_err'], '.1e')} |" for r in native]
    chol = meta.get("cholesky_ms")
    if chol:
        lines += ["", "Cholesky of 128 matrices 100 x 100 as the solver factorises them, median ms: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in chol.items())]
    lines += ["", f"### Speed: forward + backward, median of {meta['repeats']} interleaved runs, milliseconds", "",
              "| n | p | dtype | ours | qpth | cvxpylayers | qpth / ours | cvxpylayers / ours |",
              "|---|---|---|---|---|---|---|---|"]
    for r in speed:
        ms = lambda k: fmt(r.get(k) * 1e3, ".0f") if isinstance(r.get(k), float) else "-"  # noqa: E731
        lines.append("| " + " | ".join([
            str(r["n"]), str(r["p"]), r["dtype"], ms("ours_fwdbwd_s"), ms("qpth_fwdbwd_s"), ms("cvxpylayers_fwdbwd_s"),
            fmt(r.get("qpth_over_ours"), ".2f"), fmt(r.get("cvxpylayers_over_ours"), ".2f")]) + " |")
    return "\n".join(lines) + "\n"


def cholesky_ms(repeats=21, device="cpu"):
    """The main per-iteration cost in both dtypes (float32 is what the mixed policy iterates in)."""
    out = {}
    for dtype in (torch.float64, torch.float32):
        M = torch.randn(128, 100, 100, dtype=dtype, generator=torch.Generator().manual_seed(0))
        M = (M @ M.mT + 100 * torch.eye(100, dtype=dtype)).to(device)
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            cholesky_unchecked(M)
            if M.is_cuda:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - start)
        out[str(dtype).split(".")[-1]] = statistics.median(ts) * 1e3
    return out


def version(module):
    try:
        from importlib.metadata import version as v

        return v(module)
    except Exception:
        return "not installed"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--speed-sizes", type=int, nargs="+", help="sizes to time (default: --sizes)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cvxpylayers-max-n", type=int, default=100, help="accuracy of cvxpylayers up to this n")
    parser.add_argument("--cvxpylayers-batch", type=int, default=16, help="problems cvxpylayers solves for accuracy")
    parser.add_argument("--cvxpylayers-speed-max-n", type=int, default=50,
                        help="time cvxpylayers up to this n (and up to --cvxpylayers-max-n)")
    parser.add_argument("--out", default="qp_layer")
    parser.add_argument("--device", default="cpu", help="where our solver and qpth run (cvxpylayers and the "
                        "exact reference stay on the CPU)")
    parser.add_argument("--part", choices=["all", "accuracy", "speed"], default="all",
                        help="run one part and keep the other part's rows from an earlier run's JSON "
                             "(accuracy needs no quiet machine, speed needs an otherwise idle machine)")
    args = parser.parse_args()
    args.speed_sizes = args.speed_sizes or args.sizes
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    cvx_speed_max_n = min(args.cvxpylayers_speed_max_n, args.cvxpylayers_max_n)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # the BLAS/LAPACK under numpy and scipy too
    meta = {"torch": torch.__version__, "qpth": version("qpth"), "cvxpylayers": version("cvxpylayers"),
            "threads": torch.get_num_threads(), "batch": args.batch, "repeats": args.repeats,
            "cpu": platform.processor() or platform.machine(), "device": args.device,
            "allocator_env": {k: os.environ.get(k) for k in ALLOCATOR_ENV}}
    if args.device != "cpu":
        meta["device"] = torch.cuda.get_device_name(args.device)
    acc, speed = [], []
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / f"{args.out}.json"
    if args.part != "all" and previous.is_file():
        old = json.loads(previous.read_text())
        acc, speed = (old.get("accuracy", []), []) if args.part == "speed" else ([], old.get("speed", []))
        meta["cholesky_ms"] = old["meta"].get("cholesky_ms")
        meta["repeats"] = old["meta"].get("repeats", args.repeats) if args.part == "accuracy" else args.repeats
    if args.part != "accuracy":
        meta["cholesky_ms"] = cholesky_ms(device=args.device)

    def save():
        payload = {"meta": meta, "accuracy": acc, "speed": speed, "rows": speed}  # rows: gpu_check reads them
        (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=2))
        (RESULTS / f"{args.out}.md").write_text(markdown(meta, acc, speed))

    for n in args.sizes if args.part != "speed" else []:
        for p in sorted({0, n // 2}):
            for dtype in (torch.float64, torch.float32):
                acc.append(accuracy_row(n, p, dtype, args.batch, args.cvxpylayers_max_n, args.cvxpylayers_batch,
                                        args.device))
                print({k: v for k, v in acc[-1].items()}, flush=True)
                save()
    for n in args.speed_sizes if args.part != "accuracy" else []:
        for p in sorted({0, n // 2}):
            for dtype in (torch.float64, torch.float32):
                speed.append(speed_row(n, p, dtype, args.batch, args.repeats, cvx_speed_max_n, args.device))
                print({k: v for k, v in speed[-1].items() if not k.endswith("_all_s")}, flush=True)
                save()
    print(markdown(meta, acc, speed))


if __name__ == "__main__":
    main()
