"""OptNet models against their baselines, trained through the real configs with the same budget.

- digits: `optnet_classifier` vs `mlp_classifier` (same widths, epochs and seed).
- sudoku: `optnet_sudoku` (learns the equality constraints A) vs `conv_sudoku` (4x4 puzzles,
  generated from a seed; 1000 test puzzles).

Reported per model: test accuracy (per cell for Sudoku), test loss, wrongly solved test puzzles,
mean interior point iterations and the non-converged fraction (OptNet models), training wall-clock.
Writes benchmarks/results/optnet_models.{json,md}.

    python benchmarks/optnet_models.py        # ~8 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ift.config import compose_config
from ift.training import run_training

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def train_one(model: str, data: str, epochs: int, extra: list[str], args) -> dict:
    run_dir = args.work_dir / data / model
    overrides = [f"model={model}", f"data={data}", "logger=csv", "trainer=cpu", f"trainer.max_epochs={epochs}",
                 "trainer.enable_progress_bar=false", f"seed={args.seed}", *extra]
    cfg = compose_config("train", overrides, run_dir)
    start = time.perf_counter()
    metrics = run_training(cfg)
    wall = time.perf_counter() - start
    print(f"{data}/{model}: test/acc {metrics['test/acc']:.4f} in {wall:.0f} s", flush=True)
    return {"model": model, "data": data, "epochs": epochs, "overrides": overrides, "wall_clock_s": wall,
            "metrics": metrics}


def fmt(metrics: dict, key: str, spec: str) -> str:
    return format(metrics[key], spec) if key in metrics else "-"


def markdown(results: list[dict], args) -> str:
    lines = ["| data | model | epochs | test acc | test loss | wrong test puzzles | solver iters | "
             "non-converged | train+test wall-clock s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r["metrics"]
        errors = f"{m['test/puzzle_errors']:.0f} / {args.sudoku_test}" if "test/puzzle_errors" in m else "-"
        lines.append(f"| {r['data']} | {r['model']} | {r['epochs']} | {fmt(m, 'test/acc', '.4f')} | "
                     f"{fmt(m, 'test/loss', '.4f')} | {errors} | {fmt(m, 'test/solver_iters', '.1f')} | "
                     f"{fmt(m, 'test/nonconverged_frac', '.3f')} | {r['wall_clock_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits-epochs", type=int, default=30)
    parser.add_argument("--sudoku-epochs", type=int, default=4)
    parser.add_argument("--sudoku-train", type=int, default=9000, help="puzzles for train+val (paper: 9000)")
    parser.add_argument("--sudoku-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "logs" / "benchmarks" / "optnet_models")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more oversubscribe a busy 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sudoku_data = [f"data.n_train={args.sudoku_train}", f"data.n_test={args.sudoku_test}"]
    if args.sudoku_train < 9000:
        print(f"NOTE: Sudoku trains on {args.sudoku_train} puzzles (train+val), fewer than the paper's 9000", flush=True)
    runs = [("optnet_classifier", "digits", args.digits_epochs, []), ("mlp_classifier", "digits", args.digits_epochs, []),
            ("optnet_sudoku", "sudoku", args.sudoku_epochs, sudoku_data),
            ("conv_sudoku", "sudoku", args.sudoku_epochs, sudoku_data)]
    start = time.perf_counter()
    results = [train_one(model, data, epochs, extra, args) for model, data, epochs, extra in runs]
    total = time.perf_counter() - start

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optnet_models.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "total_wall_clock_s": total, "results": results}, indent=2))
    cmd = (f"python benchmarks/optnet_models.py --digits-epochs {args.digits_epochs} --sudoku-epochs "
           f"{args.sudoku_epochs} --sudoku-train {args.sudoku_train} --sudoku-test {args.sudoku_test}")
    note = (f"Sudoku: {args.sudoku_train} generated puzzles for train+val (10% validate), "
            f"{args.sudoku_test} test puzzles, each with a unique solution; accuracy is per cell; "
            "a puzzle is wrong if any cell is.")
    if args.sudoku_train < 9000:
        note += f" Reduced training set ({args.sudoku_train} < the paper's 9000) to fit the time budget."
    table = markdown(results, args)
    (RESULTS / "optnet_models.md").write_text(
        f"Command: `{cmd}` (CPU, {args.threads} torch thread(s), seed {args.seed}, total {total:.0f} s)\n\n{note}\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
