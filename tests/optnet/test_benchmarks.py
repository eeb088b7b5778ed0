"""benchmarks/qp_layer.py, qp_allocator.py and optnet_models.py on ift.bench: --quick end to end (provenance,
tables, the rows gpu_check reads), qp_layer's --part keeping only a fresh earlier part."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_bench import quick_run

pytest.importorskip("qpth")


def test_quick_qp_layer(tmp_path):
    doc = quick_run("qp_layer.py", tmp_path)["qp_layer.json"]
    acc, speed = doc["accuracy"], doc["speed"]
    assert {r["generator"] for r in acc} == {r["generator"] for r in speed} == {"random", "hard"}
    assert doc["rows"] == speed and all(r["ours_fwdbwd_s"] > 0 for r in speed)  # what gpu_check reads
    for r in acc + speed:  # the solver is exact on its certified problems, whatever the run's size
        assert r["certified"] > 0 and r["ours_z_err"] < 1e-6 and r["ours_grad_err"] < 1e-5, r
    for r in speed:
        for k in ("qpth", "qplayer"):
            if f"{k}_time" in r:
                ratio = r[f"{k}_over_ours"]
                assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["n"] == doc["arguments"]["repeats"]
                assert f"{k}_z_err" in r  # every timed solver's accuracy in the same row
    f32 = [r for r in acc if "native32_z_err" in r]
    assert f32 and all("native32_degenerate" in r for r in f32)
    warm = doc["warm_start"]["runs"]
    assert warm["on"]["mean_iterations"] < warm["off"]["mean_iterations"]
    assert warm["on"]["final_loss"] == pytest.approx(warm["off"]["final_loss"], rel=1e-9)
    md = (tmp_path / "results" / "qp_layer.md").read_text()
    assert "## Speed" in md and "## Accuracy" in md and "| qpth / ours" not in md


def test_qp_layer_part_keeps_only_a_fresh_part(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    base = {"accuracy": [{"n": 1}], "warm_start": None, "speed": [], "provenance": {"sources": {}, "script": "x"}}
    (out / "qp_layer.json").write_text(json.dumps(base))  # no commit recorded: stale
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qp_layer.py"), "--part", "speed", "--out", str(out),
                           "--speed-sizes", "5", "--hard-sizes", "--repeats", "1", "--batch", "4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not keeping the accuracy part" in done.stdout and "is stale" in done.stdout
    doc = json.loads((out / "qp_layer.json").read_text())
    assert doc["accuracy"] == [] and "kept" not in doc or doc["kept"] is None
    assert [r["n"] for r in doc["speed"]] == [5, 5, 5, 5]


def test_quick_qp_allocator(tmp_path):
    doc = quick_run("qp_allocator.py", tmp_path)["qp_allocator.json"]
    impls = {(r["setting"], r["impl"]) for r in doc["rows"]}
    assert ("glibc defaults", "qpth / ours") in impls and ("qp_layer.py settings", "ours") in impls
    assert all(r["min"] <= r["median"] <= r["max"] for r in doc["rows"])


@pytest.mark.slow
def test_quick_optnet_models(tmp_path):
    doc = quick_run("optnet_models.py", tmp_path, "--sudoku-batch-sizes", "50")["optnet_models.json"]
    assert [(r["model"], r["data"]) for r in doc["results"]] == [
        ("optnet_classifier", "digits"), ("mlp_classifier", "digits"), ("optnet_sudoku", "sudoku"),
        ("conv_sudoku", "sudoku"), ("optnet_sudoku", "sudoku")]
    assert "data.batch_size=50" in doc["results"][-1]["overrides"]
    assert all(0 <= r["metrics"]["test/acc"] <= 1 for r in doc["results"])
