"""iMAML (implicit meta-gradients from ``ift.implicit``) against MAML (unrolled) on 10-shot sinusoids.

Two measurements, written through ``ift.bench`` to ``benchmarks/results/imaml_sinusoid.{json,md,png}``:

1. Cost against the number of inner steps S, on one fixed meta-batch: bytes of tensors saved for
   backward (``SavedTensorCounter.live_bytes`` just before ``backward``) and seconds per meta-step
   (adaptation + meta-gradient + Adam step), median [min, max] of ``--repeats`` interleaved runs.
   MAML unrolls S gradient steps; iMAML runs S inner iterations (``tol=0`` forces all of them)
   without a graph.
2. Meta-training with the same budget of meta-steps for each method and seed, then the meta-test
   query MSE on held-out tasks after k plain gradient steps (``k`` in ``--eval-steps``, step size
   ``inner_lr``), after iMAML's proximal solve from each method's initialisation (the same
   test-time adaptation for every method) and after each method's own adaptation.
   ``--wallclock-match`` adds ``maml@imaml-time``: MAML trained, per seed, for as long as iMAML's
   training took (wall-clock), so the comparison is at equal compute; being a wall-clock budget it
   needs an otherwise idle machine.

    python benchmarks/imaml_sinusoid.py                      # ~10 min of one idle core
    python benchmarks/imaml_sinusoid.py --wallclock-match    # + MAML at iMAML's wall-clock (~15 min)
    python benchmarks/imaml_sinusoid.py --quick              # smoke run (~1 min; numbers meaningless)
"""

from __future__ import annotations

import statistics
import time

import torch

from ift import bench
from ift.data.sinusoid import SinusoidDataModule
from ift.imaml.meta import gradient_steps, meta_loss, solve_inner, task_mse
from ift.imaml.module import MetaRegression
from ift.telemetry.diagnostics import solve_metrics
from ift.telemetry.saved_tensors import SavedTensorCounter

SOURCES = ["src/ift/imaml", "src/ift/data/sinusoid.py", "src/ift/implicit/core.py", "src/ift/implicit/minimize.py",
           "src/ift/implicit/linear_solvers.py", "src/ift/implicit/proximal.py", "src/ift/implicit/config.py",
           "src/ift/telemetry/saved_tensors.py", "src/ift/telemetry/diagnostics.py"]
METHODS = ("maml", "imaml")
MATCHED = "maml@imaml-time"  # MAML trained for iMAML's training wall-clock (--wallclock-match)


def make_model(method: str, seed: int, args, **inner_overrides) -> MetaRegression:
    inner = dict(lr=args.imaml_inner_lr, momentum=0.9, max_iter=args.imaml_max_iter, tol=args.imaml_tol)
    inner.update(inner_overrides)
    return MetaRegression(
        method=method,
        hidden=(40, 40),
        inner_steps=args.maml_steps,
        inner_lr=args.inner_lr,
        lam=args.lam,
        inner=inner,
        meta_lr=args.meta_lr,
        init_seed=seed,
    )


def meta_step(model: MetaRegression, optimizer: torch.optim.Optimizer, batch, counter: SavedTensorCounter | None = None):
    """One meta-update; returns (meta-loss, live saved bytes before backward or None, inner metrics)."""
    xs, ys, xq, yq = batch
    if counter is not None:
        with counter:
            phi, keep = model.adapt(xs, ys, create_graph=True)
            loss = meta_loss(task_mse(model.net, phi, xq, yq), keep)
        saved = counter.live_bytes
    else:
        phi, keep = model.adapt(xs, ys, create_graph=True)
        loss = meta_loss(task_mse(model.net, phi, xq, yq), keep)
        saved = None
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    inner = model.solves.pop().get("inner")  # the names SolverDiagnostics logs
    metrics = {k: float(v) for k, v in solve_metrics("inner", inner).items()} if inner is not None else {}
    return float(loss), saved, metrics


def cost_vs_steps(args, batch) -> list[dict]:
    rows = []
    for steps in args.steps:
        models = {
            "maml": make_model("maml", 0, args),
            "imaml": make_model("imaml", 0, args, max_iter=steps, tol=1e-30, nonstationary="ift"),
        }
        models["maml"].inner_steps = steps
        optimizers = {m: model.configure_optimizers() for m, model in models.items()}
        saved = {}
        for method in METHODS:  # untimed round: warm-up and the memory count
            saved[method] = meta_step(models[method], optimizers[method], batch, SavedTensorCounter())[1]
        times = bench.interleaved({m: (lambda m=m: meta_step(models[m], optimizers[m], batch)) for m in METHODS},
                                  repeats=args.repeats, warmup=0)
        for method in METHODS:
            rows.append({"steps": steps, "method": method, "saved_bytes": saved[method],
                         "seconds_per_meta_step": times[method].to_dict()})
            print(f"S={steps:4d} {method:5s} saved={saved[method] / 2**20:8.2f} MiB "
                  f"time={times[method].median * 1e3:8.1f} ms", flush=True)
    return rows


