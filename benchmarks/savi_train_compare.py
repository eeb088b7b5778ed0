"""Train vae, svi, savi_unrolled, savi_checkpointed and savi_ift with the same budget and compare them.

Each model trains through the real Hydra configs (`configs/model/<name>.yaml`, `ift.training`)
for the same number of epochs on the same data and seed. Reported per model: test ELBO at the
refined and at the amortized parameters, IWAE estimate of log p(x) (proposal = the model's own
q), KL, active units, learned gamma and wall-clock training time; plus a plot of validation ELBO
against wall-clock time. Writes JSON, markdown and PNG through ``ift.bench`` (to benchmarks/results/
by default).

    python benchmarks/savi_train_compare.py --epochs 20     # digits
    python benchmarks/savi_train_compare.py --quick         # smoke run (2 models, 1 epoch)
For MNIST (several seeds, IWAE on 2000 test images, stationarity statistics) use
benchmarks/savi_mnist_study.py.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from ift import bench  # noqa: E402
from ift.config import compose_config  # noqa: E402
from ift.training import run_training  # noqa: E402

MODELS = ["vae", "svi", "savi_unrolled", "savi_checkpointed", "savi_ift"]
SOURCES = ["src/ift/savi", "src/ift/implicit", "src/ift/training.py", "src/ift/evaluation.py",
           "src/ift/data", "configs/model", "configs/train.yaml"]


class ValidationClock(pl.Callback):
    """Writes [(seconds since fit start, val/elbo), ...] to `path` after every validation epoch."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.start = 0.0
        self.curve: list[tuple[float, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val/elbo" in trainer.callback_metrics:
            self.curve.append((time.perf_counter() - self.start, float(trainer.callback_metrics["val/elbo"])))
            self.path.write_text(json.dumps(self.curve))


def train_one(model: str, args, run_dir: Path) -> dict:
    overrides = [f"model={model}", f"data={args.data}", "logger=csv", "trainer=cpu",
                 f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
                 f"seed={args.seed}"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    cfg = compose_config("train", overrides, run_dir)
    with open_dict(cfg):
        cfg.callbacks.clock = {"_target_": f"{__name__}.ValidationClock", "path": str(run_dir / "val_curve.json")}
    start = time.perf_counter()
    metrics = run_training(cfg)
    wall = time.perf_counter() - start
    iwae = evaluate_iwae(run_dir, args)
    return {"model": model, "wall_clock_s": wall, "metrics": {**metrics, **iwae},
            "curve": json.loads((run_dir / "val_curve.json").read_text())}


def evaluate_iwae(run_dir: Path, args) -> dict:
    """The same evaluation eval.py runs, on the best checkpoint."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ift.checkpoints import load_checkpoint
    from ift.evaluation import build_model

    best = json.loads((run_dir / "test_metrics.json").read_text())["ckpt_path"]
    run_cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    model = build_model(run_cfg, load_checkpoint(Path(best)), Path(best))
    datamodule = instantiate(run_cfg.data)
    return model.evaluate_extra(datamodule, {"iwae_samples": args.iwae_samples, "iwae_chunk": 100}, run_dir)


def markdown(results: list[dict], args, env: dict) -> str:
    keys = [("test/elbo", "ELBO (refined)"), ("test/elbo_amortized", "ELBO (amortized)"),
            ("test/iwae_ll", f"IWAE log p(x), K={args.iwae_samples}"), ("test/kl", "KL"),
            ("test/active_units", "active units"), ("test/gamma", "gamma")]
    rows = [[r["model"], *(f"{r['metrics'][k]:.3f}" if k != "test/gamma" else f"{r['metrics'][k]:.4f}" for k, _ in keys),
             f"{r['wall_clock_s']:.0f}"] for r in results]
    return (f"# SAVI models on {args.data}, {args.epochs} epochs\n\n{bench.describe(env)}; seed {args.seed}, "
            "test metrics at the best checkpoint.\n\n"
            + bench.table(["model", *(k[1] for k in keys), "train wall-clock s"], rows))


def plot(results: list[dict], data: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r["curve"]:
            t, e = zip(*r["curve"])
            ax.plot(t, e, marker=".", label=r["model"])
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("validation ELBO (refined)")
    ax.set_title(f"SAVI on {data}: ELBO against time")
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    parser = bench.parser(__doc__)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-root", type=Path, default=None, help="data.root (default for mnist: ../shared/data/mnist)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iwae-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="training logs and checkpoints (default logs/benchmarks/savi_train_compare)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.epochs, args.iwae_samples = ["vae", "savi_ift"], 1, 5
    if args.work_dir is None:
        args.work_dir = (Path(tempfile.mkdtemp(prefix="savi_train_compare_quick_")) if args.quick
                         else bench.REPO / "logs" / "benchmarks" / "savi_train_compare")
    torch.set_num_threads(args.threads)
    if args.data == "mnist" and args.data_root is None:
        args.data_root = bench.REPO.parent / "shared" / "data" / "mnist"
    if args.data_root is not None:
        args.data_root = args.data_root.resolve()
    run = bench.Run(f"savi_train_compare_{args.data}", SOURCES, args)

    results = []
    for model in args.models:
        results.append(train_one(model, args, args.work_dir / args.data / model))
        print(f"{model}: {results[-1]['metrics'].get('test/elbo'):.3f} in {results[-1]['wall_clock_s']:.0f} s",
              flush=True)
    text = markdown(results, args, run.environment)
    run.write({"results": results}, text, figures={f"savi_train_compare_{args.data}.png": plot(results, args.data)})
    print(text)


if __name__ == "__main__":
    main()
