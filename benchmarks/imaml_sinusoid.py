"""iMAML (implicit meta-gradients from ``ift.implicit``) against MAML (unrolled) on 10-shot sinusoids.

Two measurements, written to ``benchmarks/results/imaml_sinusoid.{json,md,png}``:

1. Cost against the number of inner steps S, on one fixed meta-batch: bytes of tensors saved for
   backward (``SavedTensorCounter.live_bytes`` just before ``backward``) and seconds per meta-step
   (adaptation + meta-gradient + Adam step), median of ``--repeats`` interleaved runs. MAML unrolls
   S gradient steps; iMAML runs S inner iterations (``rtol=0`` forces all of them) without a graph.
2. Meta-training with the same budget of meta-steps for each method and seed, then the meta-test
   query MSE on held-out tasks after k plain gradient steps (``k`` in ``--eval-steps``, step size
   ``inner_lr``, the same protocol for both) and after each method's own adaptation.

    python benchmarks/imaml_sinusoid.py              # ~10 min of one CPU core
    python benchmarks/imaml_sinusoid.py --quick      # a 1-minute smoke run (numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ift.data.sinusoid import SinusoidDataModule
from ift.imaml.meta import gradient_steps, meta_loss, task_mse
from ift.imaml.module import MetaRegression
from ift.telemetry.diagnostics import solve_metrics
from ift.telemetry.saved_tensors import SavedTensorCounter

RESULTS = Path(__file__).parent / "results"
METHODS = ("maml", "imaml")


def make_model(method: str, seed: int, args, **inner_overrides) -> MetaRegression:
    inner = dict(lr=args.imaml_inner_lr, momentum=0.9, max_iter=args.imaml_max_iter, rtol=args.imaml_rtol)
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
            "imaml": make_model("imaml", 0, args, max_iter=steps, rtol=1e-30, nonstationary="ift"),
        }
        models["maml"].inner_steps = steps
        optimizers = {m: model.configure_optimizers() for m, model in models.items()}
        times = {m: [] for m in METHODS}
        saved = {}
        for repeat in range(args.repeats + 1):  # round 0: warm-up and the memory count
            for method in METHODS:
                start = time.perf_counter()
                counter = SavedTensorCounter() if repeat == 0 else None
                _, nbytes, _ = meta_step(models[method], optimizers[method], batch, counter)
                if repeat == 0:
                    saved[method] = nbytes
                else:
                    times[method].append(time.perf_counter() - start)
        for method in METHODS:
            rows.append({"steps": steps, "method": method, "saved_bytes": saved[method],
                         "seconds_per_meta_step": statistics.median(times[method])})
            print(f"S={steps:4d} {method:5s} saved={saved[method] / 2**20:8.2f} MiB "
                  f"time={rows[-1]['seconds_per_meta_step'] * 1e3:8.1f} ms", flush=True)
    return rows


@torch.no_grad()
def evaluate(model: MetaRegression, loader, eval_steps: list[int]) -> dict[str, float]:
    """Meta-test query MSE, mean over tasks: after k gradient steps, and after the method's own adaptation."""
    sums = {f"gd{k}": 0.0 for k in eval_steps}
    sums["own"] = 0.0
    count = 0
    for xs, ys, xq, yq in loader:
        with torch.enable_grad():
            phi, _ = model.adapt(xs, ys, create_graph=False)
            sums["own"] += float(task_mse(model.net, phi.detach(), xq, yq).sum())
            for k in eval_steps:
                phi_k = gradient_steps(model.net, model.theta.detach(), xs, ys, k, model.eval_lr, create_graph=False)
                sums[f"gd{k}"] += float(task_mse(model.net, phi_k, xq, yq).sum())
        count += len(xs)
    return {key: value / count for key, value in sums.items()}


