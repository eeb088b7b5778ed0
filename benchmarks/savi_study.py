"""The SAVI study (issue 26): every model trained to a stated stopping rule on digits and MNIST.

Models (`MODELS`), each trained through the real Hydra configs (`configs/model/*.yaml`,
`ift.training`) in its own process (so its peak RSS is its own), one torch thread on CPU:

- `vae`: amortized VAE, trained to its own plateau (early stopping on validation ELBO);
- `vae_equal_time`: the VAE given the training wall-clock of the slowest SAVI mode of the same seed
  (Lightning's `max_time`, no early stopping);
- `vae_svi`: `vae`'s best checkpoint refined per example at test time by the SVI inner solve
  (damped Newton, no proximal term, to `model.inner.tol`): Kim et al.'s VAE+SVI. No training of its own;
- `svi`: `model=svi` (decoder trained at the refined lambda, encoder on its amortized ELBO);
- `savi_kim`: Kim et al.'s SA-VAE loop (`model=savi_kim`: SGD lr 1, momentum 0.5, clip 5, 20 steps,
  no tolerance, no proximal term, gradients by unrolling);
- `savi_unrolled`, `savi_ift` (damped Newton to tolerance, eta = 1) and `savi_reversible`
  (Kim et al.'s loop with eta = 1 as in its config, reversed exactly instead of stored).

Stopping rule: early stopping on `val/loss` (= minus the refined validation ELBO) with
`--patience` validations and `--min-delta` nats, capped by `max_epochs` and, on MNIST, by a step
budget for the refining models (the VAE goes to its plateau). The best checkpoint (by validation
ELBO) is evaluated. `plateau` is `true` when the last 20 % of training (by steps) improved the best
validation ELBO by < 0.5 nats, else the slope of validation ELBO over that window in nats per 1000
steps.

Evaluation on the test images (all of digits' test split, the first `--test-examples` of MNIST's
official test set): IWAE log p(x) with `--iwae-samples` importance samples from the model's own q,
refined and amortized ELBO (mean over fresh noise), amortization gap, KL, active units, inner
stationarity, and the spectral norm of d lambda_K / d lambda_0 (autograd through the inner solver
itself, on `--jacobian-examples` images). From training: wall-clock, steps, saved-tensor bytes at
backward (`ift.telemetry.SavedTensorCounter`, every `--saved-every` steps), peak RSS, inner-solve
statistics and, for `savi_ift`, `linsolve_unconverged` (backward CG solves above tolerance,
summed over training steps). The eta sweep (digits) retrains savi_ift and savi_unrolled at each
`--etas` value (`none`: no proximal term); eta = 1 reuses the main runs.

Each run writes `savi_study/runs/<dataset>/<run>.json` (with its own provenance) as soon as it
finishes; a run whose file exists is skipped (an interrupted run restarts from scratch, so its
wall-clock is one process's). The aggregate `savi_study.{json,md}` and the figures are rebuilt
after every run; `"complete": false` marks a partial study.

    nohup python benchmarks/savi_study.py --datasets digits > savi_study_digits.log 2>&1 &
    python benchmarks/savi_study.py --datasets mnist --jobs 2          # the CPU MNIST part (2 cores)
    python benchmarks/savi_study.py --datasets mnist --device cuda --mnist-max-steps 0   # GPU: all to plateau
    python benchmarks/savi_study.py --summarize-only                    # rebuild from runs/
    python benchmarks/savi_study.py --quick                             # smoke run (numbers meaningless)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ift import bench

NAME = "savi_study"
MODELS = ["vae", "vae_equal_time", "vae_svi", "svi", "savi_kim", "savi_unrolled", "savi_ift", "savi_reversible"]
SAVI = ["savi_kim", "savi_unrolled", "savi_ift", "savi_reversible"]  # vae_equal_time matches the slowest
CONFIG = {"vae": "vae", "vae_equal_time": "vae", "svi": "svi", "savi_kim": "savi_kim",
          "savi_unrolled": "savi_unrolled", "savi_ift": "savi_ift", "savi_reversible": "savi_reversible"}
SWEEP_MODES = ["savi_ift", "savi_unrolled"]
DATASETS = ("digits", "mnist")
SOURCES = ["src/ift/savi", "src/ift/implicit", "src/ift/training.py", "src/ift/data", "src/ift/telemetry",
           *(f"configs/model/{m}.yaml" for m in ("vae", "svi", "savi_kim", "savi_unrolled", "savi_ift", "savi_reversible")),
           "configs/train.yaml", "configs/data/digits.yaml", "configs/data/mnist.yaml"]
PLATEAU_WINDOW, PLATEAU_NATS = 0.2, 0.5
# settings that, set below the study's defaults, make a result partial
REDUCIBLE = ("digits_max_epochs", "digits_vae_max_epochs", "mnist_max_epochs", "mnist_max_steps", "mnist_val_batches", "patience", "min_delta",
             "test_examples", "iwae_samples", "elbo_samples", "jacobian_examples")


def eta_name(eta: float | None) -> str:
    return "none" if eta is None else f"{eta:g}"


def parse_eta(text: str) -> float | None:
    if text.lower() in ("none", "null", "inf"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--etas: {text} is not > 0; give positive numbers or 'none'")
    return value


def parse_args(argv=None):
    p = bench.parser(__doc__)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    p.add_argument("--digits-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--mnist-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--digits-max-epochs", type=int, default=1000, help="cap for the refining digits models")
    p.add_argument("--digits-vae-max-epochs", type=int, default=1000,
                   help="cap for digits vae / vae_equal_time's epochs (vae_equal_time stops at its time)")
    p.add_argument("--mnist-max-epochs", type=int, default=50, help="cap for every MNIST model (the VAE's plateau)")
    p.add_argument("--mnist-max-steps", type=int, default=1500,
                   help="step budget of the refining MNIST models (0: none, early stopping only: the GPU setting)")
    p.add_argument("--mnist-val-every", type=int, default=250, help="MNIST: validate every N training steps")
    p.add_argument("--mnist-val-batches", type=int, default=10, help="MNIST: validation batches of 128 (digits: all)")
    p.add_argument("--patience", type=int, default=None, help="validations without improvement (digits 20, MNIST 5)")
    p.add_argument("--min-delta", type=float, default=0.1, help="nats: smaller improvements do not count")
    p.add_argument("--test-examples", type=int, default=2000, help="MNIST test images evaluated (digits: all)")
    p.add_argument("--iwae-samples", type=int, default=1000)
    p.add_argument("--elbo-samples", type=int, default=10)
    p.add_argument("--jacobian-examples", type=int, default=100)
    p.add_argument("--saved-every", type=int, default=100, help="count saved-tensor bytes every N steps")
    p.add_argument("--etas", nargs="+", type=parse_eta, default=[1.0, 10.0, 100.0, None])
    p.add_argument("--eta-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--no-eta-sweep", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (trainer=gpu)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each on CPU)")
    p.add_argument("--data-root", type=Path, default=bench.REPO.parent / "shared" / "data" / "mnist")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="training logs and checkpoints (default logs/benchmarks/savi_study)")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--single", nargs=4, metavar=("DATASET", "MODEL", "SEED", "ETA"), help=argparse.SUPPRESS)
    p.add_argument("--match-seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.digits_seeds, args.mnist_seeds, args.eta_seeds = [0], [0], [0]
        args.digits_max_epochs, args.digits_vae_max_epochs, args.mnist_max_epochs, args.mnist_max_steps = 3, 3, 1, 4
        args.mnist_val_every, args.mnist_val_batches, args.patience = 2, 1, 1
        args.test_examples, args.iwae_samples, args.elbo_samples, args.jacobian_examples = 40, 8, 2, 4
        args.saved_every, args.etas = 2, [None]
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.work_dir is None:
        args.work_dir = (Path(tempfile.mkdtemp(prefix="savi_study_quick_")) if args.quick
                         else bench.REPO / "logs" / "benchmarks" / NAME)
    args.study_dir = bench.out_dir(args) / NAME
    return args


# --- the runs ------------------------------------------------------------------------------------
def run_name(model: str, seed: int, eta: float | None = 1.0) -> str:
    """`<model>_s<seed>`; an eta-sweep run other than eta = 1 (the main runs' setting): `<model>_eta<eta>_s<seed>`."""
    return f"{model}_s{seed}" if eta == 1.0 else f"{model}_eta{eta_name(eta)}_s{seed}"


def run_path(args, dataset: str, name: str) -> Path:
    return args.study_dir / "runs" / dataset / f"{name}.json"


def plan(args) -> list[tuple[str, str, int, float | None, list[str]]]:
    """(dataset, model, seed, eta, names it waits for), seeds outermost: a partial study covers every model."""
    tasks = []
    for dataset in args.datasets:
        seeds = args.digits_seeds if dataset == "digits" else args.mnist_seeds
        for seed in seeds:
            for model in (m for m in MODELS if m in args.models):
                deps = []
                if model == "vae_svi":
                    deps = [run_name("vae", seed)]
                elif model == "vae_equal_time":
                    deps = [run_name(m, seed) for m in SAVI if m in args.models]
                tasks.append((dataset, model, seed, 1.0, deps))
        if dataset == "digits" and not args.no_eta_sweep:
            main = {(t[1], t[2], t[3]) for t in tasks if t[0] == dataset}
            for seed in args.eta_seeds:
                for model in SWEEP_MODES:
                    for eta in args.etas:
                        if (model, seed, eta) not in main:  # eta = 1 of a main model and seed: the main run
                            tasks.append((dataset, model, seed, eta, []))
    return tasks


def schedule(args) -> None:
    """Run every missing task, up to --jobs at a time, each after the runs it depends on."""
    pending = [t for t in plan(args) if not run_path(args, t[0], run_name(t[1], t[2], t[3])).exists()]
    running: dict[str, tuple[subprocess.Popen, float, tuple]] = {}
    failed: set[str] = set()
    while pending or running:
        for key, (proc, start, task) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            dataset, model, seed, eta, _ = task
            if proc.returncode != 0:
                failed.add(key)
                log_file = args.work_dir / dataset / run_name(model, seed, eta) / "study_run.log"
                tail = log_file.read_text()[-2500:] if log_file.exists() else ""
                print(f"FAILED {key} (exit {proc.returncode}); log {log_file}:\n{tail}", flush=True)
                continue
            record = json.loads(run_path(args, dataset, run_name(model, seed, eta)).read_text())
            m = record["test"]
            print(f"{key}: IWAE {m['iwae']:.2f}, ELBO {m['elbo']:.2f} (amortized {m['elbo_amortized']:.2f}), "
                  f"{record['train']['steps']} steps, train {record['train']['wall_clock_s']:.0f} s, "
                  f"run {time.perf_counter() - start:.0f} s", flush=True)
            summarize(args)
        for task in list(pending):
            if len(running) >= args.jobs:
                break
            dataset, model, seed, eta, deps = task
            key = f"{dataset}/{run_name(model, seed, eta)}"
            if any(f"{dataset}/{d}" in failed for d in deps):
                pending.remove(task)
                failed.add(key)
                print(f"SKIPPED {key}: a run it needs failed", flush=True)
                continue
            if not all(run_path(args, dataset, d).exists() for d in deps):
                continue
            pending.remove(task)
            running[key] = (launch(args, task), time.perf_counter(), task)
        time.sleep(0.5)
    summarize(args)
    if failed:
        sys.exit(f"savi_study: {len(failed)} run(s) failed or skipped: {sorted(failed)}")


def launch(args, task) -> subprocess.Popen:
    dataset, model, seed, eta, deps = task
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", dataset, model, str(seed), eta_name(eta)]
    if model == "vae_equal_time":
        walls = [json.loads(run_path(args, dataset, d).read_text())["train"]["wall_clock_s"] for d in deps]
        cmd += ["--match-seconds", f"{max(walls):.3f}"]
    for flag in ("digits_max_epochs", "digits_vae_max_epochs", "mnist_max_epochs", "mnist_max_steps", "mnist_val_every", "mnist_val_batches",
                 "patience", "min_delta", "test_examples", "iwae_samples", "elbo_samples", "jacobian_examples",
                 "saved_every", "device", "data_root", "work_dir"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    cmd += ["--out", str(bench.out_dir(args))] + (["--quick"] if args.quick else [])
    log_dir = args.work_dir / dataset / run_name(model, seed, eta)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(cmd, stdout=(log_dir / "study_run.log").open("w"), stderr=subprocess.STDOUT, env=env)


class StudyRecorder:
    """Lightning callback: the validation curve (seconds since fit start, step, val ELBO refined and
    amortized), the fit's wall-clock and summed training-step seconds, and the bytes saved for
    backward every `saved_every` steps (`SavedTensorCounter`, read when backward starts)."""

    def __init__(self, path: str, saved_every: int) -> None:
        import lightning.pytorch as pl

        self.__class__ = type("StudyRecorderCallback", (StudyRecorder, pl.Callback), {})
        self.path, self.saved_every = Path(path), saved_every
        self.start, self.step_start, self.step_seconds, self.fit_seconds = 0.0, 0.0, 0.0, 0.0
        self.curve: list[tuple[float, int, float, float]] = []
        self.saved_mib: list[float] = []
        self._counter = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from ift.telemetry.saved_tensors import SavedTensorCounter

        if self.saved_every and trainer.global_step % self.saved_every == 0:
            self._counter = SavedTensorCounter().__enter__()
        self.step_start = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._counter is not None:
            self.saved_mib.append(self._counter.live_bytes / 2**20)
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds += time.perf_counter() - self.step_start

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and "val/elbo" in metrics:
            self.curve.append((time.perf_counter() - self.start, trainer.global_step, float(metrics["val/elbo"]),
                               float(metrics.get("val/elbo_amortized", math.nan))))
            self.dump()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_seconds = time.perf_counter() - self.start
        self.dump()

    def dump(self) -> None:
        self.path.write_text(json.dumps({"curve": self.curve, "saved_mib": self.saved_mib,
                                         "step_seconds": self.step_seconds, "fit_seconds": self.fit_seconds}))


def overrides_for(dataset: str, model: str, seed: int, eta: float | None, args) -> list[str]:
    over = [f"model={CONFIG[model]}", f"data={dataset}", "logger=csv", f"seed={seed}", "test=false",
            "trainer=gpu" if args.device.startswith("cuda") else "trainer=cpu", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0"]
    if not args.device.startswith("cuda"):
        over.append("threads=1")
    if args.quick:
        over.append("trainer.limit_train_batches=6")
    if eta != 1.0:
        over.append(f"model.inner.eta={'null' if eta is None else eta}")
    if dataset == "mnist":
        refining = model not in ("vae", "vae_equal_time")
        over += [f"data.root={args.data_root.resolve()}", f"trainer.max_epochs={args.mnist_max_epochs}",
                 f"trainer.val_check_interval={args.mnist_val_every}",
                 f"trainer.limit_val_batches={args.mnist_val_batches}"]
        if refining and args.mnist_max_steps:
            over.append(f"trainer.max_steps={args.mnist_max_steps}")
    else:  # the VAE goes to its own plateau whatever the refining models' cap
        refining = model not in ("vae", "vae_equal_time")
        over.append(f"trainer.max_epochs={args.digits_max_epochs if refining else args.digits_vae_max_epochs}")
    if model == "vae_equal_time":
        over += ["trainer.max_epochs=-1" if dataset == "digits" else f"trainer.max_epochs={10 * args.mnist_max_epochs}",
                 f"trainer.max_time='{hms(args.match_seconds)}'"]
    return over


def hms(seconds: float) -> str:
    """Lightning's max_time string DD:HH:MM:SS, rounded up to whole seconds."""
    s = math.ceil(seconds)
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def patience(dataset: str, args) -> int:
    return args.patience if args.patience is not None else (20 if dataset == "digits" else 5)


def train(dataset: str, model: str, seed: int, eta: float | None, args) -> dict:
    from omegaconf import open_dict

    from ift.config import compose_config
    from ift.telemetry.callback import process_peak_rss_mb
    from ift.training import run_training

    run_dir = args.work_dir / dataset / run_name(model, seed, eta)
    cfg = compose_config("train", overrides_for(dataset, model, seed, eta, args), run_dir)
    recorder_path = run_dir / "study_recorder.json"
    with open_dict(cfg):
        cfg.callbacks.study = {"_target_": f"{__name__}.StudyRecorder", "path": str(recorder_path),
                               "saved_every": args.saved_every}
        if model != "vae_equal_time":
            cfg.callbacks.early_stopping = {"_target_": "lightning.pytorch.callbacks.EarlyStopping",
                                            "monitor": "val/loss", "mode": "min", "patience": patience(dataset, args),
                                            "min_delta": args.min_delta, "check_on_train_epoch_end": False}
    run_training(cfg)
    rss = process_peak_rss_mb()
    rec = json.loads(recorder_path.read_text())
    stats = training_log_stats(run_dir)
    steps = int(stats.pop("steps"))
    return {"run_dir": bench.relative(run_dir), "best_checkpoint": bench.relative(best_checkpoint(run_dir)),
            "wall_clock_s": rec["fit_seconds"], "step_seconds": rec["step_seconds"], "steps": steps,
            "peak_rss_mb": rss, "saved_tensor_mib": max(rec["saved_mib"]) if rec["saved_mib"] else None,
            "saved_tensor_mib_median": statistics.median(rec["saved_mib"]) if rec["saved_mib"] else None,
            "curve": rec["curve"], "plateau": plateau(rec["curve"], steps),
            # a run that peaked and then collapsed also "plateaus" by the rule: the drop shows it
            "val_elbo_best": max((e for _, _, e, _ in rec["curve"]), default=None),
            "val_elbo_last": rec["curve"][-1][2] if rec["curve"] else None, **stats}


def best_checkpoint(run_dir: Path) -> Path:
    best = sorted(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name not in ("last.ckpt", "interrupted.ckpt"))
    if not best:
        raise RuntimeError(f"no best checkpoint in {run_dir / 'checkpoints'}: did validation run?")
    return best[-1]


def plateau(curve: list, steps: int) -> bool | float:
    """True if the last 20 % of training (by steps) raised the best validation ELBO by < 0.5 nats; else
    the least-squares slope of validation ELBO over that window, nats per 1000 steps."""
    if not curve:
        return math.nan
    cut = steps * (1 - PLATEAU_WINDOW)
    before = [e for _, s, e, _ in curve if s <= cut]
    window = [(s, e) for _, s, e, _ in curve if s > cut]
    if not window:
        return math.nan
    if before and max(e for _, e in window) - max(before) < PLATEAU_NATS:
        return True
    if len(window) < 2:
        return math.nan
    ms, me = statistics.fmean(s for s, _ in window), statistics.fmean(e for _, e in window)
    var = sum((s - ms) ** 2 for s, _ in window)
    return 1000 * sum((s - ms) * (e - me) for s, e in window) / var if var else math.nan


def training_log_stats(run_dir: Path) -> dict:
    """From the CSV log: steps; means of the inner-solve metrics over training steps; for savi_ift the
    examples trained at lambda_0 and the backward CG solves that did not reach tolerance (summed)."""
    files = sorted(run_dir.rglob("metrics.csv"))
    rows = list(csv.DictReader(files[-1].open())) if files else []

    def column(key):
        return [float(r[key]) for r in rows if r.get(key) not in (None, "")]

    steps = [int(r["step"]) for r in rows if r.get("train/elbo") not in (None, "")]
    out = {"steps": max(steps) + 1 if steps else 0}
    for key, name in (("inner/nonstationary_frac", "train_nonstationary_frac"), ("inner/steps_taken", "train_inner_iters"),
                      ("inner/stationarity", "train_stationarity_median"), ("ift/linsolve_iters", "linsolve_iters")):
        values = column(key)
        if values:
            out[name] = statistics.fmean(values)
    for key, name in (("inner/fallback", "fallback_examples"), ("ift/linsolve_unconverged", "linsolve_unconverged")):
        values = column(key)
        if values:
            out[name] = int(sum(values))
    if column("ift/linsolve_residual"):
        out["linsolve_residual_max"] = max(column("ift/linsolve_residual"))
        out["linsolve_solves"] = len(column("ift/linsolve_residual"))
    return out


# --- evaluation ----------------------------------------------------------------------------------
def load_module(run_dir: Path, svi_refinement: bool = False):
    """The best checkpoint's module; with `svi_refinement`, the same weights in `svi` mode (the VAE
    refined per example at test time: Newton to model.inner.tol, no proximal term)."""
    from omegaconf import OmegaConf

    from ift.checkpoints import load_checkpoint
    from ift.evaluation import build_model
    from ift.savi.module import SAVIModule

    ckpt = best_checkpoint(run_dir)
    run_cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    module = build_model(run_cfg, load_checkpoint(ckpt), ckpt)
    if svi_refinement:
        hp = dict(module.hparams)
        refined = SAVIModule(**{**hp, "mode": "svi", "inner": {**hp["inner"], "eta": None}})
        refined.load_state_dict(module.state_dict())
        module = refined
    return module.eval(), run_cfg


def test_images(run_cfg, limit: int | None) -> torch.Tensor:
    from hydra.utils import instantiate

    datamodule = instantiate(run_cfg.data)
    datamodule.setup("test")
    x = datamodule.test_set.float_images().flatten(1)
    return x[:limit] if limit else x


def jacobian(module, x: torch.Tensor, seed: int = 4321) -> torch.Tensor:
    """d lambda_K / d lambda_0 per example, (B, 2d, 2d): autograd through the module's own inner solver
    (create_graph; the decoder held fixed). For a solve converged to a stationary point of J this is
    (I + eta H)^-1 (H the Hessian of -ELBO at lambda*), what the IFT attaches."""
    from ift.savi.inner import refine

    vae = module.vae
    gen = torch.Generator().manual_seed(seed)
    eps = vae.sample_eps(x.shape[0], module.hparams.inner_samples, generator=gen, like=x)
    lam0 = vae.encode(x).detach().requires_grad_(True)
    if module.mode == "vae":
        return torch.eye(lam0.shape[-1], dtype=lam0.dtype).expand(x.shape[0], -1, -1).clone()
    params = {k: v.detach() for k, v in vae.generative_params().items()}
    with torch.enable_grad():
        lam = refine(vae, x, lam0, eps, params, module.inner_cfg, create_graph=True).x
        rows = [torch.autograd.grad(lam[:, i].sum(), lam0, retain_graph=True, allow_unused=True)[0]
                for i in range(lam.shape[-1])]
    rows = [torch.zeros_like(lam0) if r is None else r for r in rows]
    return torch.stack(rows, dim=1).detach()


def evaluate(module, x_all: torch.Tensor, args) -> dict:
    """Refine once on the test images: ELBOs, KL, active units, IWAE, inner statistics, Jacobian norm."""
    vae, refining = module.vae, module.mode != "vae"
    gen = torch.Generator().manual_seed(1234)
    sums: dict[str, float] = {}
    mus, stat = [], []
    with torch.no_grad():
        for x in x_all.split(250):
            lam0 = vae.encode(x)
            eps_inner = vae.sample_eps(x.shape[0], module.hparams.inner_samples, generator=gen, like=x)
            result = module.refine(x, lam0, eps_inner)
            eps = vae.sample_eps(x.shape[0], args.elbo_samples, generator=gen, like=x)
            recon, kl = vae.elbo_terms(x, result.x, eps)
            elbo_amortized = vae.elbo(x, lam0, eps)
            parts = {"elbo": recon - kl, "elbo_amortized": elbo_amortized, "amortization_gap": recon - kl - elbo_amortized,
                     "kl": kl, "elbo_inner_noise": vae.elbo(x, result.x, eps_inner),
                     "iwae": vae.iwae_log_likelihood(x, result.x, n_samples=args.iwae_samples, chunk=100, generator=gen),
                     "inner_iters": result.iterations.float(), "diverged": result.diverged.float(),
                     "nonstationary_frac": result.nonstationary.float() if refining and module.inner_cfg.tol > 0
                     else torch.full_like(kl, math.nan)}
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.sum())
            mus.append(result.x.chunk(2, dim=-1)[0])
            stat.append(result.stationarity)
    n = x_all.shape[0]
    out = {k: v / n for k, v in sums.items()}
    out["active_units"] = int((torch.cat(mus).double().var(dim=0) > module.hparams.active_unit_threshold).sum())
    stat = torch.cat(stat)
    out["stationarity_median"], out["stationarity_max"] = ((float(stat.median()), float(stat.max())) if refining
                                                            else (math.nan, math.nan))
    if not refining:
        out["inner_iters"] = math.nan
    jac = jacobian(module, x_all[: args.jacobian_examples])
    norms = torch.linalg.matrix_norm(jac, ord=2)
    out["jacobian_norm_median"], out["jacobian_norm_max"] = float(norms.median()), float(norms.max())
    out["examples"], out["iwae_samples"], out["gamma"] = n, args.iwae_samples, float(vae.gamma)
    return out


def single(args) -> None:
    dataset, model, seed, eta = args.single[0], args.single[1], int(args.single[2]), parse_eta(args.single[3])
    torch.set_num_threads(1)
    name = run_name(model, seed, eta)
    run = bench.Run(name, SOURCES, args, device=args.device, out=args.study_dir / "runs" / dataset)
    if model == "vae_svi":  # the converged VAE, refined at test time: no training of its own
        vae_dir = args.work_dir / dataset / run_name("vae", seed)
        train_record = json.loads(run_path(args, dataset, run_name("vae", seed)).read_text())["train"]
        module, run_cfg = load_module(vae_dir, svi_refinement=True)
    else:
        train_record = train(dataset, model, seed, eta, args)
        module, run_cfg = load_module(args.work_dir / dataset / name)
    limit = args.test_examples if dataset == "mnist" else None
    test = evaluate(module, test_images(run_cfg, limit), args)
    inner = module.inner_cfg
    if model == "vae_svi":
        train_record = {**train_record, "trained_as": "vae (the same run: no training of its own)"}
    if inner.tol == 0 or module.mode == "vae":  # a fixed budget: no stationarity test to fail
        train_record.pop("train_nonstationary_frac", None)
    settings = {"mode": module.mode, "eta": inner.eta if module.mode != "vae" else None, "optimizer": inner.method,
                "inner_steps": inner.max_iter, "inner_tol": inner.tol, "match_seconds": args.match_seconds,
                "patience": None if model == "vae_equal_time" else patience(dataset, args)}
    run.write(finite({"dataset": dataset, "model": model, "seed": seed, "eta": eta, "settings": settings,
                      "train": train_record, "test": test}))


def finite(obj):
    """NaN -> None (null in JSON: strict readers reject NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


# --- the aggregate ---------------------------------------------------------------------------------
def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se


def fmt(values: list, digits: int = 2) -> str:
    mean, se = mean_se(values)
    if math.isnan(mean):
        return "-"
    if digits < 0:
        return f"{mean:.1e}" + ("" if math.isnan(se) else f" ± {se:.0e}")
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def verdict(diffs: list[float]) -> str:
    """'+' (first better) / '-' (second better) outside 2 SE of the paired differences, else 'tie'."""
    mean, se = mean_se(diffs)
    if math.isnan(se):
        return "n/a (one seed)"
    return "first better" if mean > 2 * se else "second better" if mean < -2 * se else "tie"


ENTRY_KEYS = [  # (key in the aggregate, where in a run file)
    ("test_iwae", ("test", "iwae")), ("test_elbo", ("test", "elbo")), ("test_elbo_amortized", ("test", "elbo_amortized")),
    ("amortization_gap", ("test", "amortization_gap")), ("kl", ("test", "kl")), ("active_units", ("test", "active_units")),
    ("wall_clock_s", ("train", "wall_clock_s")), ("steps", ("train", "steps")),
    ("saved_tensor_mib", ("train", "saved_tensor_mib")), ("peak_rss_mb", ("train", "peak_rss_mb")),
    ("test_stationarity_median", ("test", "stationarity_median")), ("test_nonstationary_frac", ("test", "nonstationary_frac")),
    ("train_nonstationary_frac", ("train", "train_nonstationary_frac")), ("jacobian_norm", ("test", "jacobian_norm_median")),
    ("gamma", ("test", "gamma")), ("val_elbo_best", ("train", "val_elbo_best")),
    ("val_elbo_last", ("train", "val_elbo_last")),
]


def entry(runs: list[dict], model: str) -> dict:
    get = lambda r, where: r[where[0]].get(where[1])  # noqa: E731
    plateaus = [r["train"]["plateau"] for r in runs]
    slopes = [p for p in plateaus if p is not True]
    # true when every seed plateaued; else the mean end slope (nats per 1000 steps) of those that did not
    known = [p for p in slopes if isinstance(p, (int, float)) and not math.isnan(p)]
    out = {"seeds": len(runs), "seed_list": [r["seed"] for r in runs],
           "plateau": True if not slopes else statistics.fmean(known) if known else None,
           "plateau_per_seed": plateaus}
    out.update({key: [get(r, where) for r in runs] for key, where in ENTRY_KEYS})
    if model == "vae_svi":
        out["note"] = "vae's training (wall-clock, steps, memory are vae's), refined per example at test time"
    if model == "savi_ift":
        out["linsolve_unconverged"] = [r["train"].get("linsolve_unconverged", 0) for r in runs]
        out["linsolve_solves"] = [r["train"].get("linsolve_solves", 0) for r in runs]
        out["linsolve_residual_max"] = [r["train"].get("linsolve_residual_max") for r in runs]
        out["fallback_examples"] = [r["train"].get("fallback_examples", 0) for r in runs]
    return out


PAIRS = [("savi_ift", "savi_unrolled"), ("savi_ift", "vae"), ("savi_unrolled", "vae"), ("savi_kim", "vae"),
         ("savi_reversible", "savi_kim"), ("svi", "vae"), ("vae_svi", "vae"), ("vae_equal_time", "vae"),
         ("savi_ift", "vae_equal_time"), ("savi_kim", "vae_equal_time"), ("savi_ift", "svi"), ("savi_ift", "savi_kim")]
# Kim et al. (2018), Table 2: SA-VAE > VAE + SVI > VAE in NLL; ours: the same pairs by test IWAE.
KIM = [("SA-VAE > VAE + SVI", "savi_kim", "vae_svi"), ("VAE + SVI > VAE", "vae_svi", "vae"),
       ("SA-VAE > VAE", "savi_kim", "vae"), ("SA-VAE > VAE + SVI (trained, `svi`)", "savi_kim", "svi"),
       ("SA-VAE (ours, IFT) > VAE + SVI", "savi_ift", "vae_svi")]


def paired(by_model: dict, a: str, b: str, key: tuple[str, str]) -> list[float]:
    first = {r["seed"]: r for r in by_model.get(a, [])}
    return [first[r["seed"]][key[0]][key[1]] - r[key[0]][key[1]] for r in by_model.get(b, []) if r["seed"] in first]


def summarize(args) -> None:
    root = args.study_dir / "runs"
    runs = {d: [json.loads(p.read_text()) for p in sorted((root / d).glob("*.json"))] for d in DATASETS}
    if not any(runs.values()):
        return
    run = bench.Run(NAME, SOURCES, args, device=args.device)
    # completeness is judged against the whole study (default seeds, models, datasets, eta sweep and
    # budgets), not against a subset this invocation asked for
    defaults = parse_args(["--work-dir", str(args.work_dir)] + (["--quick"] if args.quick else []))
    planned = plan(defaults)
    reduced = {k: getattr(args, k) for k in REDUCIBLE if getattr(args, k) != getattr(defaults, k)}
    payload, md, figures, missing_total = {}, [], {}, 0
    for dataset in DATASETS:
        main = [r for r in runs[dataset] if r["eta"] == 1.0]
        by_model = {m: sorted((r for r in main if r["model"] == m), key=lambda r: r["seed"]) for m in MODELS}
        by_model = {m: rs for m, rs in by_model.items() if rs}
        done = {(r["model"], r["seed"], r["eta"]) for r in runs[dataset]}
        missing = [f"{run_name(m, s, e)}" for d, m, s, e, _ in planned if d == dataset and (m, s, e) not in done]
        missing_total += len(missing)
        section = {"models": {m: entry(rs, m) for m, rs in by_model.items()}, "complete": not missing,
                   "missing_runs": missing}
        section["paired"] = [{"first": a, "second": b, "seeds": len(paired(by_model, a, b, ("test", "iwae"))),
                              "iwae": paired(by_model, a, b, ("test", "iwae")),
                              "elbo": paired(by_model, a, b, ("test", "elbo")),
                              "verdict_iwae": verdict(paired(by_model, a, b, ("test", "iwae")))}
                             for a, b in PAIRS if a in by_model and b in by_model]
        section["kim_ordering"] = [{"claim": claim, "first": a, "second": b, "iwae": paired(by_model, a, b, ("test", "iwae")),
                                    "reproduces": reproduces(paired(by_model, a, b, ("test", "iwae")))}
                                   for claim, a, b in KIM if a in by_model and b in by_model]
        if dataset == "digits":
            section["eta_sweep"] = eta_sweep(runs[dataset])
        payload[dataset] = section
        if by_model:
            md.append(markdown(dataset, section, by_model, args))
            figures[f"{NAME}_{dataset}_curves.png"] = plot_curves(dataset, by_model)
    if payload["digits"].get("eta_sweep"):
        figures[f"{NAME}_eta.png"] = plot_eta(payload["digits"]["eta_sweep"])
    payload["complete"] = missing_total == 0 and not reduced
    payload["reduced_settings"] = reduced
    payload["settings"] = {k: v for k, v in vars(args).items() if k not in ("single", "match_seconds", "summarize_only")}
    status = ("" if payload["complete"] else
              f"**Partial study, not the final result: {missing_total} run(s) of the full study missing (listed per "
              "dataset below and in `savi_study.json`)"
              + (f"; settings reduced from the study's defaults: {', '.join(f'{k}={v}' for k, v in reduced.items())}"
                 if reduced else "") + ".**\n\n")
    text = (f"# SAVI study (issue 26)\n\n{status}{bench.describe(run.environment)}; one process and one torch thread per run. "
            "Mean ± standard error over seeds; paired differences by seed (same initialisation and data order); "
            "a difference counts only outside 2 SE, else it is a tie. Runs: `savi_study/runs/<dataset>/`, each with "
            f"its own provenance.\n\nStopping rule: early stopping on the refined validation ELBO (min delta "
            f"{args.min_delta} nats; patience {patience('digits', args)} validations on digits, "
            f"{patience('mnist', args)} on MNIST), the best checkpoint evaluated; refining models capped at "
            f"{args.digits_max_epochs} epochs on digits and {args.mnist_max_steps or 'no'} steps on MNIST (the VAE: "
            f"{args.digits_vae_max_epochs} / {args.mnist_max_epochs} epochs). `plateau`: yes when the last 20 % of training improved the best "
            "validation ELBO by < 0.5 nats, else the end slope in nats per 1000 steps.\n\n" + "\n".join(md))
    run.write(finite(payload), text, figures=figures,
              files=[f"{NAME}/runs/{d}/{run_name(r['model'], r['seed'], r['eta'])}.json" for d in DATASETS for r in runs[d]])
    _pyplot().close("all")


def reproduces(diffs: list[float]) -> str:
    mean, se = mean_se(diffs)
    if math.isnan(mean):
        return "-"
    if math.isnan(se):
        return "n/a (one seed)"
    return "yes" if mean > 2 * se else "no (reversed)" if mean < -2 * se else "no (tie)"


def eta_sweep(runs: list[dict]) -> list[dict]:
    rows = []
    for model in SWEEP_MODES:
        etas = sorted({r["eta"] for r in runs if r["model"] == model}, key=lambda e: math.inf if e is None else e)
        for eta in etas:
            rs = sorted((r for r in runs if r["model"] == model and r["eta"] == eta), key=lambda r: r["seed"])
            rows.append({"eta": eta, "model": model, "seeds": len(rs), "seed_list": [r["seed"] for r in rs],
                         "test_iwae": [r["test"]["iwae"] for r in rs], "test_elbo": [r["test"]["elbo"] for r in rs],
                         "test_elbo_amortized": [r["test"]["elbo_amortized"] for r in rs],
                         "amortization_gap": [r["test"]["amortization_gap"] for r in rs],
                         "jacobian_norm": [r["test"]["jacobian_norm_median"] for r in rs],
                         "plateau_per_seed": [r["train"]["plateau"] for r in rs],
                         "steps": [r["train"]["steps"] for r in rs]})
    return rows


def plateau_cell(values: list) -> str:
    if all(v is True for v in values):
        return "yes"
    return ", ".join("yes" if v is True else "n/a" if v is None or math.isnan(v) else f"{v:+.1f}/1k" for v in values)


def markdown(dataset: str, section: dict, by_model: dict, args) -> str:
    cols = [("test_iwae", "IWAE log p(x)", 2), ("test_elbo", "ELBO refined", 2), ("test_elbo_amortized", "ELBO amortized", 2),
            ("amortization_gap", "gap", 2), ("kl", "KL", 2), ("active_units", "AU", 1), ("wall_clock_s", "train s", 0),
            ("steps", "steps", 0), ("saved_tensor_mib", "saved MiB", 2), ("peak_rss_mb", "RSS MB", 0),
            ("test_stationarity_median", "test stationarity", -1), ("train_nonstationary_frac", "train frac > tol", -1),
            ("jacobian_norm", "‖dλ/dλ0‖", 3)]
    rows = []
    for model, e in section["models"].items():
        drop = [None if b is None or l is None else b - l for b, l in zip(e["val_elbo_best"], e["val_elbo_last"])]
        rows.append([f"`{model}`", e["seeds"], *(fmt(e[k], d) for k, _, d in cols), plateau_cell(e["plateau_per_seed"]),
                     fmt(drop, 1)])
    n_test = by_model[next(iter(by_model))][0]["test"]["examples"]
    out = [f"## {dataset}\n\n{n_test} test images, IWAE with {args.iwae_samples} samples."
           + ("" if section["complete"] else f" Missing runs: {', '.join(section['missing_runs'])}.") + "\n\n",
           bench.table(["model", "seeds", *(c[1] for c in cols), "plateau", "val best - last"], rows),
           "\n`val best - last`: validation ELBO at its best minus at the end of training (the best checkpoint is "
           "evaluated; a large value means training collapsed after its best, which the plateau rule does not flag). "
           "`vae_svi` is `vae`'s run (its training columns are `vae`'s), refined at test time.\n"]
    if "savi_ift" in section["models"]:
        e = section["models"]["savi_ift"]
        out.append(f"\n`savi_ift` backward CG solves above tolerance over training (`linsolve_unconverged`, per seed): "
                   f"{e['linsolve_unconverged']} of {e['linsolve_solves']} batched solves' problems; largest relative "
                   f"residual per seed {[f'{v:.1e}' if v is not None else '-' for v in e['linsolve_residual_max']]}; "
                   f"examples trained at lambda_0 (fallback): {e['fallback_examples']}.\n")
    if section["paired"]:
        prow = [[f"`{p['first']}` - `{p['second']}`", p["seeds"], fmt(p["iwae"]), fmt(p["elbo"]), p["verdict_iwae"]]
                for p in section["paired"]]
        out.append("\nPaired by seed:\n\n" + bench.table(["difference", "seeds", "IWAE", "ELBO refined", "by IWAE"], prow))
    if section["kim_ordering"]:
        krow = [[k["claim"], f"`{k['first']}` - `{k['second']}`", fmt(k["iwae"]), k["reproduces"]]
                for k in section["kim_ordering"]]
        out.append("\nKim et al. (2018)'s ordering (their NLL; ours test IWAE, paired by seed):\n\n"
                   + bench.table(["Kim et al.", "ours", "IWAE difference", "reproduces?"], krow))
    if section.get("eta_sweep"):
        erow = [[f"`{r['model']}`", eta_name(r["eta"]), r["seeds"], fmt(r["test_iwae"]), fmt(r["test_elbo"]),
                 fmt(r["test_elbo_amortized"]), fmt(r["amortization_gap"]), fmt(r["jacobian_norm"], 3),
                 plateau_cell(r["plateau_per_seed"])] for r in section["eta_sweep"]]
        out.append("\neta sweep (eta = 1: the main runs; `none`: no proximal term; ‖dλ/dλ0‖: median spectral norm of "
                   "d lambda_K / d lambda_0 through the inner solver):\n\n"
                   + bench.table(["model", "eta", "seeds", "IWAE", "ELBO refined", "ELBO amortized", "gap", "‖dλ/dλ0‖",
                                  "plateau"], erow))
    return "".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(dataset: str, by_model: dict):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (model, rs) in enumerate(by_model.items()):
        for j, r in enumerate(rs):
            curve = r["train"]["curve"]
            if model == "vae_svi" or not curve:
                continue
            t, s, e, _ = zip(*curve)
            for ax, xs in zip(axes, (t, s)):
                ax.plot(xs, e, color=f"C{i}", alpha=0.7, lw=1, label=model if j == 0 else None)
    axes[0].set_xlabel("training wall-clock (s, incl. validation)")
    axes[1].set_xlabel("optimiser steps")
    for ax in axes:
        ax.set_ylabel("validation ELBO (refined)")
        ax.set_xscale("log")
    values = [e for rs in by_model.values() for r in rs for _, _, e, _ in r["train"]["curve"]]
    if values:
        lo, hi = sorted(values)[len(values) // 10], max(values)
        for ax in axes:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SAVI study, {dataset}: validation ELBO (one line per seed)")
    fig.tight_layout()
    return fig


def plot_eta(rows: list[dict]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r["eta"] for r in rows if r["eta"] is not None]
    none_at = 10 * max(finite) if finite else 1.0
    for i, model in enumerate(SWEEP_MODES):
        rs = [r for r in rows if r["model"] == model]
        xs = [none_at if r["eta"] is None else r["eta"] for r in rs]
        stats = [mean_se(r["test_iwae"]) for r in rs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[0 if math.isnan(s) else 2 * s for _, s in stats], marker="o",
                    capsize=3, color=f"C{i}", label=model)
    ax.set_xscale("log")
    ax.set_xlabel(f"eta (rightmost point at {none_at:g}: no proximal term)")
    ax.set_ylabel("test IWAE log p(x) (mean ± 2 SE)")
    ax.set_title("digits: IWAE against eta")
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    args = parse_args()
    if args.single:
        single(args)
        return
    if "mnist" in args.datasets and not args.summarize_only and not (args.data_root / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"savi_study: no MNIST idx files in {args.data_root}; pass --data-root DIR or --datasets digits")
    if not args.summarize_only:
        schedule(args)
    summarize(args)


if __name__ == "__main__":
    main()
