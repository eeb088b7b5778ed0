"""SAVI on full MNIST: vae, svi, savi_unrolled, savi_checkpointed, savi_ift, several seeds each.

Every run trains through the real Hydra configs (`configs/model/<name>.yaml`, `ift.training`) on
the standard MNIST split (54k train / 6k validation carved from the 60k training set / 10k test)
for the same number of optimiser steps at batch 128, in its own process (so its peak RSS is its
own), with one torch thread. The last weights are then evaluated on the first --test-examples
images of the official test set:

- ELBO at the refined and at the amortized parameters (mean over --elbo-samples fresh noise draws),
  KL, active units (variance of the posterior mean across the test images > 0.01),
- IWAE log p(x) with --iwae-samples importance samples from the model's own q,
- inner-solve statistics on the test images (relative stationarity, fraction above tolerance,
  iterations) and, from the training log, their means over training steps,
- training wall-clock and process peak RSS;

plus validation ELBO (refined) against wall-clock on --val-batches validation batches every
--val-every steps. Each run writes `runs/<model>_s<seed>.json` under the results folder as soon as
it finishes (re-running skips finished runs); the summary (mean +- std over seeds), the markdown
table and the plot are rebuilt from those files after each run.

    python benchmarks/savi_mnist_study.py                       # the committed study (see --help)
    python benchmarks/savi_mnist_study.py --summarize-only      # rebuild table + plot from runs/
    python benchmarks/savi_mnist_study.py --quick               # smoke run (2 models, 1 seed, 4 steps)

Each run file carries its own provenance (``ift.bench``), so `make results-check` names the runs
made with older code; the summary's provenance is that of the summarising process.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ift import bench

NAME = "savi_mnist_study"
MODELS = ["vae", "svi", "savi_unrolled", "savi_checkpointed", "savi_ift"]
SOURCES = ["src/ift/savi", "src/ift/implicit", "src/ift/training.py", "src/ift/evaluation.py",
           "src/ift/data", "configs/model", "configs/train.yaml"]


def parse_args(argv=None):
    parser = bench.parser(__doc__)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per run (batch 128)")
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=2)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--iwae-samples", type=int, default=500)
    parser.add_argument("--elbo-samples", type=int, default=10)
    parser.add_argument("--data-root", type=Path, default=bench.REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="training logs and checkpoints (default logs/benchmarks/savi_mnist_study)")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--single", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seeds, args.steps, args.val_every, args.val_batches = ["vae", "savi_ift"], [0], 4, 2, 1
        args.test_examples, args.iwae_samples, args.elbo_samples = 250, 5, 2
    if args.work_dir is None:
        args.work_dir = (Path(tempfile.mkdtemp(prefix="savi_mnist_quick_")) if args.quick
                         else bench.REPO / "logs" / "benchmarks" / NAME)
    args.study_dir = bench.out_dir(args) / NAME  # runs/<model>_s<seed>.json
    return args


# --- one run (in its own process) --------------------------------------------------------------
class ValidationClock:
    """Lightning callback: (seconds since fit start, step, val/elbo) after every validation."""

    def __init__(self, path: str) -> None:
        import lightning.pytorch as pl

        self.__class__ = type("ValidationClockCallback", (ValidationClock, pl.Callback), {})
        self.path, self.start, self.curve = Path(path), 0.0, []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/elbo" in trainer.callback_metrics:
            self.curve.append((time.perf_counter() - self.start, trainer.global_step,
                               float(trainer.callback_metrics["val/elbo"])))
            self.path.write_text(json.dumps(self.curve))


def train_and_evaluate(model: str, seed: int, args) -> dict:
    from omegaconf import open_dict

    from ift.config import compose_config
    from ift.training import run_training

    run_dir = args.work_dir / f"{model}_s{seed}"
    overrides = [f"model={model}", "data=mnist", f"data.root={args.data_root.resolve()}", "logger=csv", "trainer=cpu",
                 f"seed={seed}", "trainer.max_epochs=1", f"trainer.max_steps={args.steps}",
                 f"trainer.val_check_interval={args.val_every}", f"trainer.limit_val_batches={args.val_batches}",
                 "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "test=false"]
    cfg = compose_config("train", overrides, run_dir)
    with open_dict(cfg):
        cfg.callbacks.clock = {"_target_": f"{__name__}.ValidationClock", "path": str(run_dir / "val_curve.json")}
    start = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - start
    metrics = evaluate(run_dir, args)
    return {"model": model, "seed": seed, "steps": args.steps, "train_wall_clock_s": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "metrics": {**metrics, **training_log_stats(run_dir)},
            "curve": json.loads((run_dir / "val_curve.json").read_text())}


@torch.no_grad()
def evaluate(run_dir: Path, args) -> dict:
    """Refine once on the test images; ELBOs, KL, active units, IWAE and inner-solve statistics."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ift.checkpoints import load_checkpoint
    from ift.evaluation import build_model

    last = run_dir / "checkpoints" / "last.ckpt"
    run_cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    module = build_model(run_cfg, load_checkpoint(last), last).eval()
    datamodule = instantiate(run_cfg.data)
    datamodule.setup("test")
    x_all = datamodule.test_set.float_images()[: args.test_examples].flatten(1)
    gen = torch.Generator().manual_seed(1234)
    vae = module.vae
    sums: dict[str, float] = {}
    mus, stat = [], []
    for x in x_all.split(250):
        lam0 = vae.encode(x)
        eps_inner = vae.sample_eps(x.shape[0], module.hparams.inner_samples, generator=gen, like=x)
        result = module.refine(x, lam0, eps_inner)
        eps = vae.sample_eps(x.shape[0], args.elbo_samples, generator=gen, like=x)
        recon, kl = vae.elbo_terms(x, result.x, eps)
        # the ELBO on the inner problem's own noise: how much lambda_K overfits its fixed draws
        parts = {"elbo": recon - kl, "elbo_amortized": vae.elbo(x, lam0, eps), "kl": kl,
                 "elbo_inner_noise": vae.elbo(x, result.x, eps_inner),
                 "iwae_ll": vae.iwae_log_likelihood(x, result.x, n_samples=args.iwae_samples, chunk=100, generator=gen),
                 "iterations": result.iterations.float(), "nonstationary": result.nonstationary.float(),
                 "diverged": result.diverged.float()}
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value.sum())
        mus.append(result.x.chunk(2, dim=-1)[0])
        stat.append(result.stationarity)
    n = x_all.shape[0]
    out = {f"test/{k}": v / n for k, v in sums.items()}
    out["test/active_units"] = float((torch.cat(mus).var(dim=0) > 0.01).sum())
    stat = torch.cat(stat)
    out["test/stationarity_median"] = float(stat.median())
    out["test/stationarity_max"] = float(stat.max())
    out["test/examples"] = n
    out["gamma"] = float(vae.gamma)
    return out


