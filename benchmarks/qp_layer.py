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
    python benchmarks/qp_layer.py --part speed --speed-sizes 100 --repeats 7   # the n = 100 goals (~10 min idle)
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
from ift.optnet.scaling import Scaling  # noqa: E402

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


def hard_qp(batch, n, m, p, dtype, seed=0):
    """The benchmark's problems made hard: cond(Q) = 1e6 (random eigenvectors), the last tenth of
    the inequality rows duplicates of earlier ones, every row of G, h and of A, b scaled by
    10^U(-3, 3) and every variable by 10^U(-1, 1) (z = C z'). The same optimum up to scaling."""
    Q, q, G, h, A, b = random_qp(batch, n, m, p, torch.float64, seed)
    g = torch.Generator().manual_seed(seed + 1)
    U, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    Q = U @ torch.diag_embed(torch.logspace(0, -6, n, dtype=torch.float64)) @ U.mT
    dup = m // 10
    G = torch.cat([G[:, : m - dup], G[:, :dup]], 1)
    h = torch.cat([h[:, : m - dup], h[:, :dup]], 1)
    scale = lambda *shape: 10.0 ** (6 * torch.rand(*shape, generator=g, dtype=torch.float64) - 3)  # noqa: E731
    rg, ra, c = scale(batch, m), scale(batch, p), 10.0 ** (2 * torch.rand(batch, n, generator=g, dtype=torch.float64) - 1)
    cc = c.unsqueeze(-1) * c.unsqueeze(-2)
    out = (Q * cc, q * c, G * rg.unsqueeze(-1) * c.unsqueeze(-2), h * rg, A * ra.unsqueeze(-1) * c.unsqueeze(-2), b * ra)
    return [t.to(dtype) for t in out]


GENERATORS = {"random": random_qp, "hard": hard_qp}


# --- the implementations: (Q, q, G, h, A, b) -> z, differentiable ---------------------


class Ours:
    name = "ours"

    def __init__(self, precision="mixed"):
        self.last, self.precision = None, precision

    def __call__(self, Q, q, G, h, A, b):
        p = A.shape[1]
        self.last = solve_qp_with_info(Q, q, G, h, A if p else None, b if p else None, precision=self.precision)
        return self.last.z


def make_qpth(eps=1e-12, check_Q_spd=True):
    """qpth at its defaults (eps 1e-12, an SPD check of Q), or at a tolerance matched to ours."""
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return None

    def qpth(Q, q, G, h, A, b):
        e = torch.empty(0, dtype=Q.dtype, device=Q.device)
        return QPFunction(verbose=-1, eps=eps, check_Q_spd=check_Q_spd)(
            Q, q, G, h, A if A.shape[1] else e, b if b.shape[1] else e)

    qpth.name = "qpth" if (eps, check_Q_spd) == (1e-12, True) else f"qpth_eps{eps:.0e}" + ("" if check_Q_spd else "_nospd")
    return qpth


def make_qplayer():
    """ProxSuite's QPLayer (proxsuite.torch.qplayer, CPU only) at its default eps 1e-9."""
    try:
        from proxsuite.torch.qplayer import QPFunction
    except ImportError:
        return None

    def qplayer(Q, q, G, h, A, b):
        # l <= G z <= u form: a one-sided row gets l = -1e20 (QPLayer's convention for -inf)
        layer = QPFunction(eps=1e-9)
        z = layer(Q.double().cpu(), q.double().cpu(), A.double().cpu(), b.double().cpu(), G.double().cpu(),
                  torch.full_like(h, -1e20).double().cpu(), h.double().cpu())
        return (z[0] if isinstance(z, tuple) else z).to(Q.dtype)

    qplayer.name = "qplayer"
    return qplayer


