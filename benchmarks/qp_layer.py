"""ift.optnet.solve_qp against qpth 0.0.18, ProxSuite's QPLayer and cvxpylayers: accuracy and speed.

Problems as in the OptNet timing study (generator "random"): Q = M M^T / n + 0.1 I, G random
(m = n rows), h = G z0 + s0, A random (p rows), b = A z0; batch 128; loss sum(W * z) with a fixed
random W. Generator "hard": the same problems with cond(Q) = 1e6, a tenth of the rows duplicated,
rows scaled over 1e-3..1e3 and columns over 1e-1..1e1 (the same optimum up to scaling).

Accuracy (float64 and float32 inputs): max error of z and of the gradients of the loss w.r.t. all
six arguments against an exact reference: numpy solves the equality-constrained KKT system of the
active set proposed by our solution (lam > 0) and certifies it (kept multipliers and dropped
slacks > 1e-6, scale-free); only certified, i.e. nondegenerate, problems are compared (their count
is reported). cvxpylayers gets Q through its Cholesky factor (DPP form).

Speed: forward + backward wall time, 1 torch thread (and 1 BLAS thread for the LAPACK calls made
through scipy), the implementations interleaved by `ift.bench.interleaved` (order alternating per
round), median [min, max] of `--repeats` rounds and the per-round ratio solver / ours; each
solver's z and gradient errors against the same exact reference sit in the same table. The script
restarts itself with fixed glibc allocator thresholds (ALLOCATOR_ENV): with the defaults, freed
large blocks go back to the OS and are faulted in again on the next call, and how often depends
on the process's history (benchmarks/qp_allocator.py measures the effect: qpth is hit harder than
ours). All implementations run under the same settings. Ours runs with its default precision
policy ("mixed": float32 interior point, float64 polish and backward); the accuracy part also
reports float32 inputs solved entirely in float32, and the warm start's iterations and step time
on a full-batch OptNetLayer training run.

    python benchmarks/qp_layer.py --part accuracy                   # accuracy (+ warm start)
    python benchmarks/qp_layer.py --part speed --speed-sizes 100 --hard-sizes 100 --repeats 7   # the n = 100 goals
    python benchmarks/qp_layer.py                                   # both parts, all sizes (long)
    python benchmarks/qp_layer.py --quick                           # smoke run (seconds; numbers meaningless)

`--part` reruns one part and keeps the other part's rows from the result already in `--out`
only if that result is fresh (same measured sources and script, committed); otherwise it says
so in one line and the result holds the rerun part only. Writes <out>/qp_layer.{json,md}. Needs `pip install -e '.[bench]'` (qpth,
cvxpylayers) and proxsuite for QPLayer; a missing one is skipped with one line.
"""

from __future__ import annotations

import json
import os
import sys

# Keep freed memory in the heap (mmap only above 32 MiB, never trim): set before anything
# allocates, i.e. by re-executing this script before torch is imported.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from ift import bench  # noqa: E402
from ift.optnet import QPStatus, solve_qp_with_info  # noqa: E402
from ift.optnet.kkt import cholesky_unchecked  # noqa: E402
from ift.optnet.scaling import Scaling  # noqa: E402

# What the results measure: the solver, its factorisations and scaling, the layer (warm start) and
# the implicit core, whose adjoint hook runs the backward.
SOURCES = ["src/ift/optnet/qp.py", "src/ift/optnet/kkt.py", "src/ift/optnet/scaling.py",
           "src/ift/optnet/layer.py", "src/ift/optnet/__init__.py", "src/ift/implicit/core.py"]
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
        if not getattr(make_cvxpylayers, "said", False):
            print("skipping cvxpylayers (pip install -e '.[bench]'): not installed", flush=True)
            make_cvxpylayers.said = True
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


def statuses(sol) -> dict:
    return {QPStatus(s).name: int((sol.status == s).sum()) for s in sol.status.unique().tolist()}


def one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"


