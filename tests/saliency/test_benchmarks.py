"""The saliency benchmarks on ift.bench, --quick end to end: every result has provenance, claims its
files (maps, figures), holds no absolute path and is never counted fresh; the controls sit beside the
real scores with the values they must have (Constant and linear: local SENS_max exactly 0; a linear
model's global INFD 0 to rounding); the training log of the MNIST pipeline records the weights' sha256."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ift import bench
from tests.conftest import ROOT, SHARED_MNIST


def run_quick(script: str, tmp_path: Path, *extra: str, timeout: int = 900) -> dict[str, dict]:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    documents = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert documents, f"{script} wrote no JSON to --out"
    for name, doc in documents.items():
        p = doc["provenance"]
        assert p["quick"] and p["script"] == f"benchmarks/{script}" and p["commit"]
        assert p["command"].startswith(f"python benchmarks/{script} --quick --out ")
        assert f"benchmarks/{script}" in p["sources"] and "src/ift/saliency/measures.py" in p["sources"]
        assert name in p["files"]
        for f in p["files"]:
            assert (out / f).is_file(), f
            if f.endswith(".md"):
                text = (out / f).read_text()
                assert "|---|" in text and f"Produced by `python benchmarks/{script}" in text
    problems = bench.check(out)
    assert problems and all(reason for _, reason in problems)  # a smoke run is never a fresh result
    assert not [r for r, reason in problems if "no provenance" in reason]  # every file claimed
    return documents


def test_quick_saliency_study_digits(tmp_path):
    docs = run_quick("saliency_study.py", tmp_path)
    assert set(docs) == {"saliency_table4_digits.json", "saliency_fig6_digits.json", "saliency_fig5_toy.json",
                         "saliency_prop_a1.json"}
    t4 = docs["saliency_table4_digits.json"]
    assert set(t4["provenance"]["files"]) >= {"saliency_maps_digits_regular.png", "saliency_maps_digits_robust.png"}
    for label in ("regular", "robust"):
        const = t4["results"][label]["tables"]["global"]["Constant"]
        assert const["sens_max_local_input"] == 0 and const["sens_max_input"] > 0
        assert len(const["per_example"]["sens_max_input"]) == t4["sizes"]["examples"]  # paired SEs possible
    # the constant explanation ignores the model: the same SENS_max for both
    assert (t4["results"]["regular"]["tables"]["global"]["Constant"]["per_example"]["sens_max_input"]
            == t4["results"]["robust"]["tables"]["global"]["Constant"]["per_example"]["sens_max_input"])
    lin = t4["results"]["linear"]["tables"]["global"]["Grad"]
    assert lin["sens_max_local_input"] == 0 and lin["infd"] < 1e-10  # x * w is the exact linear attribution
    md = (tmp_path / "results" / "saliency_table4_digits.md").read_text()
    assert "linear model Grad (control)" in md and "robust - regular" in md
    assert docs["saliency_fig5_toy.json"]["grad"] == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]  # Appendix A.5
    assert all(r["holds"] == r["n"] for r in docs["saliency_prop_a1.json"]["rows"])


def test_quick_saliency_robustifiers(tmp_path):
    doc = run_quick("saliency_robustifiers.py", tmp_path)["saliency_robustifiers.json"]
    assert {r["kind"] for r in doc["runs"]} == {"regular", "pgd", "grad_norm", "hessian", "l2"}
    costs = doc["step_costs"]
    assert costs["regular"]["ratio"] == 1 and costs["pgd"]["ratio_spread"]["n"] == 2
    assert doc["linear_control"]["Grad"]["sens_max_local_input"] == 0
    assert all(r["eval"]["tables"]["global"]["Constant"]["sens_max_local_input"] == 0 for r in doc["runs"])
    md = (tmp_path / "results" / "saliency_robustifiers.md").read_text()
    assert "paired by seed" in md and "constant explanation" in md


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"MNIST idx files not in {SHARED_MNIST}")
def test_quick_saliency_study_mnist_pipeline(tmp_path):
    ckpt = tmp_path / "ckpt"
    docs = run_quick("saliency_study.py", tmp_path, "--setting", "cpu", "--mnist-root", str(SHARED_MNIST),
                     "--checkpoints", str(ckpt))
    t4, ver = docs["saliency_table4_mnist_quick.json"], docs["saliency_verify_mnist_quick.json"]
    proto = t4["protocol"]
    assert proto["paired_se"] and proto["robust"]["from_scratch"] and proto["controls"]["linear_global_sens"] > 0
    assert ver["worst_case"]["accuracy"] <= min(a["accuracy"] for a in ver["attacks"].values()
                                                if len(a["robust"]) == ver["worst_case"]["examples"])
    log = json.loads((ckpt / "saliency_quick_robust.json").read_text())
    w = log["weights"]
    assert (ckpt / w["file"]).stat().st_size == w["bytes"] and len(w["tensors_sha256"]) == 64
    assert t4["results"]["robust"]["weights"]["tensors_sha256"] == w["tensors_sha256"]
    # the explanations reload from the weights file and its log alone (what a later session may keep)
    for f in ckpt.glob("*.ckpt"):
        f.unlink()
    again = run_quick("saliency_study.py", tmp_path / "again", "--setting", "cpu", "--mnist-root", str(SHARED_MNIST),
                      "--checkpoints", str(ckpt), "--phase", "verify")
    assert again["saliency_verify_mnist_quick.json"]["weights"]["robust"]["tensors_sha256"] == w["tensors_sha256"]