@torch.no_grad()
def evaluate(model: MetaRegression, loader, eval_steps: list[int]) -> dict[str, float]:
    """Meta-test query MSE, mean over tasks: after k gradient steps, after iMAML's proximal solve from
    this initialisation (both the same for every method), and after the method's own adaptation."""
    sums = {f"gd{k}": 0.0 for k in eval_steps}
    sums["prox"] = sums["own"] = 0.0
    count = 0
    for xs, ys, xq, yq in loader:
        with torch.enable_grad():
            phi, _ = model.adapt(xs, ys, create_graph=False)
            sums["own"] += float(task_mse(model.net, phi.detach(), xq, yq).sum())
            prox = solve_inner(model.net, model.theta, xs, ys, model.lam, model.inner).x
            sums["prox"] += float(task_mse(model.net, prox, xq, yq).sum())
            for k in eval_steps:
                phi_k = gradient_steps(model.net, model.theta.detach(), xs, ys, k, model.eval_lr, create_graph=False)
                sums[f"gd{k}"] += float(task_mse(model.net, phi_k, xq, yq).sum())
        count += len(xs)
    return {key: value / count for key, value in sums.items()}


def train(method: str, seed: int, args, data: SinusoidDataModule, seconds_budget: float | None = None) -> dict:
    """Meta-train for ``args.meta_steps`` meta-steps, or (``seconds_budget``) until that much wall-clock
    has passed; ``method`` MATCHED is MAML under such a budget."""
    torch.manual_seed(seed)
    model = make_model("maml" if method == MATCHED else method, seed, args)
    optimizer = model.configure_optimizers()
    loader = torch.utils.data.DataLoader(data.tasks("train"), batch_size=data.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    losses, nonstationary, inner_iters, step = [], [], [], 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    def done() -> bool:
        return (time.perf_counter() - start >= seconds_budget) if seconds_budget is not None else step >= args.meta_steps

    while not done():
        for batch in loader:
            loss, _, metrics = meta_step(model, optimizer, batch)
            losses.append(loss)
            if metrics:
                nonstationary.append(metrics["inner/nonstationary_frac"])
                inner_iters.append(metrics["inner/iterations"])
            step += 1
            if done():
                break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test_loader = torch.utils.data.DataLoader(data.tasks("test"), batch_size=100)
    result = {
        "method": method,
        "seed": seed,
        "meta_steps": step,
        "seconds_budget": seconds_budget,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "seconds_per_meta_step": seconds / step,
        "final_train_loss": statistics.mean(losses[-50:]),
        "test_mse": evaluate(model, test_loader, args.eval_steps),
        "inner_nonstationary_frac": statistics.mean(nonstationary) if nonstationary else None,
        "inner_iterations_mean": statistics.mean(inner_iters) if inner_iters else None,
        "train_loss_curve": losses,
    }
    print(f"{method:5s} seed={seed} {step} meta-steps {seconds:6.1f}s test MSE " + " ".join(
        f"{k}={v:.3f}" for k, v in result["test_mse"].items()), flush=True)
    return result


def summarise(runs: list[dict], eval_steps: list[int]) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": len(mine), "meta_steps_mean": statistics.mean(r["meta_steps"] for r in mine)}
        for key in [f"gd{k}" for k in eval_steps] + ["prox", "own"]:
            values = [r["test_mse"][key] for r in mine]
            row[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        row["seconds_per_meta_step"] = statistics.mean(r["seconds_per_meta_step"] for r in mine)
        rows.append(row)
    return rows


def markdown(meta: dict, env: dict, cost: list[dict], summary: list[dict]) -> str:
    steps = meta["eval_steps"]

    def pm(value) -> str:
        return f"{value[0]:.3f} +- {value[1]:.3f}"

    results = [[row["method"], f"{row['meta_steps_mean']:.0f}", *(pm(row[f"gd{k}"]) for k in steps), pm(row["prox"]),
                pm(row["own"]), f"{row['seconds_per_meta_step']:.4f}"] for row in summary]
    by = {(r["steps"], r["method"]): r for r in cost}
    memory = []
    for s in sorted({r["steps"] for r in cost}):
        m, i = by[(s, "maml")], by[(s, "imaml")]
        memory.append([s, f"{m['saved_bytes'] / 2**20:.2f}", f"{i['saved_bytes'] / 2**20:.2f}",
                       bench.Spread.of(m["seconds_per_meta_step"]["wall_s"]).fmt(".4f"),
                       bench.Spread.of(i["seconds_per_meta_step"]["wall_s"]).fmt(".4f")])
    matched = (f" {MATCHED}: MAML trained, per seed, for iMAML's training wall-clock of that seed."
               if any(r["method"] == MATCHED for r in summary) else "")
    return (
        "# iMAML vs MAML: 10-shot sinusoid regression\n\n"
        f"{bench.describe(env)}. MLP 1-40-40-1 (tanh), meta-batch {meta['meta_batch']} tasks, Adam (lr "
        f"{meta['meta_lr']}). MAML: {meta['maml_steps']} unrolled gradient steps of size {meta['inner_lr']}. iMAML: "
        f"lam = {meta['lam']}, inner heavy-ball descent (lr {meta['imaml_inner_lr']}, momentum 0.9) to relative "
        f"stationarity {meta['imaml_tol']:g} (at most {meta['imaml_max_iter']} iterations; tasks above it leave the "
        "meta-loss), CG at the core's float32 tolerance.\n\n"
        f"## Meta-test MSE ({meta['test_tasks']} held-out tasks, mean +- std over seeds {meta['seeds']})\n\n"
        + bench.table(["method", "meta-steps", *(f"{k} GD steps" for k in steps), "iMAML prox. solve",
                       "own adaptation", "s / meta-step"], results)
        + f"\nk GD steps: plain gradient steps of size {meta['inner_lr']} on the support MSE from the meta-learned "
        "initialisation; iMAML prox. solve: iMAML's inner solve (the settings above) from that initialisation; "
        "both are the same test-time adaptation for every method. Own adaptation: MAML's unrolled steps; "
        f"iMAML's proximal solve. {meta['meta_steps']} meta-steps per run.{matched} Seconds per meta-step are "
        "training wall time divided by meta-steps.\n\n"
        "## Memory and time against the number of inner steps S (one meta-batch)\n\n"
        + bench.table(["S", "MAML saved (MiB)", "iMAML saved (MiB)", "MAML s / meta-step", "iMAML s / meta-step"], memory)
        + "\nSaved bytes: tensors held for backward (`SavedTensorCounter.live_bytes`) just before `backward()`. "
        f"Times: median [min, max] of {meta['repeats']} interleaved meta-steps (wall), after one untimed round.\n"
    )


def plot(cost: list[dict], runs: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in METHODS:
        rows = sorted((r for r in cost if r["method"] == method), key=lambda r: r["steps"])
        ax1.plot([r["steps"] for r in rows], [r["saved_bytes"] / 2**20 for r in rows], "o-", label=method)
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r["train_loss_curve"] for r in runs if r["method"] == method]
        length = min(len(c) for c in mine)  # wall-clock-matched runs differ in length across seeds
        curves = torch.tensor([c[:length] for c in mine])
        window = min(20, length)
        smooth = torch.nn.functional.avg_pool1d(curves.unsqueeze(1), window, stride=1).squeeze(1)
        x = torch.arange(window, length + 1)
        ax2.plot(x, smooth.mean(0), label=method)
        ax2.fill_between(x, smooth.min(0).values, smooth.max(0).values, alpha=0.2)
    ax1.set(xscale="log", yscale="log", xlabel="inner steps S", ylabel="saved for backward (MiB)",
            title="memory of one meta-step")
    ax2.set(xscale="log", yscale="log", xlabel="meta-step", ylabel="meta-train query MSE",
            title="meta-training (min-max over seeds)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = bench.parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--meta-steps", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 25, 50, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[0, 1, 5, 10])
    parser.add_argument("--maml-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.03)
    parser.add_argument("--lam", type=float, default=2.0)
    parser.add_argument("--imaml-inner-lr", type=float, default=0.05)
    parser.add_argument("--imaml-max-iter", type=int, default=300)
    parser.add_argument("--imaml-tol", type=float, default=1e-3)
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument("--test-tasks", type=int, default=500)
    parser.add_argument("--wallclock-match", action="store_true",
                        help=f"also train {MATCHED}: MAML for iMAML's training wall-clock (needs an idle machine)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.meta_steps, args.steps, args.repeats, args.test_tasks = [0, 1], 20, [1, 5], 2, 50
        args.imaml_max_iter = 30
    torch.set_num_threads(1)
    run = bench.Run("imaml_sinusoid", SOURCES, args)

    data = SinusoidDataModule(shots=10, query=10, test_tasks=args.test_tasks, batch_size=25)
    batch = next(iter(torch.utils.data.DataLoader(data.tasks("train"), batch_size=25)))
    cost = cost_vs_steps(args, batch)
    runs = []
    for seed in args.seeds:
        for method in ("imaml", "maml"):
            runs.append(train(method, seed, args, data))
        if args.wallclock_match:
            runs.append(train(MATCHED, seed, args, data, seconds_budget=runs[-2]["train_seconds"]))
    summary = summarise(runs, args.eval_steps)
    meta = {
        "seeds": args.seeds,
        "meta_steps": args.meta_steps,
        "meta_batch": 25,
        "meta_lr": args.meta_lr,
        "maml_steps": args.maml_steps,
        "inner_lr": args.inner_lr,
        "lam": args.lam,
        "imaml_inner_lr": args.imaml_inner_lr,
        "imaml_max_iter": args.imaml_max_iter,
        "imaml_tol": args.imaml_tol,
        "eval_steps": args.eval_steps,
        "test_tasks": args.test_tasks,
        "repeats": args.repeats,
    }
    text = markdown(meta, run.environment, cost, summary)
    run.write({"meta": meta, "cost_vs_steps": cost, "summary": summary, "runs": runs}, text,
              figures={"imaml_sinusoid.png": plot(cost, runs)})
    print(text)


if __name__ == "__main__":
    main()