class Reference:
    """The exact reference of a batch at the active set of our solution, and the errors of any
    solver's (z, gradients) against it on the certified problems (relative and with duplicated
    rows folded for the hard generator)."""

    def __init__(self, qp_cpu, W, sol, generator):
        self.relative = generator == "hard"
        self.z, grads, self.certified = reference_batch(qp_cpu, W, (sol.lam > 0).cpu().numpy())
        # duplicated rows: only the derivative along both copies at once is unique
        self.fold = duplicate_fold(qp_cpu[2]) if self.relative else (lambda g: g)
        self.grads = self.fold(grads)
        rows = self.certified
        self.scale = max((float(r[rows].abs().max()) for r in self.grads if r[rows].numel()), default=float("nan"))

    def errors(self, z, grads, first: int | None = None):
        k = slice(None) if first is None else slice(0, first)
        return max_errors(z, self.fold(grads), self.z[k], [r[k] for r in self.grads], self.certified[k], self.relative)


def accuracy_row(n, p, dtype, batch, cvx_max_n, cvx_batch, device="cpu", generator="random"):
    qp_cpu = GENERATORS[generator](batch, n, n, p, dtype)
    qp = [t.to(device) for t in qp_cpu]
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = Ours()
    z, grads = forward_backward(ours, qp, W)
    sol = ours.last
    ref = Reference(qp_cpu, W, sol, generator)
    row = {"n": n, "p": p, "dtype": str(dtype).split(".")[-1], "batch": batch, "device": str(device),
           "generator": generator, "errors": "relative" if ref.relative else "absolute",
           "certified": int(ref.certified.sum()), "grad_scale": ref.scale,
           "ours_not_converged": int((~sol.converged).sum()),
           "ours_degenerate": int((sol.status == QPStatus.DEGENERATE).sum()),
           "ours_iters_mean": float(sol.iterations.float().mean()), "ours_iters_max": int(sol.iterations.max()),
           "ours_statuses": statuses(sol)}
    row["ours_z_err"], row["ours_grad_err"] = ref.errors(z, grads)
    if dtype == torch.float32:  # the non-default policy: everything in float32
        native = Ours(precision="input")
        zn, gn = forward_backward(native, qp, W)
        row["native32_z_err"], row["native32_grad_err"] = ref.errors(zn, gn)
        # not converged: neither CONVERGED nor DEGENERATE (z verified in both); DEGENERATE counted apart
        row["native32_not_converged"] = int((~native.last.converged).sum())
        row["native32_degenerate"] = int((native.last.status == QPStatus.DEGENERATE).sum())
        row["native32_statuses"] = statuses(native.last)
    for impl in references():
        if impl.name == "qplayer" and str(device) != "cpu":
            continue
        try:
            zq, gq = forward_backward(impl, qp, W)
        except Exception as err:  # e.g. qpth's SPD check or a failed factorisation: one line, the run goes on
            row[f"{impl.name}_error"] = one_line(err)
            continue
        row[f"{impl.name}_z_err"], row[f"{impl.name}_grad_err"] = ref.errors(zq, gq)
    cvx = make_cvxpylayers(n, n, p) if n <= cvx_max_n else None
    if cvx is not None:  # on the first cvx_batch problems: it solves them one by one (on the CPU)
        zc, gc = forward_backward(cvx, [t[:cvx_batch] for t in qp_cpu], W[:cvx_batch])
        row["cvxpylayers_z_err"], row["cvxpylayers_grad_err"] = ref.errors(zc, gc, first=cvx_batch)
    return row


