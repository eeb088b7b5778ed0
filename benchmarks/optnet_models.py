"""OptNet models against their baselines, trained through the real configs with the same budget.

- digits: `optnet_classifier` vs `mlp_classifier` (same widths, epochs and seed).
- sudoku: `optnet_sudoku` (learns the equality constraints A) vs `conv_sudoku` (4x4 puzzles,
  generated from a seed; 1000 test puzzles).
- `--sudoku-batch-sizes 20 100`: optnet_sudoku trained with each batch size on the same budget
  (the batch-size trial behind optnet_sudoku's default batch 20), one extra row each; with
  `--only sudoku-batch` only those runs, written as optnet_models_batch_trial.{json,md}.

Reported per model: test accuracy (per cell for Sudoku), test loss, wrongly solved test puzzles,
mean interior point iterations and the non-converged fraction (OptNet models), training
wall-clock. Writes <out>/optnet_models.{json,md}.

    python benchmarks/optnet_models.py                                   # the four models
    python benchmarks/optnet_models.py --only sudoku-batch --sudoku-epochs 4 --sudoku-train 2000 \\
        --sudoku-test 500 --sudoku-batch-sizes 20 100                    # the batch-size trial
    python benchmarks/optnet_models.py --quick                           # smoke run (numbers meaningless)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from ift import bench
from ift.config import compose_config
from ift.training import run_training

ROOT = Path(__file__).resolve().parents[1]
# What the result measures: the QP layer and solver, the models, their configs and the data.
SOURCES = ["src/ift/optnet", "src/ift/implicit/core.py", "src/ift/data/sudoku.py", "src/ift/data/digits.py",
           "src/ift/training.py",
           "configs/model/optnet_classifier.yaml", "configs/model/mlp_classifier.yaml",
           "configs/model/optnet_sudoku.yaml", "configs/model/conv_sudoku.yaml",
           "configs/data/digits.yaml", "configs/data/sudoku.yaml"]


def train_one(model: str, data: str, epochs: int, extra: list[str], args) -> dict:
    run_dir = args.work_dir / data / "_".join([model, *(e.replace("=", "-") for e in extra if "batch_size" in e)])
    overrides = [f"model={model}", f"data={data}", "logger=csv", "trainer=cpu", f"trainer.max_epochs={epochs}",
                 "trainer.enable_progress_bar=false", f"seed={args.seed}", *extra]
    cfg = compose_config("train", overrides, run_dir)
    start = time.perf_counter()
    metrics = run_training(cfg)
    wall = time.perf_counter() - start
    print(f"{data}/{model} {extra}: test/acc {metrics['test/acc']:.4f} in {wall:.0f} s", flush=True)
    return {"model": model, "data": data, "epochs": epochs, "overrides": overrides, "wall_clock_s": wall,
            "metrics": metrics}


def fmt(metrics: dict, key: str, spec: str) -> str:
    return format(metrics[key], spec) if key in metrics else "-"


def table(results: list[dict], args) -> str:
    rows = []
    for r in results:
        m = r["metrics"]
        errors = f"{m['test/puzzle_errors']:.0f} / {args.sudoku_test}" if "test/puzzle_errors" in m else "-"
        batch = next((o.split("=")[1] for o in r["overrides"] if o.startswith("data.batch_size=")), "default")
        rows.append([r["data"], r["model"], batch, r["epochs"], fmt(m, "test/acc", ".4f"), fmt(m, "test/loss", ".4f"),
                     errors, fmt(m, "test/solver_iters", ".1f"), fmt(m, "test/nonconverged_frac", ".3f"),
                     f"{r['wall_clock_s']:.0f}"])
    return bench.table(["data", "model", "batch", "epochs", "test acc", "test loss", "wrong test puzzles",
                        "solver iters", "non-converged", "train+test wall-clock s"], rows, align="lllrrrrrrr")


def main() -> None:
    parser = bench.parser(__doc__)
    parser.add_argument("--only", choices=["all", "digits", "sudoku", "sudoku-batch"], default="all")
    parser.add_argument("--digits-epochs", type=int, default=None, help="default 30")
    parser.add_argument("--sudoku-epochs", type=int, default=None, help="default 4")
    parser.add_argument("--sudoku-train", type=int, default=None, help="puzzles for train+val (paper: 9000)")
    parser.add_argument("--sudoku-test", type=int, default=None, help="default 1000")
    parser.add_argument("--sudoku-batch-sizes", type=int, nargs="*", default=[],
                        help="extra optnet_sudoku runs with these data.batch_size values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="Lightning logs and checkpoints (default logs/benchmarks/optnet_models; --quick: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more oversubscribe a busy 2-core box)")
    args = parser.parse_args()
    for key, full, quick in (("digits_epochs", 30, 1), ("sudoku_epochs", 4, 1), ("sudoku_train", 9000, 200),
                             ("sudoku_test", 1000, 50)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.work_dir is None:
        args.work_dir = (Path(tempfile.mkdtemp(prefix="optnet_models_")) if args.quick
                         else ROOT / "logs" / "benchmarks" / "optnet_models")
    torch.set_num_threads(args.threads)
    if args.only == "sudoku-batch" and not args.sudoku_batch_sizes:
        parser.error("--only sudoku-batch needs --sudoku-batch-sizes, e.g. --sudoku-batch-sizes 20 100")
    run = bench.Run("optnet_models_batch_trial" if args.only == "sudoku-batch" else "optnet_models", SOURCES, args)

    sudoku_data = [f"data.n_train={args.sudoku_train}", f"data.n_test={args.sudoku_test}"]
    if args.sudoku_train < 9000:
        print(f"NOTE: Sudoku trains on {args.sudoku_train} puzzles (train+val), fewer than the paper's 9000", flush=True)
    plan = []
    if args.only in ("all", "digits"):
        plan += [("optnet_classifier", "digits", args.digits_epochs, []),
                 ("mlp_classifier", "digits", args.digits_epochs, [])]
    if args.only in ("all", "sudoku"):
        plan += [("optnet_sudoku", "sudoku", args.sudoku_epochs, sudoku_data),
                 ("conv_sudoku", "sudoku", args.sudoku_epochs, sudoku_data)]
    if args.only != "digits":
        plan += [("optnet_sudoku", "sudoku", args.sudoku_epochs, [*sudoku_data, f"data.batch_size={b}"])
                 for b in args.sudoku_batch_sizes]
    start = time.perf_counter()
    results = [train_one(model, data, epochs, extra, args) for model, data, epochs, extra in plan]
    total = time.perf_counter() - start

    note = (f"Sudoku: {args.sudoku_train} generated puzzles for train+val (10% validate), {args.sudoku_test} test "
            "puzzles, each with a unique solution; accuracy is per cell; a puzzle is wrong if any cell is. "
            "batch: data.batch_size (default: the data config's, 20 for Sudoku).")
    if args.sudoku_train < 9000:
        note += f" Reduced training set ({args.sudoku_train} < the paper's 9000)."
    markdown = (f"# OptNet models vs baselines\n\nCPU, {args.threads} torch thread(s), seed {args.seed}, total "
                f"{total:.0f} s. {note}\n\n" + table(results, args))
    run.write({"total_wall_clock_s": total, "results": results}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
