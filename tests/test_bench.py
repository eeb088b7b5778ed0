"""ift.bench: interleaved timing order and ratio spreads, markdown tables, the writer's provenance, and
`python -m ift.bench check` on a throwaway git repository (fresh, edited source, uncommitted source,
--quick run, missing provenance, unclaimed file)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ift import bench
from tests.conftest import ROOT, SHARED_MNIST


# --- timing --------------------------------------------------------------------------------------
def test_interleaved_alternates_order_and_drops_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a") or "A", "b": lambda: calls.append("b") or "B"}
    t = bench.interleaved(fns, repeats=3, warmup=1)
    # round 0 (warm-up) reversed, then given order, reversed, given order
    assert calls == ["b", "a", "a", "b", "b", "a", "a", "b"]
    assert len(t["a"].wall) == len(t["a"].cpu) == 3 and t["a"].last == "A" and t["b"].last == "B"
    assert all(x >= 0 for x in t["a"].wall)


def test_interleaved_section_times_only_the_wrapped_part():
    import time

    def f(clock):
        time.sleep(0.02)  # setup, not timed
        with clock:
            pass
        return 1

    t = bench.interleaved({"f": f}, repeats=2, warmup=0, section=True)
    assert max(t["f"].wall) < 0.015
    with pytest.raises(RuntimeError, match="never entered its Stopwatch"):
        bench.interleaved({"g": lambda clock: None}, repeats=1, section=True)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.interleaved({"f": f}, repeats=0)


def test_ratio_is_paired_per_round():
    a = bench.Timing(wall=[1.0, 2.0, 4.0], cpu=[1.0, 1.0, 1.0])
    b = bench.Timing(wall=[2.0, 2.0, 2.0], cpu=[2.0, 4.0, 8.0])
    r = bench.ratio(b, a)
    assert (r.min, r.median, r.max, r.n) == (0.5, 1.0, 2.0, 3)
    assert bench.ratio(b, a, cpu=True).to_dict() == {"min": 2.0, "median": 4.0, "max": 8.0, "n": 3}
    assert r.fmt() == "1.00 [0.50, 2.00]"
    assert bench.Spread.of([0.001, 0.003, 0.002]).fmt(".1f", scale=1e3) == "2.0 [1.0, 3.0]"
    with pytest.raises(ValueError, match="same interleaved"):
        bench.ratio(bench.Timing(wall=[1.0]), a)


def test_table():
    md = bench.table(["case", "ms", "x"], [["a", "1.0", 2], ["b", "3.5", 4]])
    assert md.splitlines() == ["| case | ms | x |", "|---|---:|---:|", "| a | 1.0 | 2 |", "| b | 3.5 | 4 |"]
    assert bench.table(["a", "b"], [], align="cc").splitlines()[1] == "|:---:|:---:|"
    with pytest.raises(ValueError, match="has 1 cells"):
        bench.table(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="align"):
        bench.table(["a", "b"], [], align="l")


def test_parser_defaults():
    args = bench.parser("Title.\n\nMore.").parse_args([])
    assert bench.out_dir(args) == bench.RESULTS and not args.quick
    quick = bench.parser(None).parse_args(["--quick"])
    assert bench.out_dir(quick) == bench.QUICK_OUT  # a smoke run never overwrites committed results
    assert bench.out_dir(bench.parser(None).parse_args(["--out", "x"])) == Path("x")


def test_environment_keys():
    env = bench.environment()
    for key in ("python", "torch", "numpy", "cpu", "torch_threads", "allocator_env", "device"):
        assert key in env
    assert "torch" in bench.describe(env)


# --- provenance and check on a throwaway repository -----------------------------------------------
def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "src" / "pkg" / "solver.py").write_text("x = 1\n")
    (root / "src" / "pkg" / "other.py").write_text("y = 1\n")
    (root / "benchmarks" / "demo.py").write_text("# demo\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    monkeypatch.setattr(bench, "REPO", root)
    monkeypatch.setattr(bench, "RESULTS", root / "benchmarks" / "results")
    monkeypatch.setattr(sys, "argv", [str(root / "benchmarks" / "demo.py"), "--repeats", "3",
                                      "--data", str(tmp_path / "data")])
    return root


def produce(repo: Path, sources=("src/pkg",), quick=False, name="demo") -> Path:
    args = argparse.Namespace(out=repo / "benchmarks" / "results", quick=quick, repeats=3)
    run = bench.Run(name, list(sources), args)
    return run.write({"rows": [{"a": 1.5}]}, "# Demo\n\n" + bench.table(["a"], [["1.5"]]))


def test_write_records_provenance(repo):
    path = produce(repo)
    doc = json.loads(path.read_text())
    p = doc["provenance"]
    assert doc["rows"] == [{"a": 1.5}]
    assert p["command"] == "python benchmarks/demo.py --repeats 3 --data ../data"  # no absolute paths
    assert set(p["sources"]) == {"benchmarks/demo.py", "src/pkg/other.py", "src/pkg/solver.py"}
    assert p["dirty_sources"] == [] and len(p["commit"]) == 40 and p["files"] == ["demo.json", "demo.md"]
    assert doc["arguments"]["out"] == "benchmarks/results"
    md = (repo / "benchmarks" / "results" / "demo.md").read_text()
    assert "Produced by `python benchmarks/demo.py --repeats 3 --data ../data` at commit" in md
    assert str(repo) not in path.read_text() + md  # no absolute paths
    assert bench.check(bench.RESULTS) == []
    assert bench.main(["check"]) == 0


def test_check_names_the_changed_source(repo, capsys):
    (repo / ".gitignore").write_text("*.local\n")
    (repo / "src" / "pkg" / "mine.local").write_text("ignored by git: not a source\n")
    produce(repo)
    (repo / "src" / "pkg" / "solver.py").write_text("x = 2\n")
    (repo / "src" / "pkg" / "new.py").write_text("z = 1\n")
    (repo / "src" / "pkg" / "other.local").write_text("ignored too\n")
    assert bench.check(bench.RESULTS) == [("demo.json", "src/pkg/new.py is new since the result was produced"),
                                          ("demo.json", "src/pkg/solver.py changed since the result was produced")]
    assert bench.main(["check"]) == 1
    assert "STALE benchmarks/results/demo.json: src/pkg/solver.py changed" in capsys.readouterr().out


def test_check_flags_uncommitted_sources_quick_runs_and_unclaimed_files(repo):
    (repo / "src" / "pkg" / "solver.py").write_text("x = 2\n")  # not committed
    produce(repo, sources=["src/pkg/solver.py"])
    produce(repo, sources=["src/pkg/other.py"], quick=True, name="q")
    (repo / "benchmarks" / "results" / "old.json").write_text('{"rows": []}')
    (repo / "benchmarks" / "results" / "old.md").write_text("| a |")
    (repo / "benchmarks" / "results" / "orphan.png").write_bytes(b"")
    (repo / "benchmarks" / "results" / "abs.json").write_text(json.dumps({"data": str(repo / "data" / "x")}))
    problems = dict(bench.check(bench.RESULTS))
    assert problems["demo.json"] == "produced from uncommitted sources: src/pkg/solver.py"
    assert problems["q.json"] == "a --quick smoke run"
    assert problems["old.{json,md}"] == "no provenance"
    assert problems["orphan.png"].startswith("no provenance")
    assert ("abs.json", f"holds absolute paths: {repo}/data/x") in bench.check(bench.RESULTS)
    assert "demo.md" not in problems  # claimed by demo.json


def test_command_line_of_a_shell_script_is_not_prefixed_with_python():
    assert bench.command_line(["scripts/check.sh", "3.12"]) == "scripts/check.sh 3.12"
    assert bench.command_line(["benchmarks/x.py", "--quick"]) == "python benchmarks/x.py --quick"


def test_absolute_paths_finds_this_machines_paths_but_not_relative_ones():
    tmp = tempfile.gettempdir()
    text = f'"{tmp}/a/b" and --old-tree ../..{tmp}/c (`{bench.REPO.parent}/d`)'
    assert bench.absolute_paths(text) == sorted([f"{tmp}/a/b", f"{bench.REPO.parent}/d"])


def test_sources_edited_during_the_run_count_as_uncommitted(repo):
    args = argparse.Namespace(out=repo / "benchmarks" / "results", quick=False)
    run = bench.Run("demo", ["src/pkg/other.py"], args)
    (repo / "src" / "pkg" / "other.py").write_text("y = 2\n")
    doc = json.loads(run.write({"x": 1}).read_text())
    assert doc["provenance"]["dirty_sources"] == ["src/pkg/other.py"]


def test_a_declared_source_that_does_not_exist_is_an_error(repo):
    with pytest.raises(ValueError, match=r"\['src/pkg/typo.py'\] do not exist"):
        bench.Run("demo", ["src/pkg/typo.py"], argparse.Namespace(out=repo / "r", quick=False))


def test_reserved_payload_keys(repo):
    run = bench.Run("demo", [], argparse.Namespace(out=repo / "r", quick=False))
    with pytest.raises(ValueError, match="reserved"):
        run.write({"provenance": 1})


def test_check_cli_on_a_missing_folder(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ift.bench", "check", "--results", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "is not a folder" in done.stdout


# --- every script of this harness, --quick, end to end ------------------------------------------------
def quick_run(script: str, tmp_path: Path, *extra: str, timeout: int = 600) -> dict:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    name = script.removesuffix(".py")
    documents = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert documents, f"{script} wrote no JSON to --out"
    for doc in documents.values():
        p = doc["provenance"]
        assert p["quick"] and p["script"] == f"benchmarks/{script}" and p["commit"]
        assert p["command"].startswith(f"python benchmarks/{script} --quick --out ")
        assert f"benchmarks/{script}" in p["sources"]
        for f in p["files"]:
            assert (out / f).is_file()
            if f.endswith(".md"):
                text = (out / f).read_text()
                assert "|---|" in text and "Produced by `python benchmarks/" in text
    assert all(reason for _, reason in bench.check(out))  # a smoke run is never a fresh result
    assert any(name in f for f in documents)
    return documents


@pytest.mark.parametrize("script", ["host_checks.py", "implicit_vs_unrolled.py"])
def test_quick_timing_scripts(script, tmp_path):
    docs = quick_run(script, tmp_path)
    doc = docs[script.replace(".py", ".json")]
    if script == "host_checks.py":
        assert {r["ratio_8_over_1"]["n"] for r in doc["rows"]} == {1}
    else:
        assert all(r["unrolled_over_implicit"]["min"] > 0 for r in doc["ratios"])
        assert max(r["rel_grad_error"] for r in doc["rows"] if r["method"] == "implicit" and r["iters"] == 50) < 1e-3


@pytest.mark.slow
def test_quick_imaml_sinusoid(tmp_path):
    doc = quick_run("imaml_sinusoid.py", tmp_path, "--wallclock-match")["imaml_sinusoid.json"]
    methods = {r["method"] for r in doc["summary"]}
    assert methods == {"maml", "imaml", "maml@imaml-time"}
    assert all("prox" in r["test_mse"] for r in doc["runs"])
    assert (tmp_path / "results" / "imaml_sinusoid.png").is_file()


needs_mnist = pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                 reason=f"MNIST idx files not in {SHARED_MNIST}")


@pytest.mark.slow
@needs_mnist
def test_quick_savi_inner_solvers(tmp_path):
    doc = quick_run("savi_inner_solvers.py", tmp_path)["savi_inner_solvers.json"]
    assert doc["records"][0]["solver"] == "newton (exact, default)" and doc["records"][0]["converged_frac"] > 0.5


