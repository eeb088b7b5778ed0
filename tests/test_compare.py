"""`python -m ift.compare`: the table, plots and sweep summary from run folders with known values."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from ift.compare import compare_runs, main, summarize_sweep

COLUMNS = ["epoch", "step", "perf/step_time_s", "perf/peak_mem_mb", "perf/samples_per_s", "val/elbo", "train/loss"]


def make_run(folder: Path, mode: str, k: int, step_times: list[float], val: dict[int, float], mem: float,
             overrides: list[str] = (), test: dict | None = None, monitor: dict | None = None) -> Path:
    """A run folder as train.py writes it: one CSV row per training step, one per validation."""
    (folder / "csv").mkdir(parents=True)
    config = {"model": {"_target_": "ift.savi.module.SAVIModule", "mode": mode, "inner": {"max_iter": k}},
              "monitor": monitor or {"metric": "val/elbo", "mode": "max"}}
    OmegaConf.save(OmegaConf.create(config), folder / "config_resolved.yaml")
    with open(folder / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for step, seconds in enumerate(step_times):
            writer.writerow({"epoch": 0, "step": step, "perf/step_time_s": seconds, "perf/peak_mem_mb": mem,
                             "perf/samples_per_s": 128 / seconds, "train/loss": 1.0})
            if step in val:
                writer.writerow({"epoch": 0, "step": step, "val/elbo": val[step]})
    (folder / "test_metrics.json").write_text(json.dumps({"metrics": test or {"test/elbo": -100.0}}))
    if overrides:
        (folder / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(list(overrides)), folder / ".hydra" / "overrides.yaml")
    return folder


def test_compare_runs_table_and_plots(tmp_path):
    a = make_run(tmp_path / "a", "savi_ift", 20, [1.0, 2.0, 3.0], {1: -120.0, 2: -110.0}, mem=300.0)
    b = make_run(tmp_path / "b", "savi_unrolled", 20, [0.5, 0.5], {1: -125.0}, mem=900.0)
    c = make_run(tmp_path / "c", "savi_unrolled", 5, [0.5, 0.5], {1: -130.0}, mem=400.0)
    out = tmp_path / "out"
    rows = compare_runs([a, b, c], out)
    assert [r["run"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["train_time_s"] == 6.0 and rows[0]["steps"] == 2 and rows[0]["K"] == 20
    assert rows[0]["final val/elbo"] == -110.0 and rows[0]["best val/elbo"] == -110.0
    assert rows[1]["peak_mem_mb"] == 900.0 and rows[1]["median_samples_per_s"] == 256.0
    assert rows[2]["test/elbo"] == -100.0
    for name in ("compare.md", "compare.csv", "elbo_vs_time.png", "memory_vs_k.png"):
        assert (out / name).stat().st_size > 0
    assert "| a | savi_ift | 20 | 2 | 6 |" in (out / "compare.md").read_text()


def test_sweep_summary_lists_jobs_best_first_with_the_swept_overrides(tmp_path):
    sweep = tmp_path / "multirun"
    for job, (lr, elbo) in enumerate([(0.001, -130.0), (0.01, -110.0), (0.003, math.nan)]):
        make_run(sweep / str(job), "savi_ift", 20, [1.0, 1.0], {1: elbo}, mem=1.0,
                 overrides=[f"model.lr={lr}", "debug=fast"], test={"test/elbo": elbo - 5})
    (sweep / "optimization_results.yaml").write_text("best_value: -110.0\n")
    rows = summarize_sweep(sweep)
    assert [r["job"] for r in rows] == ["1", "0", "2"]  # the NaN (failed) trial last
    assert rows[0]["model.lr"] == 0.01 and rows[0]["val/elbo"] == -110.0 and rows[0]["test/elbo"] == -115.0
    assert "debug" not in rows[0]  # not swept: the same in every job
    assert (sweep / "sweep_summary.md").read_text().startswith("| job | model.lr | val/elbo | test/elbo |")


def test_sweep_summary_of_a_minimised_metric_puts_the_lowest_first(tmp_path):
    sweep = tmp_path / "multirun"
    for job, loss in enumerate([3.0, 1.0, 2.0]):
        folder = make_run(sweep / str(job), "vae", 1, [1.0], {0: -loss}, mem=1.0, overrides=[f"seed={job}"],
                          monitor={"metric": "val/loss", "mode": "min"})
        with open(folder / "csv" / "metrics.csv", "a") as f:
            f.write(f"0,0,,,,,{loss}\n")  # train/loss column stands in for the logged metric
    rows = summarize_sweep(sweep, metric="train/loss")
    assert [r["job"] for r in rows] == ["1", "2", "0"]


def test_cli_says_what_a_wrong_folder_is_missing(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 1
    assert "has no csv/metrics.csv" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path)]) == 1
    assert "holds no job folders" in capsys.readouterr().err


def test_cli_prints_the_table(tmp_path, capsys):
    run = make_run(tmp_path / "a", "savi_ift", 20, [1.0], {0: -120.0}, mem=1.0)
    assert main(["runs", str(run), "--out", str(tmp_path / "out")]) == 0
    assert "| a | savi_ift |" in capsys.readouterr().out


def test_runs_without_the_metric_get_a_dash_not_an_error(tmp_path):
    run = make_run(tmp_path / "a", "savi_ift", 20, [1.0], {}, mem=1.0)
    rows = compare_runs([run], tmp_path / "out")
    assert math.isnan(rows[0]["best val/elbo"])
    assert "| - |" in (tmp_path / "out" / "compare.md").read_text()
