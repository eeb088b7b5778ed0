"""Train vae, svi, savi_unrolled, savi_checkpointed and savi_ift with the same budget and compare them.

Each model trains through the real Hydra configs (`configs/model/<name>.yaml`, `ift.training`)
for the same number of epochs on the same data and seed. Reported per model: test ELBO at the
refined and at the amortized parameters, IWAE estimate of log p(x) (proposal = the model's own
q), KL, active units, learned gamma and wall-clock training time; plus a plot of validation ELBO
against wall-clock time. Writes JSON, markdown and PNG to benchmarks/results/.

    python benchmarks/savi_train_compare.py --epochs 20     # digits
For MNIST (several seeds, IWAE on 2000 test images, stationarity statistics) use
benchmarks/savi_mnist_study.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from ift.config import compose_config  # noqa: E402
from ift.training import run_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["vae", "svi", "savi_unrolled", "savi_checkpointed", "savi_ift"]


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


def markdown(results: list[dict], args) -> str:
    keys = [("test/elbo", "ELBO (refined)"), ("test/elbo_amortized", "ELBO (amortized)"),
            ("test/iwae_ll", f"IWAE log p(x), K={args.iwae_samples}"), ("test/kl", "KL"),
            ("test/active_units", "active units"), ("test/gamma", "gamma")]
    lines = ["| model | " + " | ".join(k[1] for k in keys) + " | train wall-clock s |",
             "|---|" + "---:|" * (len(keys) + 1)]
    for r in results:
        m = r["metrics"]
        lines.append(f"| {r['model']} | " + " | ".join(f"{m[k]:.3f}" if k != "test/gamma" else f"{m[k]:.4f}"
                                                       for k, _ in keys) + f" | {r['wall_clock_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-root", default=None, help="data.root, e.g. ../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iwae-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "logs" / "benchmarks" / "savi_train_compare")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.data == "mnist" and args.data_root is None:
        args.data_root = str(ROOT.parent / "shared" / "data" / "mnist")

    results = []
    for model in args.models:
        results.append(train_one(model, args, args.work_dir / args.data / model))
        print(f"{model}: {results[-1]['metrics'].get('test/elbo'):.3f} in {results[-1]['wall_clock_s']:.0f} s",
              flush=True)

    name = f"savi_train_compare_{args.data}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=2))
    cmd = f"python benchmarks/savi_train_compare.py --data {args.data} --epochs {args.epochs}"
    table = markdown(results, args)
    (RESULTS / f"{name}.md").write_text(f"Command: `{cmd}` (CPU, seed {args.seed})\n\n{table}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r["curve"]:
            t, e = zip(*r["curve"])
            ax.plot(t, e, marker=".", label=r["model"])
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("validation ELBO (refined)")
    ax.set_title(f"SAVI on {args.data}: ELBO against time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    print(table)


if __name__ == "__main__":
    main()