def references():
    """The other implementations that are installed, with a line for each that is not."""
    found = []
    for make, what in ((make_qpth, "qpth (pip install -e '.[bench]')"), (make_qplayer, "QPLayer (pip install proxsuite==0.8.0)")):
        impl = make()
        if impl is None:
            print(f"skipping {what}: not installed", flush=True)
        else:
            found.append(impl)
    if found and found[0].name == "qpth":
        found.insert(1, make_qpth(eps=1e-9, check_Q_spd=False))
        found.insert(1, make_qpth(eps=1e-9))
    return found


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
    # lstsq: duplicated active rows make K singular; its minimum-norm solution splits their
    # multipliers equally (z and the gradients w.r.t. Q, q, A, b are unique anyway)
    solve = lambda rhs: np.linalg.lstsq(K, rhs, rcond=None)[0]  # noqa: E731
    sol = solve(np.concatenate([-q, b, h[active]]))
    z, nu, lam_act = sol[:n], sol[n : n + p], sol[n + p :]
    lam = np.zeros(m)
    lam[active] = lam_act
    # scale-free margin: multipliers and slacks of the rows normalised to unit inf-norm
    norm = np.abs(G).max(1)
    margin = min((lam * norm)[active].min(initial=np.inf), ((h - G @ z) / norm)[~active].min(initial=np.inf))
    adj = solve(np.concatenate([W, np.zeros(k)]))
    u, v_eq, v = adj[:n], adj[n : n + p], np.zeros(m)
    v[active] = adj[n + p :]
    grads = [-0.5 * (np.outer(u, z) + np.outer(z, u)), -u, -(np.outer(lam, u) + np.outer(v, z)), v,
             -(np.outer(nu, u) + np.outer(v_eq, z)), v_eq]
    return z, grads, margin


def reference_batch(qp, W, active):
    """The exact reference of each problem, computed in equilibrated coordinates (the solver's
    power-of-two scaling, `ift.optnet.scaling`: exact in floating point, so the same problem) and
    mapped back: the badly scaled problems of the hard generator are then as well conditioned
    for numpy as for the solver."""
    qp = [t.double().cpu() for t in qp]
    sc = Scaling(qp[0], qp[2], qp[4])
    d, eG, eA = (torch.broadcast_to(t, shape) for t, shape in
                 ((sc.d, qp[1].shape), (sc.eG, qp[3].shape), (sc.eA, qp[5].shape)))
    data = [t.numpy() for t in sc.problem(*qp)]
    Ws = (W * d).numpy()  # sum(W * z) = sum((d W) * z~)
    out = [exact_reference(*(x[i] for x in data), active[i], Ws[i]) for i in range(W.shape[0])]
    z = torch.tensor(np.stack([o[0] for o in out])) * d
    grads = [torch.tensor(np.stack([o[1][j] for o in out])) for j in range(6)]
    outer = lambda a, c: a.unsqueeze(-1) * c.unsqueeze(-2)  # noqa: E731
    grads = [g * f for g, f in zip(grads, (outer(d, d), d, outer(eG, d), eG, outer(eA, d), eA))]
    certified = torch.tensor([o[2] > 1e-6 for o in out])
    return z, grads, certified


def max_errors(z, grads, z_ref, grads_ref, rows, relative=False):
    """Max abs error of z and of all available gradients over the selected problems; `relative`:
    each divided by the reference's max abs entry (per argument), for the badly scaled problems."""
    if not bool(rows.any()):
        return float("nan"), float("nan")
    size = (lambda r: float(r[rows].abs().max()) or 1.0) if relative else (lambda r: 1.0)  # noqa: E731
    g_err = max((float((g - r)[rows].abs().max()) / size(r) for g, r in zip(grads, grads_ref)
                 if g is not None and r[rows].numel()), default=float("nan"))
    return float((z - z_ref)[rows].abs().max()) / size(z_ref), g_err


def duplicate_fold(G):
    """Gradients (list of six) with each duplicated row's G and h gradients folded into its
    original's: G_j = r G_i, so moving both by (d, r d) has the unique derivative g_i + r g_j,
    while the split between g_i and g_j depends on how the solver split the multipliers."""
    G = G.double().cpu()
    m = G.shape[1]
    dup = m // 10
    r = (G[:, m - dup:] * G[:, :dup]).sum(-1) / G[:, :dup].square().sum(-1)

    def fold(grads):
        out = list(grads)
        for j, rank in ((2, 2), (3, 1)):
            g = out[j]
            if g is None:
                continue
            rr = r.view(*r.shape, *[1] * (rank - 1))
            out[j] = torch.cat([g[:, :dup] + rr * g[:, m - dup:], g[:, dup: m - dup]], 1)
        return out
    return fold