def training_log_stats(run_dir: Path) -> dict:
    """Means over training steps of the inner-solve metrics in the CSV log."""
    import csv

    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:
        return {}
    rows = list(csv.DictReader(files[-1].open()))
    out = {}
    for key in ("inner/stationarity", "inner/stationarity_max", "inner/nonstationary_frac", "inner/steps_taken",
                "inner/fallback", "perf/step_time_s"):
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if values:
            out[f"train_mean/{key}"] = statistics.fmean(values)
    return out


# --- the study ---------------------------------------------------------------------------------
def run_one(model: str, seed: int, args) -> Path:
    """One run in a fresh process (its peak RSS its own), which writes runs/<model>_s<seed>.json."""
    cmd = [sys.executable, __file__, "--single", model, str(seed), "--steps", str(args.steps),
           "--val-every", str(args.val_every), "--val-batches", str(args.val_batches),
           "--test-examples", str(args.test_examples), "--iwae-samples", str(args.iwae_samples),
           "--elbo-samples", str(args.elbo_samples), "--data-root", str(args.data_root),
           "--work-dir", str(args.work_dir), "--out", str(bench.out_dir(args))] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{model} seed {seed} failed:\n{out.stderr[-3000:]}")
    return run_path(args, model, seed)


def run_path(args, model: str, seed: int) -> Path:
    return args.study_dir / "runs" / f"{model}_s{seed}.json"


COLUMNS = [("test/elbo", "ELBO refined", 2), ("test/elbo_amortized", "ELBO amortized", 2),
           ("test/iwae_ll", "IWAE log p(x)", 2), ("test/elbo_inner_noise", "ELBO refined, on inner noise", 2),
           ("test/kl", "KL", 2), ("test/active_units", "active units", 1),
           ("test/stationarity_median", "test stationarity (median)", None),
           ("test/nonstationary", "test frac > tol", None), ("test/iterations", "test inner iters", 1),
           ("train_mean/inner/nonstationary_frac", "train frac > tol", None),
           ("train_wall_clock_s", "train wall-clock s", 0), ("peak_rss_mb", "peak RSS MB", 0)]


def value(run: dict, key: str) -> float | None:
    return run.get(key, run["metrics"].get(key))