def speed_row(n, p, dtype, batch, repeats, cvx_max_n, device="cpu", generator="random"):
    qp_cpu = GENERATORS[generator](batch, n, n, p, dtype)
    qp = [t.to(device) for t in qp_cpu]
    W = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cvx = make_cvxpylayers(n, n, p) if n <= cvx_max_n and str(device) == "cpu" else None
    refs = [f for f in references() if f.name != "qplayer" or str(device) == "cpu"]
    impls, failed = [], {}
    ours = Ours()
    for f in [ours, *refs, *([cvx] if cvx else [])]:  # warm-up call (first-call allocations, canonicalisation)
        try:
            forward_backward(f, qp, W)
            impls.append(f)
        except Exception as err:
            if f is ours:
                raise
            failed[f.name] = one_line(err)
    ref = Reference(qp_cpu, W, ours.last, generator)
    times = bench.interleaved({f.name: (lambda f=f: forward_backward(f, qp, W)) for f in impls}, repeats=repeats,
                              warmup=0, device=str(device))
    sol = ours.last
    row = {"n": n, "p": p, "dtype": str(dtype).split(".")[-1], "batch": batch, "repeats": repeats,
           "device": str(device), "generator": generator, "errors": "relative" if ref.relative else "absolute",
           "certified": int(ref.certified.sum()), "ours_iters_mean": float(sol.iterations.float().mean()),
           "ours_iters_max": int(sol.iterations.max()), "ours_statuses": statuses(sol)}
    for name, t in times.items():
        row[f"{name}_fwdbwd_s"] = t.median  # (gpu_check reads ours_fwdbwd_s)
        row[f"{name}_time"] = t.to_dict()
        row[f"{name}_z_err"], row[f"{name}_grad_err"] = ref.errors(*t.last)
        if name != "ours":
            row[f"{name}_over_ours"] = bench.ratio(t, times["ours"]).to_dict()
    for name, msg in failed.items():
        row[f"{name}_error"] = msg
    return row


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def spread(d: dict | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return bench.Spread(d["min"], d["median"], d["max"], d["n"]).fmt(spec, scale) if d else "-"


def ms_spread(t: dict | None) -> str:
    """median [min, max] milliseconds of a Timing.to_dict()."""
    return bench.Spread.of(t["wall_s"]).fmt(".0f", 1e3) if t else "-"


REFERENCES = ("qpth", "qpth_eps1e-09", "qpth_eps1e-09_nospd", "qplayer", "cvxpylayers")


def status_note(counts: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if k != "CONVERGED")


def markdown(payload: dict, run: bench.Run) -> str:
    acc, speed, v, s = payload["accuracy"], payload["speed"], payload["versions"], payload["settings"]
    present = lambda rows, suffix: [k for k in ("ours", *REFERENCES) if any(f"{k}{suffix}" in r for r in rows)]  # noqa: E731
    out = [
        "# ift.optnet.solve_qp vs qpth, QPLayer, cvxpylayers",
        "",
        f"qpth {v['qpth']}, proxsuite {v['proxsuite']}, cvxpylayers {v['cvxpylayers']}; {s['threads']} thread(s) "
        f"(torch, and BLAS under numpy/scipy); batch {s['batch']}, m = n inequalities, p equalities; "
        + " ".join(f"{k}={x}" for k, x in ALLOCATOR_ENV.items()) + ". "
        "qpth at its defaults (eps 1e-12, SPD check of Q), at eps 1e-9 (our and QPLayer's tolerance), and at eps "
        "1e-9 without the SPD check; QPLayer (proxsuite.torch) at eps 1e-9. Iteration counts: ours only (qpth and "
        "QPLayer do not return theirs).",
        "",
        "Errors: max error of z / of the gradients of sum(W * z) w.r.t. all six arguments against the exact "
        "active-set reference, over the certified problems. random: absolute errors; hard (cond(Q) 1e6, "
        "duplicated rows, rows scaled over 1e-3..1e3, columns over 1e-1..1e1): relative to each argument's "
        "largest reference entry, the G and h gradients of each duplicated pair folded into one (only the "
        "derivative along both copies is unique). Statuses other than CONVERGED are listed; DEGENERATE is a "
        "verified solution with a weakly active row (z exact, the gradient one-sided).",
    ]
    if payload.get("kept"):
        k = payload["kept"]
        out += ["", f"The {k['part']} rows are kept from an earlier run of the same measured sources "
                f"(`{k['command']}` at commit `{(k['commit'] or 'unknown')[:12]}`)."]
    if acc:
        names = present(acc, "_z_err")
        out += ["", "## Accuracy", "",
                bench.table(["n", "p", "dtype", "generator", "certified", "ours: not converged, iterations mean/max",
                             "grad scale", *(f"{k}: z / grad" for k in names)],
                            [[r["n"], r["p"], r["dtype"], r["generator"], f"{r['certified']}/{r['batch']}",
                              f"{r['ours_not_converged']}, {r['ours_iters_mean']:.1f}/{r['ours_iters_max']}"
                              + "".join(f", {x}" for x in [status_note(r["ours_statuses"])] if x),
                              fmt(r["grad_scale"], ".1f"),
                              *(r[f"{k}_error"] if f"{k}_error" in r else
                                f"{fmt(r.get(f'{k}_z_err'), '.1e')} / {fmt(r.get(f'{k}_grad_err'), '.1e')}" for k in names)]
                             for r in acc], align="l" * 5 + "r" * (2 + len(names)))]
        native = [r for r in acc if "native32_z_err" in r]
        if native:
            out += ['float32 inputs solved entirely in float32 (`precision="input"`, not the default); not '
                    "converged: neither CONVERGED nor DEGENERATE; DEGENERATE (z verified, gradient one-sided) apart:", "",
                    bench.table(["n", "p", "generator", "not converged", "DEGENERATE", "z error", "grad error"],
                                [[r["n"], r["p"], r["generator"], r["native32_not_converged"], r.get("native32_degenerate", "-"),
                                  fmt(r["native32_z_err"], ".1e"), fmt(r["native32_grad_err"], ".1e")] for r in native])]
    warm = payload.get("warm_start")
    if warm:
        out += ["## Warm start on a full-batch OptNetLayer training run", "", warm["setup"], "",
                bench.table(["warm start", "mean iterations per solve", "solves with 0 iterations",
                             "ms per training step, median [min, max]", "final loss"],
                            [[k, f"{r['mean_iterations']:.2f}", f"{r['zero_iteration_frac']:.3f}",
                              spread(r["step_time"], ".1f", 1e3), f"{r['final_loss']:.6f}"] for k, r in warm["runs"].items()]),
                f"Step time off / on (per round, interleaved): {spread(warm['off_over_on'])}.", ""]
    chol = payload.get("cholesky_ms")
    if chol:
        out += ["Cholesky of 128 matrices 100 x 100 as the solver factorises them, median ms: "
                + ", ".join(f"{k} {x:.2f}" for k, x in chol.items()), ""]
    if speed:
        out += [f"## Speed: forward + backward, {speed[0]['repeats']} interleaved rounds", "",
                "ms and the per-round ratio solver / ours as median [min, max]; errors as above on the same batch.", "",
                bench.table(["n", "p", "dtype", "generator", "solver", "ms", "solver / ours", "z error", "grad error", "notes"],
                            [[r["n"], r["p"], r["dtype"], r["generator"], k,
                              ms_spread(r.get(f"{k}_time")),
                              spread(r.get(f"{k}_over_ours")) if k != "ours" else "1",
                              fmt(r.get(f"{k}_z_err"), ".1e"), fmt(r.get(f"{k}_grad_err"), ".1e"),
                              r.get(f"{k}_error", "") or (f"iterations {r['ours_iters_mean']:.1f}/{r['ours_iters_max']}"
                                                          + "".join(f", {x}" for x in [status_note(r["ours_statuses"])] if x)
                                                          if k == "ours" else "")]
                             for r in speed for k in present([r], "_fwdbwd_s") + [x for x in REFERENCES if f"{x}_error" in r]],
                            align="l" * 5 + "r" * 5)]
    return "\n".join(out) + "\n"


def warm_start_run(steps, n=50, m=50, batch=64, seed=0):
    """Iterations and time per training step of an OptNetLayer trained full-batch (the same examples
    at every step, so the previous step's active set is a warm start), with and without warm start:
    the same seed, data and steps both ways (the solutions agree, so the runs do too), the two runs
    stepped in lockstep and timed interleaved (order alternating per step)."""
    from ift.optnet import OptNetLayer

    q = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    target = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    state = {}
    for warm in (False, True):
        torch.manual_seed(seed)
        layer = OptNetLayer(n, m, warm_start=warm).double()
        with torch.no_grad():
            layer.s0_raw.fill_(-2.0)  # tight constraints: a good share of them active
        state["on" if warm else "off"] = {"layer": layer, "opt": torch.optim.Adam(layer.parameters(), lr=1e-3),
                                          "iters": [], "loss": None}

    def step(k):
        s = state[k]
        s["opt"].zero_grad()
        loss = (s["layer"](q) - target).square().mean()
        loss.backward()
        s["opt"].step()
        s["iters"].append(s["layer"].solves.last["qp"].iterations)
        s["loss"] = float(loss)

    # the warm-up round is step 1, which has nothing to start from
    times = bench.interleaved({k: (lambda k=k: step(k)) for k in ("off", "on")}, repeats=steps - 1, warmup=1)
    runs = {}
    for k, s in state.items():
        it = torch.stack(s["iters"][1:]).double()
        runs[k] = {"mean_iterations": float(it.mean()), "zero_iteration_frac": float((it == 0).double().mean()),
                   "final_loss": s["loss"], "step_time": times[k].spread().to_dict(), "time": times[k].to_dict()}
    setup = (f"OptNetLayer(n={n}, n_ineq={m}), float64 parameters, batch {batch}, Adam lr 1e-3, {steps} steps, "
             "loss |z - target|^2; steps 2.. counted (the first has nothing to start from), forward + backward + "
             "optimizer step timed, the two runs interleaved.")
    return {"setup": setup, "runs": runs, "off_over_on": bench.ratio(times["off"], times["on"]).to_dict()}


def cholesky_ms(repeats=21, device="cpu"):
    """The main per-iteration cost in both dtypes (float32 is what the mixed policy iterates in)."""
    mats = {}
    for dtype in (torch.float64, torch.float32):
        M = torch.randn(128, 100, 100, dtype=dtype, generator=torch.Generator().manual_seed(0))
        mats[str(dtype).split(".")[-1]] = (M @ M.mT + 100 * torch.eye(100, dtype=dtype)).to(device)
    times = bench.interleaved({k: (lambda M=M: cholesky_unchecked(M)) for k, M in mats.items()}, repeats=repeats,
                              device=device)
    return {k: t.median * 1e3 for k, t in times.items()}


def version(module):
    try:
        from importlib.metadata import version as v

        return v(module)
    except Exception:
        return "not installed"


# defaults of the full run / of --quick (a flag given on the command line wins over both)
DEFAULTS = {"sizes": ([10, 50, 100, 200], [10]), "batch": (128, 8), "repeats": (5, 1), "hard_sizes": ([100], [10]),
            "warm_steps": (30, 3), "cvxpylayers_max_n": (100, 10), "cvxpylayers_batch": (16, 2),
            "cvxpylayers_speed_max_n": (50, 10)}


def kept_part(run: bench.Run, part: str, quick: bool) -> tuple[dict, dict | None]:
    """The other part's rows from the fresh result already in the output folder (see the docstring)."""
    path = run.out / f"{run.name}.json"
    other = "speed" if part == "accuracy" else "accuracy"
    if not path.is_file():
        print(f"--part {part}: no earlier {bench.relative(path)}; the result holds the {part} part only", flush=True)
        return {}, None
    old = json.loads(path.read_text())
    reasons = bench.stale_reasons(old)
    if reasons and not quick:
        print(f"--part {part}: not keeping the {other} part of {bench.relative(path)}, it is stale ({reasons[0]}); "
              f"the result holds the {part} part only (then run --part {other})", flush=True)
        return {}, None
    keys = ["speed", "cholesky_ms"] if other == "speed" else ["accuracy", "warm_start"]
    p = old.get("provenance", {})
    return {k: old[k] for k in keys if k in old}, {"part": other, "commit": p.get("commit"), "command": p.get("command")}


def main():
    parser = bench.parser(__doc__)
    parser.add_argument("--part", choices=["all", "accuracy", "speed"], default="all",
                        help="run one part and keep the other part's rows from the fresh result in --out "
                             "(accuracy needs no quiet machine, speed an otherwise idle one)")
    parser.add_argument("--sizes", type=int, nargs="+", help="n of the random generator (default 10 50 100 200)")
    parser.add_argument("--speed-sizes", type=int, nargs="+", help="sizes to time (default: --sizes)")
    parser.add_argument("--hard-sizes", type=int, nargs="*", help="sizes of the hard generator's rows (float64), "
                        "in both parts (default 100)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--repeats", type=int, help="interleaved timing rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cvxpylayers-max-n", type=int, help="accuracy of cvxpylayers up to this n (default 100)")
    parser.add_argument("--cvxpylayers-batch", type=int, help="problems cvxpylayers solves for accuracy (default 16)")
    parser.add_argument("--cvxpylayers-speed-max-n", type=int,
                        help="time cvxpylayers up to this n (and up to --cvxpylayers-max-n; default 50)")
    parser.add_argument("--warm-steps", type=int, help="training steps of the warm-start measurement (default 30)")
    parser.add_argument("--device", default="cpu", help="where our solver and qpth run (QPLayer, cvxpylayers and the "
                        "exact reference stay on the CPU)")
    args = parser.parse_args()
    for key, (full, quick) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.speed_sizes = args.speed_sizes or args.sizes
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    if args.repeats < 1 or args.warm_steps < 2:
        parser.error("--repeats must be >= 1 and --warm-steps >= 2")
    cvx_speed_max_n = min(args.cvxpylayers_speed_max_n, args.cvxpylayers_max_n)
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # the BLAS/LAPACK under numpy and scipy too
    run = bench.Run("qp_layer", SOURCES, args, device=args.device)
    payload = {"versions": {m: version(m) for m in ("qpth", "proxsuite", "cvxpylayers", "cvxpy", "scipy")},
               "settings": {"threads": torch.get_num_threads(), "batch": args.batch, "allocator_env": ALLOCATOR_ENV},
               "accuracy": [], "speed": []}
    if args.part != "all":
        kept, payload["kept"] = kept_part(run, args.part, args.quick)
        payload.update(kept)
    payload["rows"] = payload["speed"]  # gpu_check reads the speed rows under this key

    def save():
        run.write(payload, markdown(payload, run))

    cases = lambda sizes: [(n, p, dtype, "random") for n in sizes for p in sorted({0, n // 2})  # noqa: E731
                           for dtype in (torch.float64, torch.float32)] + [
        (n, p, torch.float64, "hard") for n in args.hard_sizes for p in sorted({0, n // 2})]
    if args.part != "speed":
        payload["accuracy"] = []
        for n, p, dtype, gen in cases(args.sizes):
            payload["accuracy"].append(accuracy_row(n, p, dtype, args.batch, args.cvxpylayers_max_n,
                                                    args.cvxpylayers_batch, args.device, gen))
            print({k: x for k, x in payload["accuracy"][-1].items()}, flush=True)
            save()
        payload["warm_start"] = warm_start_run(args.warm_steps)
        save()
    if args.part != "accuracy":
        payload["cholesky_ms"] = cholesky_ms(device=args.device)
        payload["speed"].clear()
        for n, p, dtype, gen in cases(args.speed_sizes):
            payload["speed"].append(speed_row(n, p, dtype, args.batch, args.repeats, cvx_speed_max_n, args.device, gen))
            print({k: x for k, x in payload["speed"][-1].items() if not k.endswith("_time")}, flush=True)
            save()
    save()
    print(markdown(payload, run))


if __name__ == "__main__":
    main()