def accuracy_row(n, p, dtype, batch, cvx_max_n, cvx_batch, device="cpu", generator="random"):
    qp_cpu = GENERATORS[generator](batch, n, n, p, dtype)
    rel = generator == "hard"
    qp = [t.to(device) for t in qp_cpu]
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = Ours()
    z, grads = forward_backward(ours, qp, W)
    sol = ours.last
    z_ref, grads_ref, certified = reference_batch(qp_cpu, W, (sol.lam > 0).cpu().numpy())
    rows = certified
    if rel:  # duplicated rows: only the derivative along both copies at once is unique
        fold = duplicate_fold(qp_cpu[2])
        grads, grads_ref = fold(grads), fold(grads_ref)
    scale = max(float(r[rows].abs().max()) for r in grads_ref if r[rows].numel())
    row = {"n": n, "p": p, "dtype": str(dtype).split(".")[-1], "batch": batch, "device": str(device),
           "generator": generator, "errors": "relative" if rel else "absolute",
           "certified": int(certified.sum()), "grad_scale": scale,
           "ours_not_converged": int((~sol.converged).sum()),
           "ours_iters_mean": float(sol.iterations.float().mean()), "ours_iters_max": int(sol.iterations.max()),
           "ours_statuses": {QPStatus(s).name: int((sol.status == s).sum()) for s in sol.status.unique().tolist()}}
    row["ours_z_err"], row["ours_grad_err"] = max_errors(z, grads, z_ref, grads_ref, rows, rel)
    if dtype == torch.float32:  # the non-default policy: everything in float32
        native = Ours(precision="input")
        zn, gn = forward_backward(native, qp, W)
        row["native32_z_err"], row["native32_grad_err"] = max_errors(zn, gn, z_ref, grads_ref, rows, rel)
        row["native32_not_converged"] = int((native.last.status != QPStatus.CONVERGED).sum())
    for ref in references():
        if ref.name == "qplayer" and str(device) != "cpu":
            continue
        try:
            zq, gq = forward_backward(ref, qp, W)
            gq = fold(gq) if rel else gq
        except Exception as err:  # e.g. qpth's SPD check or a failed factorisation: one line, the run goes on
            row[f"{ref.name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            continue
        row[f"{ref.name}_z_err"], row[f"{ref.name}_grad_err"] = max_errors(zq, gq, z_ref, grads_ref, rows, rel)
        if ref.name == "qpth":
            row["ours_minus_qpth_z"], row["ours_minus_qpth_grad"] = max_errors(z, grads, zq, gq, torch.ones_like(rows))
    cvx = make_cvxpylayers(n, n, p) if n <= cvx_max_n else None
    if cvx is not None:  # on the first cvx_batch problems: it solves them one by one (on the CPU)
        sub = [t[:cvx_batch] for t in qp_cpu]
        zc, gc = forward_backward(cvx, sub, W[:cvx_batch])
        row["cvxpylayers_z_err"], row["cvxpylayers_grad_err"] = max_errors(
            zc, gc, z_ref[:cvx_batch], [r[:cvx_batch] for r in grads_ref], rows[:cvx_batch], rel)
    return row


# --- speed -------------------------------------------------------------------------------------


def speed_row(n, p, dtype, batch, repeats, cvx_max_n, device="cpu", generator="random"):
    qp = [t.to(device) for t in GENERATORS[generator](batch, n, n, p, dtype)]
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cvx = make_cvxpylayers(n, n, p) if n <= cvx_max_n and str(device) == "cpu" else None
    refs = [f for f in references() if f.name != "qplayer" or str(device) == "cpu"]
    impls = [Ours()] + [f for f in (*refs, cvx) if f]
    times = {f.name: [] for f in impls}
    for f in impls:  # warm up (first-call allocations, cvxpylayers' canonicalisation)
        forward_backward(f, qp, W)
    for _ in range(repeats):  # interleaved: a slow spell of the machine hits every implementation
        for f in impls:
            start = time.perf_counter()
            forward_backward(f, qp, W)  # ends with a copy to the CPU: the device has finished
            times[f.name].append(time.perf_counter() - start)
    row = {"n": n, "p": p, "dtype": str(dtype).split(".")[-1], "batch": batch, "repeats": repeats,
           "device": str(device), "generator": generator}
    for name, ts in times.items():
        row[f"{name}_fwdbwd_s"] = statistics.median(ts)
        row[f"{name}_all_s"] = ts
    for name in times:
        if name != "ours":
            row[f"{name}_over_ours"] = row[f"{name}_fwdbwd_s"] / row["ours_fwdbwd_s"]
    return row


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


REFERENCES = ("qpth", "qpth_eps1e-09", "qpth_eps1e-09_nospd", "qplayer", "cvxpylayers")


def markdown(meta, acc, speed):
    present = lambda rows, suffix: [k for k in ("ours", *REFERENCES) if any(f"{k}{suffix}" in r for r in rows)]  # noqa: E731
    names = present(acc, "_z_err")
    lines = [
        f"torch {meta['torch']}, qpth {meta['qpth']}, proxsuite {meta.get('proxsuite', '-')}, cvxpylayers "
        f"{meta['cvxpylayers']}, {meta['threads']} thread(s) (torch, and BLAS under numpy/scipy); batch "
        f"{meta['batch']}, m = n inequalities, p equalities; "
        + " ".join(f"{k}={v}" for k, v in (meta.get("allocator_env") or {}).items()) + ".",
        "qpth at its defaults (eps 1e-12, SPD check of Q), at eps 1e-9 (our and QPLayer's tolerance), and at eps 1e-9 "
        "without the SPD check. Iteration counts: ours only (qpth and QPLayer do not return theirs).",
        "",
        "### Accuracy: max error of z / of the gradients against the exact active-set reference (certified problems)",
        "",
        "random: absolute errors; hard (cond(Q) 1e6, duplicated rows, rows scaled over 1e-3..1e3, columns over "
        "1e-1..1e1): errors relative to each argument's largest reference entry, the G and h gradients of each "
        "duplicated pair folded into one (only the derivative along both copies is unique). DEGENERATE: a "
        "certified solution with a weakly active row (here: the copy the solver left at lam = 0); those "
        "are not certified and not compared.",
        "",
        "| n | p | dtype | generator | certified | ours: not converged, iterations mean/max | grad scale | "
        + " | ".join(names) + " |",
        "|" + "---|" * (7 + len(names)),
    ]
    for r in acc:
        cells = [r.get(f"{k}_error", "failed") if f"{k}_error" in r else
                 f"{fmt(r.get(f'{k}_z_err'), '.1e')} / {fmt(r.get(f'{k}_grad_err'), '.1e')}" for k in names]
        lines.append("| " + " | ".join([
            str(r["n"]), str(r["p"]), r["dtype"], r.get("generator", "random"), f"{r['certified']}/{r['batch']}",
            f"{r['ours_not_converged']}, {r['ours_iters_mean']:.1f}/{r['ours_iters_max']}"
            + "".join(f", {v} {k}" for k, v in r.get("ours_statuses", {}).items() if k != "CONVERGED"),
            fmt(r["grad_scale"], ".1f"), *cells]) + " |")
    native = [r for r in acc if "native32_z_err" in r]
    if native:
        lines += ["", 'float32 inputs solved entirely in float32 (`precision="input"`, not the default):', "",
                  "| n | p | not converged | z error | grad error |", "|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['p']} | {r['native32_not_converged']} | {fmt(r['native32_z_err'], '.1e')} | "
                  f"{fmt(r['native32_grad_err'], '.1e')} |" for r in native]
    warm = meta.get("warm_start")
    if warm:
        lines += ["", "### Warm start: interior point iterations per example in a full-batch OptNetLayer training run", "",
                  f"{warm['setup']}", "", "| warm start | mean iterations per solve | solves with 0 iterations |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['mean_iterations']:.2f} | {v['zero_iteration_frac']:.3f} |" for k, v in warm["runs"].items()]
    chol = meta.get("cholesky_ms")
    if chol:
        lines += ["", "Cholesky of 128 matrices 100 x 100 as the solver factorises them, median ms: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in chol.items())]
    timed = present(speed, "_fwdbwd_s")
    lines += ["", f"### Speed: forward + backward, median of {meta['repeats']} interleaved runs, milliseconds", "",
              "| n | p | dtype | generator | " + " | ".join(timed) + " | "
              + " | ".join(f"{k} / ours" for k in timed[1:]) + " |", "|" + "---|" * (4 + 2 * len(timed) - 1)]
    for r in speed:
        ms = lambda k: fmt(r.get(k) * 1e3, ".0f") if isinstance(r.get(k), float) else "-"  # noqa: E731
        lines.append("| " + " | ".join([
            str(r["n"]), str(r["p"]), r["dtype"], r.get("generator", "random"), *(ms(f"{k}_fwdbwd_s") for k in timed),
            *(fmt(r.get(f"{k}_over_ours"), ".2f") for k in timed[1:])]) + " |")
    return "\n".join(lines) + "\n"


def warm_start_run(steps, n=50, m=50, batch=64, seed=0):
    """Iterations per solve while training an OptNetLayer full-batch (the same examples at every
    step, so the previous step's active set is a warm start), with and without warm start;
    the same seed, data and steps both ways (the solutions agree, so the runs do too)."""
    from ift.optnet import OptNetLayer

    runs = {}
    for warm in (False, True):
        torch.manual_seed(seed)
        layer = OptNetLayer(n, m, warm_start=warm).double()
        with torch.no_grad():
            layer.s0_raw.fill_(-2.0)  # tight constraints: a good share of them active
        q = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
        target = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
        iters = []
        for _ in range(steps):
            opt.zero_grad()
            loss = (layer(q) - target).square().mean()
            loss.backward()
            opt.step()
            iters.append(layer.solves.last["qp"].iterations)
        it = torch.stack(iters[1:]).double()  # the first step has nothing to start from
        runs["on" if warm else "off"] = {"mean_iterations": float(it.mean()),
                                         "zero_iteration_frac": float((it == 0).double().mean()),
                                         "final_loss": float(loss)}
    setup = (f"OptNetLayer(n={n}, n_ineq={m}), float64 parameters, batch {batch}, Adam lr 1e-3, {steps} steps, "
             "loss |z - target|^2 (steps 2.. counted)")
    return {"setup": setup, "runs": runs}


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
    parser.add_argument("--hard-sizes", type=int, nargs="*", default=[100],
                        help="sizes of the hard generator's rows (float64), in both parts")
    parser.add_argument("--warm-steps", type=int, default=30, help="training steps of the warm-start measurement")
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
            "proxsuite": version("proxsuite"),
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
        meta["warm_start"] = old["meta"].get("warm_start")
        meta["repeats"] = old["meta"].get("repeats", args.repeats) if args.part == "accuracy" else args.repeats
    if args.part != "accuracy":
        meta["cholesky_ms"] = cholesky_ms(device=args.device)

    def save():
        payload = {"meta": meta, "accuracy": acc, "speed": speed, "rows": speed}  # rows: gpu_check reads them
        (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=2))
        (RESULTS / f"{args.out}.md").write_text(markdown(meta, acc, speed))

    cases = lambda sizes: [(n, p, dtype, "random") for n in sizes for p in sorted({0, n // 2})  # noqa: E731
                           for dtype in (torch.float64, torch.float32)] + [
        (n, p, torch.float64, "hard") for n in args.hard_sizes for p in sorted({0, n // 2})]
    for n, p, dtype, gen in cases(args.sizes) if args.part != "speed" else []:
        acc.append(accuracy_row(n, p, dtype, args.batch, args.cvxpylayers_max_n, args.cvxpylayers_batch,
                                args.device, gen))
        print({k: v for k, v in acc[-1].items()}, flush=True)
        save()
    if args.part != "speed":
        meta["warm_start"] = warm_start_run(args.warm_steps)
        save()
    for n, p, dtype, gen in cases(args.speed_sizes) if args.part != "accuracy" else []:
        speed.append(speed_row(n, p, dtype, args.batch, args.repeats, cvx_speed_max_n, args.device, gen))
        print({k: v for k, v in speed[-1].items() if not k.endswith("_all_s")}, flush=True)
        save()
    print(markdown(meta, acc, speed))


if __name__ == "__main__":
    main()
