"""benchmarks/gpu_check.py on CPU: what it trains, its --quick mode end to end, timeouts and the no-CUDA message.

The real run needs a GPU (`make gpu-check`); these keep the script from rotting between GPU runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_every_model_config_is_trained_on_the_first_bundled_data_it_declares(gpu_check):
    from ift.config import model_data_pairs

    plan = {model: data for model, data, _, _ in gpu_check.training_plan()}
    assert sorted(plan) == sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
    assert all((CONFIGS / "data" / f"{data}.yaml").is_file() for data in plan.values())
    assert gpu_check.file_data() == {"mnist", "fashion_mnist", "cifar10"}
    pairs = model_data_pairs()  # the models' own runs_on: the data gpu_check trains on is one of them
    for model, data in plan.items():
        declared = [d for m, d in pairs if m == model]
        bundled = [d for d in declared if d not in gpu_check.file_data()]
        assert data == (bundled or declared)[0], (model, declared)
    assert plan["vae"] == "digits" and plan["imaml"] == "sinusoid" and plan["optnet_sudoku"] == "sudoku"


def test_a_benchmark_without_a_device_flag_fails_on_cuda_and_drops_unknown_flags(gpu_check, tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "qp_layer.py").write_text('parser.add_argument("--sizes")\nparser.add_argument("--batch")\n')
    args = gpu_check.parse_args(["--device", "cpu", "--quick"])
    check = gpu_check.bench_check("qp_layer", args, tmp_path)
    assert check.status == "pending" and "--device" not in check.command and "--sizes" in check.command
    assert "--device" in check.numbers["flags_not_supported"]
    args.device = "cuda"
    check = gpu_check.bench_check("qp_layer", args, tmp_path)
    assert check.status == "failed" and "no --device option" in check.reason


def test_an_ift_bench_script_gets_out_and_quick_and_its_summary_reads_its_json(gpu_check, tmp_path):
    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "benchmarks" / "host_checks.py", tmp_path / "bench" / "host_checks.py")
    check = gpu_check.bench_check("host_checks", gpu_check.parse_args(["--device", "cpu", "--quick"]), tmp_path)
    assert check.command[2:] == ["--out", str(tmp_path / "bench" / "results"), "--quick", "--device", "cpu"]
    assert "flags_not_supported" not in check.numbers
    payload = {"rows": [{"case": "minimize sgd (16 x 16)", "ratio_8_over_1": {"min": 0.9, "median": 1.01, "max": 1.2, "n": 3}}]}
    assert gpu_check.summarize_host_checks(payload, None) == {"minimize sgd: time every 8 / every 1": 1.01}


def test_savi_memory_summary_reads_the_harness_json_and_fails_when_ift_is_not_below_unrolled(gpu_check):
    records = [{"mode": "vae", "steps": 0, "backward_peak_bytes": 2**20}]
    records += [{"mode": m, "steps": 50, "backward_peak_bytes": b * 2**20} for m, b in (("savi_unrolled", 40), ("savi_ift", 8))]
    payload = {"records": records, "times": {"50": {"savi_ift": {"median_s": 0.5}}}}
    args = gpu_check.parse_args(["--device", "cpu", "--quick"])
    args.device = "cuda"
    numbers = gpu_check.summarize_savi(payload, args)
    assert numbers["savi_ift_K50_backward_peak_MiB"] == 8 and numbers["savi_ift_K50_step_ms"] == 500
    assert numbers["ift_over_unrolled_peak_K50"] == 0.2 and "FAIL" not in numbers
    records[-1]["backward_peak_bytes"] = 50 * 2**20
    assert "not below" in gpu_check.summarize_savi(payload, args)["FAIL"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA visible: the no-CUDA message does not apply")
def test_without_cuda_it_says_so_in_one_line_and_fails():
    result = run()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--device cpu --quick" in lines[0]


def test_quick_run_trains_through_train_py_runs_benchmarks_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    wanted = {"train:savi_ift@digits:fp32", "train:vae@digits:bf16", "bench:qp_layer"}
    result = run("--device", "cpu", "--quick", "--out", str(tmp_path), "--only", *sorted(wanted))
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == wanted, result.stdout
    assert all(c["status"] == "ok" for c in checks.values()), (checks, result.stdout[-3000:])
    assert result.returncode == 0
    ift = checks["train:savi_ift@digits:fp32"]["numbers"]
    assert math.isfinite(ift["test/loss"]) and ift["cg_unconverged_warnings"] == 0
    assert ift["ift/linsolve_unconverged (max)"] == 0 and ift["ift/linsolve_iters (max)"] > 0  # the CG ran
    assert "trainer.precision=bf16-mixed" in checks["train:vae@digits:bf16"]["command"]
    assert any(k.endswith("_fwdbwd_ms") for k in checks["bench:qp_layer"]["numbers"])
    assert report["environment"]["torch"] == torch.__version__ and report["meta"]["mode"] == "quick"
    assert report["provenance"]["quick"] and "src/ift/bench.py" in report["provenance"]["sources"]
    md = out.with_suffix(".md").read_text()
    assert all(f"| {name} | ok |" in md for name in wanted)


def finished(gpu_check, tmp_path, output="", test_loss=1.0, nonstationary=0.0, unconverged=0):
    """finish_train on a run folder written by hand: what a train.py run leaves behind."""
    run_dir = tmp_path / "run"
    (run_dir / "csv").mkdir(parents=True)
    if test_loss is not None:
        (run_dir / "test_metrics.json").write_text(json.dumps({"metrics": {"test/loss": test_loss}}))
    (run_dir / "csv" / "metrics.csv").write_text(
        "step,inner/nonstationary_frac,ift/linsolve_unconverged,val/loss\n"
        f"0,0.0,0,\n1,{nonstationary},{unconverged},\n1,,,2.5\n")
    check = gpu_check.Check("train:savi_ift@digits:bf16", ["python", "train.py", f"hydra.run.dir={run_dir}"])
    check.status = "ok"
    gpu_check.finish_train(check, output, "savi_ift")
    return check


@pytest.mark.parametrize("case,reason", [
    ({}, ""),
    ({"output": "UserWarning: cg: 3/128 problems not converged, max relative residual 1e-3"}, "CG did not converge"),
    ({"unconverged": 2}, "CG did not converge"),
    ({"nonstationary": 0.5}, "non-stationary on up to 50%"),
    ({"test_loss": float("nan")}, "non-finite"),
    ({"test_loss": None}, "no test/loss"),
])
def test_a_savi_ift_run_fails_on_unconverged_solves_and_bad_metrics(gpu_check, tmp_path, case, reason):
    check = finished(gpu_check, tmp_path, **case)
    assert check.status == ("failed" if reason else "ok") and reason in check.reason, check
    if not reason:
        assert check.numbers["val/loss"] == 2.5 and check.numbers["inner/nonstationary_frac (max)"] == 0


def test_a_check_past_its_timeout_is_killed_and_still_reported(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run("--device", "cpu", "--quick", "--out", str(tmp_path), "--only", "bench:savi_memory_speed",
                 "--bench-timeout", "1")
    check = json.loads(out.read_text())["checks"][0]
    assert check["status"] == "timeout" and "killed" in check["reason"]
    assert result.returncode == 1
