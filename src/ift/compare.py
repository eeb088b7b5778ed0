"""Compare finished runs and summarise sweeps, from their run folders (no W&B server needed).

    python -m ift.compare runs logs/train/runs/<a> logs/train/runs/<b> --out compare/
        a table (markdown + CSV) of each run's model, inner steps K, training time, speed, peak
        memory, final and best validation ELBO and test metrics; elbo_vs_time.png (validation ELBO
        against cumulative training-step time) and memory_vs_k.png (peak memory against K per model)
    python -m ift.compare sweep logs/train/multiruns/<date-time>
        one row per job of a `-m` run: its overrides, the swept metric and test_metrics.json,
        best first (sweep_summary.md / .csv in the sweep folder unless --out is given)

A run folder is what train.py writes: config_resolved.yaml, csv/metrics.csv (the CSV logger, part of
logger=wandb and logger=csv) and test_metrics.json. Time is the sum of perf/step_time_s (training
steps only, from ift.telemetry), memory is perf/peak_mem_mb (CUDA max allocated, or process peak RSS
on CPU) or, where logged, perf/saved_tensor_mb.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ift.checkpoints import RESOLVED_CONFIG
from ift.errors import IFTError

METRICS_CSV = Path("csv") / "metrics.csv"


@dataclass
class Run:
    """One run folder: its config, its logged rows (metric -> value, per logging call) and test metrics."""

    path: Path
    config: dict
    rows: list[dict[str, float]]
    test: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:  # a sweep job's folder is its number: name it with the sweep's folder
        return f"{self.path.parent.name}/{self.path.name}" if self.path.name.isdigit() else self.path.name

    @property
    def model(self) -> str:
        model = self.config.get("model", {})
        return str(model.get("mode") or model.get("_target_", "?").rsplit(".", 1)[-1])

    @property
    def steps_k(self) -> int | None:
        inner = (self.config.get("model") or {}).get("inner") or {}
        return inner.get("max_iter", inner.get("steps"))  # runs saved before the core's names: "steps"

    def series(self, metric: str) -> list[tuple[float, float]]:
        """(step, value) wherever `metric` was logged."""
        return [(row.get("step", math.nan), row[metric]) for row in self.rows if metric in row]

    def last(self, metric: str) -> float:
        values = self.series(metric)
        return values[-1][1] if values else math.nan


def read_rows(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, text in row.items():
                try:
                    parsed[key] = float(text)
                except (TypeError, ValueError):  # empty cell: not logged in this call
                    continue
            rows.append(parsed)
    return rows


def load_run(path: Path) -> Run:
    path = Path(path)
    metrics_csv = path / METRICS_CSV
    if not metrics_csv.is_file():
        raise IFTError(f"{path} has no {METRICS_CSV}: pass run folders written by train.py with the CSV logger "
                       f"(logger=wandb or logger=csv), e.g. logs/train/runs/<date-time>")
    config = OmegaConf.to_container(OmegaConf.load(path / RESOLVED_CONFIG)) if (path / RESOLVED_CONFIG).is_file() else {}
    test_file = path / "test_metrics.json"
    test = json.loads(test_file.read_text()).get("metrics", {}) if test_file.is_file() else {}
    return Run(path, config, read_rows(metrics_csv), test)


def cumulative_time(run: Run) -> dict[float, float]:
    """Training-step time summed up to each logged step (seconds)."""
    total, at_step = 0.0, {}
    for step, seconds in run.series("perf/step_time_s"):
        total += seconds
        at_step[step] = total
    return at_step


def time_at(at_step: dict[float, float], step: float) -> float:
    earlier = [s for s in at_step if s <= step]
    return at_step[max(earlier)] if earlier else 0.0


def memory_mb(run: Run) -> float:
    for metric in ("perf/saved_tensor_mb", "perf/peak_mem_mb"):
        values = [v for _, v in run.series(metric)]
        if values:
            return max(values)
    return math.nan


def summary_row(run: Run, metric: str) -> dict[str, object]:
    values = [v for _, v in run.series(metric)]
    speeds = sorted(v for _, v in run.series("perf/samples_per_s"))
    times = [v for _, v in run.series("perf/step_time_s")]
    return {"run": run.name, "model": run.model, "K": run.steps_k, "steps": int(max((r.get("step", 0) for r in run.rows), default=0)),
            "train_time_s": sum(times) if times else math.nan,
            "median_samples_per_s": speeds[len(speeds) // 2] if speeds else math.nan,
            "peak_mem_mb": memory_mb(run), f"final {metric}": values[-1] if values else math.nan,
            f"best {metric}": max(values) if values else math.nan,
            **{k: v for k, v in sorted(run.test.items()) if k in ("test/elbo", "test/loss", "test/acc")}}


def markdown_table(rows: list[dict[str, object]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def write_table(rows: list[dict[str, object]], out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown_table(rows))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return out / f"{stem}.md"


def plot_elbo_vs_time(runs: list[Run], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        at_step = cumulative_time(run)
        points = [(time_at(at_step, step), value) for step, value in run.series(metric)]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=f"{run.name} ({run.model})")
    ax.set_xlabel("training time (s, sum of step times)")
    ax.set_ylabel(metric)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory_vs_k(runs: list[Run], path: Path) -> bool:
    """Peak memory against K, one line per model; False (no plot) when no run has an inner K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        if run.steps_k is not None and not math.isnan(memory_mb(run)):
            by_model.setdefault(run.model, []).append((run.steps_k, memory_mb(run)))
    if not by_model:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, points in sorted(by_model.items()):
        ax.plot(*zip(*sorted(points)), marker="o", label=model)
    ax.set_xlabel("inner steps K (model.inner.max_iter)")
    ax.set_ylabel("memory (MB): saved tensors where logged, else peak")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare_runs(paths: list[Path], out: Path, metric: str = "val/elbo") -> list[dict[str, object]]:
    runs = [load_run(p) for p in paths]
    rows = [summary_row(run, metric) for run in runs]
    write_table(rows, out, "compare")
    plot_elbo_vs_time(runs, metric, out / "elbo_vs_time.png")
    plot_memory_vs_k(runs, out / "memory_vs_k.png")
    return rows


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if (p / METRICS_CSV).is_file()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    if not jobs:
        raise IFTError(f"{sweep_dir} holds no job folders with {METRICS_CSV}: pass the folder of a `python train.py -m` "
                       f"run, e.g. logs/train/multiruns/<date-time>")
    return jobs