def train(method: str, seed: int, args, data: SinusoidDataModule) -> dict:
    torch.manual_seed(seed)
    model = make_model(method, seed, args)
    optimizer = model.configure_optimizers()
    loader = torch.utils.data.DataLoader(data.tasks("train"), batch_size=data.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    losses, nonstationary, inner_iters, step = [], [], [], 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    while step < args.meta_steps:
        for batch in loader:
            loss, _, metrics = meta_step(model, optimizer, batch)
            losses.append(loss)
            if metrics:
                nonstationary.append(metrics["inner/nonstationary_frac"])
                inner_iters.append(metrics["inner/iterations"])
            step += 1
            if step >= args.meta_steps:
                break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test_loader = torch.utils.data.DataLoader(data.tasks("test"), batch_size=100)
    result = {
        "method": method,
        "seed": seed,
        "meta_steps": args.meta_steps,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "seconds_per_meta_step": seconds / args.meta_steps,
        "final_train_loss": statistics.mean(losses[-50:]),
        "test_mse": evaluate(model, test_loader, args.eval_steps),
        "inner_nonstationary_frac": statistics.mean(nonstationary) if nonstationary else None,
        "inner_iterations_mean": statistics.mean(inner_iters) if inner_iters else None,
        "train_loss_curve": losses,
    }
    print(f"{method:5s} seed={seed} {seconds:6.1f}s test MSE " + " ".join(
        f"{k}={v:.3f}" for k, v in result["test_mse"].items()), flush=True)
    return result


def summarise(runs: list[dict], eval_steps: list[int]) -> list[dict]:
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, "seeds": len(mine)}
        for key in [f"gd{k}" for k in eval_steps] + ["own"]:
            values = [r["test_mse"][key] for r in mine]
            row[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        row["seconds_per_meta_step"] = statistics.mean(r["seconds_per_meta_step"] for r in mine)
        rows.append(row)
    return rows


def markdown(meta: dict, cost: list[dict], summary: list[dict]) -> str:
    steps = meta["eval_steps"]
    lines = [
        "# iMAML vs MAML: 10-shot sinusoid regression",
        "",
        f"`{meta['command']}` on {meta['device']} (1 thread), torch {meta['torch']}. MLP 1-40-40-1 (tanh), "
        f"meta-batch {meta['meta_batch']} tasks, Adam (lr {meta['meta_lr']}). MAML: {meta['maml_steps']} unrolled "
        f"gradient steps of size {meta['inner_lr']}. iMAML: lam = {meta['lam']}, inner heavy-ball descent "
        f"(lr {meta['imaml_inner_lr']}, momentum 0.9) to relative stationarity {meta['imaml_rtol']:g} "
        f"(at most {meta['imaml_max_iter']} iterations; tasks above it leave the meta-loss), CG to 1e-5.",
        "",
        f"## Meta-test MSE ({meta['test_tasks']} held-out tasks, mean +- std over seeds {meta['seeds']}, "
        f"{meta['meta_steps']} meta-steps each)",
        "",
        "| method | " + " | ".join(f"{k} GD steps" for k in steps) + " | own adaptation | s / meta-step |",
        "|---|" + "---:|" * (len(steps) + 2),
    ]
    for row in summary:
        cells = [f"{row[f'gd{k}'][0]:.3f} +- {row[f'gd{k}'][1]:.3f}" for k in steps]
        cells.append(f"{row['own'][0]:.3f} +- {row['own'][1]:.3f}")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['seconds_per_meta_step']:.3f} |")
    lines += [
        "",
        f"k GD steps: plain gradient steps of size {meta['inner_lr']} on the support MSE from the meta-learned "
        "initialisation (the same protocol for both). Own adaptation: MAML's unrolled steps; iMAML's proximal "
        "solve. Seconds per meta-step are wall time during training (shared machine).",
        "",
        "## Memory and time against the number of inner steps S (one meta-batch)",
        "",
        "| S | MAML saved (MiB) | iMAML saved (MiB) | MAML s / meta-step | iMAML s / meta-step |",
        "|---:|---:|---:|---:|---:|",
    ]
    by = {(r["steps"], r["method"]): r for r in cost}
    for s in sorted({r["steps"] for r in cost}):
        m, i = by[(s, "maml")], by[(s, "imaml")]
        lines.append(f"| {s} | {m['saved_bytes'] / 2**20:.2f} | {i['saved_bytes'] / 2**20:.2f} | "
                     f"{m['seconds_per_meta_step']:.3f} | {i['seconds_per_meta_step']:.3f} |")
    lines += [
        "",
        "Saved bytes: tensors held for backward (`SavedTensorCounter.live_bytes`) just before `backward()`. "
        f"Times: median of {meta['repeats']} interleaved meta-steps (wall).",
        "",
    ]
    return "\n".join(lines)


def plot(cost: list[dict], runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in METHODS:
        rows = sorted((r for r in cost if r["method"] == method), key=lambda r: r["steps"])
        ax1.plot([r["steps"] for r in rows], [r["saved_bytes"] / 2**20 for r in rows], "o-", label=method)
        curves = torch.tensor([r["train_loss_curve"] for r in runs if r["method"] == method])
        window = 20
        smooth = torch.nn.functional.avg_pool1d(curves.unsqueeze(1), window, stride=1).squeeze(1)
        x = torch.arange(window, curves.shape[1] + 1)
        ax2.plot(x, smooth.mean(0), label=method)
        ax2.fill_between(x, smooth.min(0).values, smooth.max(0).values, alpha=0.2)
    ax1.set(xscale="log", yscale="log", xlabel="inner steps S", ylabel="saved for backward (MiB)",
            title="memory of one meta-step")
    ax2.set(yscale="log", xlabel="meta-step", ylabel="meta-train query MSE", title="meta-training (min-max over seeds)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--imaml-rtol", type=float, default=1e-3)
    parser.add_argument("--meta-lr", type=float, default=3e-3)
    parser.add_argument("--test-tasks", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    parser.add_argument("--name", default="imaml_sinusoid")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.meta_steps, args.steps, args.repeats, args.test_tasks = [0, 1], 30, [1, 5], 2, 50
        args.name = args.name + "_quick"
    torch.set_num_threads(1)

    data = SinusoidDataModule(shots=10, query=10, test_tasks=args.test_tasks, batch_size=25)
    batch = next(iter(torch.utils.data.DataLoader(data.tasks("train"), batch_size=25)))
    cost = cost_vs_steps(args, batch)
    runs = [train(method, seed, args, data) for seed in args.seeds for method in METHODS]
    summary = summarise(runs, args.eval_steps)
    meta = {
        "command": "python benchmarks/imaml_sinusoid.py" + (" --quick" if args.quick else ""),
        "device": f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "seeds": args.seeds,
        "meta_steps": args.meta_steps,
        "meta_batch": 25,
        "meta_lr": args.meta_lr,
        "maml_steps": args.maml_steps,
        "inner_lr": args.inner_lr,
        "lam": args.lam,
        "imaml_inner_lr": args.imaml_inner_lr,
        "imaml_max_iter": args.imaml_max_iter,
        "imaml_rtol": args.imaml_rtol,
        "eval_steps": args.eval_steps,
        "test_tasks": args.test_tasks,
        "repeats": args.repeats,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "cost_vs_steps": cost, "summary": summary, "runs": runs}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(meta, cost, summary))
    plot(cost, runs, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