def fmt(values: list[float], digits: int | None) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    if digits is None:
        return f"{mean:.1e} ± {std:.0e}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(args) -> None:
    runs = [json.loads(p.read_text()) for p in sorted((args.study_dir / "runs").glob("*.json"))]
    if not runs:
        return
    run = bench.Run(NAME, SOURCES, args)
    by_model = {m: [r for r in runs if r["model"] == m] for m in MODELS if any(r["model"] == m for r in runs)}
    summary = {}
    rows = []
    for model, rs in by_model.items():
        cells, summary[model] = [], {"seeds": [r["seed"] for r in rs]}
        for key, _, digits in COLUMNS:
            vals = [v for v in (value(r, key) for r in rs) if v is not None and not math.isnan(v)]
            if model == "vae" and key in ("test/stationarity_median", "test/nonstationary", "test/iterations",
                                          "train_mean/inner/nonstationary_frac"):
                vals = []
            summary[model][key] = {"mean": statistics.fmean(vals) if vals else None,
                                   "std": statistics.stdev(vals) if len(vals) > 1 else None, "values": vals}
            cells.append(fmt(vals, digits))
        rows.append([model, len(rs), *cells])
    paired = []
    base = {r["seed"]: r for r in by_model.get("savi_unrolled", [])}
    for model, rs in by_model.items():
        pairs = [(r, base[r["seed"]]) for r in rs if r["seed"] in base and model != "savi_unrolled"]
        if not pairs:
            continue
        d_elbo = [a["metrics"]["test/elbo"] - b["metrics"]["test/elbo"] for a, b in pairs]
        d_iwae = [a["metrics"]["test/iwae_ll"] - b["metrics"]["test/iwae_ll"] for a, b in pairs]
        ratio = [a["train_wall_clock_s"] / b["train_wall_clock_s"] for a, b in pairs]
        summary[model]["paired_vs_savi_unrolled"] = {"elbo": d_elbo, "iwae_ll": d_iwae, "wall_clock_ratio": ratio}
        paired.append([model, len(pairs), fmt(d_elbo, 2), fmt(d_iwae, 2), fmt(ratio, 2)])
    steps = runs[0]["steps"]
    markdown = (
        f"# SAVI on MNIST\n\n{bench.describe(run.environment)}; one torch thread per run, batch 128, {steps} "
        f"optimiser steps = {steps * 128} training images; test metrics on the first "
        f"{int(runs[0]['metrics']['test/examples'])} official test images, IWAE with {args.iwae_samples} samples; "
        "mean ± std over seeds. Runs are in `savi_mnist_study/runs/`, each with its own provenance.\n\n"
        + bench.table(["model", "seeds", *(c[1] for c in COLUMNS)], rows)
        + "\nPaired by seed (same initialisation and data order), differences to `savi_unrolled`:\n\n"
        + bench.table(["model - savi_unrolled", "seeds", "ELBO refined", "IWAE log p(x)", "train wall-clock ratio"],
                      paired))
    run.write({"summary": summary, "runs": [f"{NAME}/runs/{r['model']}_s{r['seed']}.json" for r in runs]},
              markdown, figures={f"{NAME}.png": plot(by_model)})


def plot(by_model: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (model, rs) in enumerate(by_model.items()):
        for j, r in enumerate(rs):
            if r["curve"]:
                t, _, e = zip(*r["curve"])
                ax.plot(t, e, marker=".", color=f"C{i}", alpha=0.8, label=model if j == 0 else None)
    ax.set_xlabel("training wall-clock (s, incl. validation)")
    ax.set_ylabel("validation ELBO (refined)")
    ax.set_title("SAVI on MNIST: validation ELBO against wall-clock (one line per seed)")
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.single:
        model, seed = args.single[0], int(args.single[1])
        record = train_and_evaluate(model, seed, args)
        bench.Run(f"{model}_s{seed}", SOURCES, args, out=args.study_dir / "runs").write(record)
        return
    if not (args.data_root / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"savi_mnist_study: no MNIST idx files in {args.data_root}; pass --data-root DIR")
    if not args.summarize_only:
        for seed in args.seeds:  # seeds outermost: a partial study still covers every model
            for model in args.models:
                if run_path(args, model, seed).exists():
                    continue
                start = time.perf_counter()
                record = json.loads(run_one(model, seed, args).read_text())
                m = record["metrics"]
                print(f"{model} seed {seed}: test ELBO {m['test/elbo']:.2f} (amortized {m['test/elbo_amortized']:.2f}), "
                      f"IWAE {m['test/iwae_ll']:.2f}, train {record['train_wall_clock_s']:.0f} s, "
                      f"run {time.perf_counter() - start:.0f} s", flush=True)
                summarize(args)
    summarize(args)


if __name__ == "__main__":
    main()