def job_overrides(job: Path) -> dict[str, str]:
    """The swept overrides of a job (Hydra's .hydra/overrides.yaml), as key -> value text."""
    path = job / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    return dict(item.lstrip("+~").split("=", 1) for item in items if "=" in item)


def summarize_sweep(sweep_dir: Path, out: Path | None = None, metric: str | None = None) -> list[dict[str, object]]:
    jobs = sweep_jobs(sweep_dir)
    runs = [load_run(job) for job in jobs]
    overrides = [job_overrides(job) for job in jobs]
    varying = [k for k in dict.fromkeys(k for o in overrides for k in o) if len({o.get(k) for o in overrides}) > 1]
    metric = metric or swept_metric(runs[0])
    rows = []
    for run, over in zip(runs, overrides):
        rows.append({"job": run.path.name, **{k: as_number(over.get(k)) for k in varying}, metric: run.last(metric),
                     **{k: v for k, v in sorted(run.test.items()) if k.startswith("test/")}})
    maximize = (runs[0].config.get("monitor") or {}).get("mode") == "max" or metric.endswith(("elbo", "acc"))
    rows.sort(key=lambda r: -math.inf if math.isnan(r[metric]) else (r[metric] if maximize else -r[metric]),
              reverse=True)
    write_table(rows, Path(out or sweep_dir), "sweep_summary")
    return rows


def as_number(text: str | None):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def swept_metric(run: Run) -> str:
    named = run.config.get("optimized_metric") or (run.config.get("monitor") or {}).get("metric") or "val/loss"
    return named if isinstance(named, str) else named[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ift.compare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("runs", help="table + ELBO-vs-time and memory-vs-K plots of run folders")
    runs.add_argument("paths", nargs="+", type=Path)
    runs.add_argument("--out", type=Path, default=Path("compare"))
    runs.add_argument("--metric", default="val/elbo", help="the validation metric to plot (default val/elbo)")
    sweep = sub.add_parser("sweep", help="one row per job of a -m run, best first")
    sweep.add_argument("sweep_dir", type=Path)
    sweep.add_argument("--out", type=Path, default=None)
    sweep.add_argument("--metric", default=None, help="default: the run's optimized_metric or monitor.metric")
    args = parser.parse_args(argv)
    try:
        if args.command == "runs":
            rows, out = compare_runs(args.paths, args.out, args.metric), args.out
        else:
            rows, out = summarize_sweep(args.sweep_dir, args.out, args.metric), args.out or args.sweep_dir
    except IFTError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    print(markdown_table(rows), end="")
    print(f"Wrote {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
