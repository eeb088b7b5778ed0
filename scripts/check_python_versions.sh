#!/usr/bin/env bash
# A fresh venv per Python version (pyenv's 3.12 and 3.13 by default): install the project with the
# tested versions (pip install -c constraints.txt -e '.[test]'), check that pip installed exactly
# those versions, then train `python train.py debug=fast` on the bundled digits. Writes
# benchmarks/results/python_versions.{json,md} (one entry per version; the install time includes
# the downloads: the package index has no local wheels for these versions).
#   scripts/check_python_versions.sh            # 3.12 and 3.13
#   scripts/check_python_versions.sh 3.13       # one version
# Run it niced on a shared machine: nice -n 10 scripts/check_python_versions.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSIONS=("$@")
[ $# -eq 0 ] && VERSIONS=(3.12 3.13)
WORK=${IFT_PYCHECK_DIR:-/tmp/ift-python-versions}
OUT=benchmarks/results
mkdir -p "$WORK" "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline WANDB_SILENT=true

check_version() {  # $1 = 3.12: writes $WORK/py$1/result.json
  local ver=$1 dir=$WORK/py$1 python
  python=$(pyenv root)/versions/$(pyenv versions --bare | grep -E "^${ver//./\\.}(\.[0-9]+)?$" | tail -1)/bin/python
  rm -rf "$dir" && mkdir -p "$dir"
  local start=$SECONDS status=ok
  if ! "$python" -m venv "$dir/venv" >"$dir/install.log" 2>&1; then status=no-python; fi
  [ $status = ok ] && { "$dir/venv/bin/python" -m pip install -c constraints.txt \
      -e '.[test]' >>"$dir/install.log" 2>&1 || status=install-failed; }
  local install_s=$((SECONDS - start)) train_s=0 mismatches=""
  if [ $status = ok ]; then
    mismatches=$("$dir/venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null | grep -v ' @ ' \
      | grep -vxFf <(grep -v '^#' constraints.txt) | tr '\n' ' ')
    start=$SECONDS
    "$dir/venv/bin/python" train.py debug=fast logger=csv paths.log_dir="$dir/logs" >"$dir/train.log" 2>&1 \
      || status=train-failed
    train_s=$((SECONDS - start))
  fi
  "$dir/venv/bin/python" - "$dir" "$ver" "$status" "$install_s" "$train_s" "$mismatches" <<'EOF' \
    || echo "{\"python\": \"$ver\", \"status\": \"$status\"}" >"$dir/result.json"
import glob, json, platform, subprocess, sys
from pathlib import Path
d, ver, status, install_s, train_s, mismatches = sys.argv[1:]
metrics = sorted(glob.glob(f"{d}/logs/train/runs/*/test_metrics.json"))
import torch
entry = {"python": platform.python_version(), "status": status, "torch": torch.__version__,
         "install_s": int(install_s), "train_debug_fast_s": int(train_s),
         "not_as_in_constraints": mismatches.split(),
         "test_metrics": json.loads(Path(metrics[-1]).read_text())["metrics"] if metrics else None}
Path(d, "result.json").write_text(json.dumps(entry, indent=2))
EOF
  echo "Python $ver: $status (logs in $dir)"
}

for ver in "${VERSIONS[@]}"; do check_version "$ver"; done

# The report goes through ift.bench (provenance: commit, the files it measures), in the project's venv.
"$ROOT/.venv/bin/python" - "$WORK" "$OUT" "${VERSIONS[@]}" <<'EOF'
import argparse, json, sys
from pathlib import Path
from ift import bench
work, out, versions = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
sys.argv = ["scripts/check_python_versions.sh", *versions]  # the command the provenance records
run = bench.Run("python_versions", ["constraints.txt", "pyproject.toml"],
                argparse.Namespace(out=out, versions=versions, quick=False), script="scripts/check_python_versions.sh")
runs = [json.loads(Path(work, f"py{v}", "result.json").read_text()) for v in versions]
rows = [[r["python"], r["status"], r.get("torch", "-"), r.get("install_s", "-"),
         " ".join(r.get("not_as_in_constraints") or []) or "none", r.get("train_debug_fast_s", "-"),
         "-" if (r.get("test_metrics") or {}).get("test/loss") is None else f"{r['test_metrics']['test/loss']:.2f}"]
        for r in runs]
markdown = ("# Fresh installs on other Python versions\n\n"
            "Each: a new venv, `pip install -c constraints.txt -e '.[test]'`, then `python train.py debug=fast` "
            "(a shared 2-core machine: times are not benchmarks).\n\n"
            + bench.table(["Python", "status", "torch", "install (s, incl. download)",
                           "versions not as in constraints.txt", "train debug=fast (s)", "test/loss"], rows))
run.write({"runs": runs}, markdown)
print(markdown)
EOF
