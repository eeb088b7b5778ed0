"""The benchmark harness every script in ``benchmarks/`` uses.

One CLI convention, one writer, provenance in every result:

    from ift import bench

    SOURCES = ["src/ift/implicit/minimize.py"]        # what the result measures (files or folders)

    parser = bench.parser(__doc__)                     # --out DIR (default benchmarks/results), --quick
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    run = bench.Run("host_checks", SOURCES, args)      # provenance + environment, taken now
    times = bench.interleaved({"a": f, "b": g}, repeats=args.repeats)
    r = bench.ratio(times["b"], times["a"])            # per-repeat ratios: min / median / max
    run.write({"rows": rows}, "# Title\\n\\n" + bench.table(["case", "b / a"], [["x", r.fmt()]]))

``Run.write`` writes ``<out>/<name>.json`` (payload + ``provenance`` + ``environment``),
``<out>/<name>.md`` (the markdown plus a provenance footer) and any figures. ``--quick`` runs default
to a temporary folder, so a smoke run never overwrites a committed result.

``python -m ift.bench check`` (``make results-check``) lists every result in ``benchmarks/results``
that is stale: its measured sources (or the script) changed since it was produced, it was produced
from uncommitted measured sources or by a ``--quick`` run, it has no provenance, a file there is
claimed by no result, or it holds an absolute path of this machine; it exits 1 if any is.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
QUICK_OUT = Path(tempfile.gettempdir()) / "ift-bench-quick"
# Environment variables that change allocation behaviour (and so timings).
ALLOCATOR_ENV = ("MALLOC_", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_NO_CUDA_MEMORY_CACHING", "LD_PRELOAD")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# --- command line --------------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared flags: ``--out DIR`` and ``--quick``."""
    text = (doc or "").strip()
    p = argparse.ArgumentParser(description=text.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder for the results (default benchmarks/results; with --quick {QUICK_OUT})")
    p.add_argument("--quick", action="store_true", help="a small smoke run (numbers meaningless)")
    return p


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out is not None else (QUICK_OUT if args.quick else RESULTS)


# --- provenance ----------------------------------------------------------------------------------
def _git(*cmd: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def relative(path: Path | str) -> str:
    """``path`` relative to the repository (``../`` for one outside it): results hold no absolute paths."""
    return Path(os.path.relpath(Path(path).resolve(), REPO)).as_posix()


def expand_sources(declared: Iterable[str]) -> list[str]:
    """Repository-relative files of the declared sources; a folder stands for every file in it that
    git does not ignore (tracked or new)."""
    files = set()
    for entry in declared:
        path = REPO / entry
        if path.is_dir():
            listed = _git("ls-files", "--cached", "--others", "--exclude-standard", "--", entry)
            if listed is None:  # no git: every file bar caches
                listed = "\n".join(p.relative_to(REPO).as_posix() for p in path.rglob("*")
                                   if p.is_file() and "__pycache__" not in p.parts)
            files.update(f for f in listed.splitlines() if f and (REPO / f).is_file())
        else:
            files.add(Path(entry).as_posix())
    return sorted(files)


def file_hash(relpath: str) -> str | None:
    """sha256 of a repository file's bytes, or None if it does not exist."""
    path = REPO / relpath
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _uncommitted(files: Sequence[str]) -> list[str]:
    """The files among ``files`` with uncommitted changes (or untracked); all of them without git."""
    if not files:
        return []
    status = _git("status", "--porcelain", "--untracked-files=all", "--", *files)
    if status is None:
        return list(files)
    return sorted({line[3:].strip().split(" -> ")[-1] for line in status.splitlines() if line.strip()})


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a result, with paths inside the repository made relative to it."""
    argv = list(sys.argv if argv is None else argv)
    parts = [] if argv and argv[0].endswith(".sh") else ["python"]  # a shell script runs itself
    for i, arg in enumerate(argv):
        if i == 0 or os.path.isabs(arg):
            arg = relative(arg)
        parts.append(arg)
    return shlex.join(parts)


def provenance(script: str, sources: Sequence[str], quick: bool = False) -> dict:
    """Git commit, dirty flags, command line and the content hash of the script and each measured file."""
    declared = [script, *sources]
    files = expand_sources(declared)
    missing = [f for f in files if file_hash(f) is None]
    if missing:
        raise ValueError(f"measured sources {missing} do not exist; fix the script's SOURCES (paths from the repository root)")
    commit = _git("rev-parse", "HEAD")
    return {
        "commit": commit.strip() if commit else None,
        "command": command_line(),
        "script": script,
        "declared_sources": list(sources),
        "sources": {f: file_hash(f) for f in files},
        "dirty_sources": _uncommitted(files),
        "tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "quick": quick,
    }


# --- environment ---------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | None = None) -> dict:
    """Versions, threads, CPU, device and allocator settings of this process."""
    import numpy
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(ALLOCATOR_ENV)},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": device or "cpu",
    }
    if device is not None and device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    return env


def describe(env: Mapping) -> str:
    """One line for a markdown header: device, CPU, threads, versions."""
    device = env.get("device_name") or env["device"]
    return (f"{device} ({env['cpu']}, {env['torch_threads']} torch thread(s)), python {env['python']}, "
            f"torch {env['torch']}, numpy {env['numpy']}")


# --- timing --------------------------------------------------------------------------------------
def synchronize(device: str | None) -> None:
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


class Stopwatch:
    """Wall seconds and CPU seconds of the calling thread of the ``with`` block (synchronising
    ``device`` at both ends). CPU time is less disturbed than wall time on a shared machine."""

    def __init__(self, device: str | None = None) -> None:
        self.device, self.wall, self.cpu = device, math.nan, math.nan

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall, self.cpu = time.perf_counter() - self._wall, time.thread_time() - self._cpu


@dataclasses.dataclass(frozen=True)
class Spread:
    """min / median / max of a sample."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("Spread.of needs at least one value")
        return cls(min(values), statistics.median(values), max(values), len(values))

    def fmt(self, spec: str = ".2f", scale: float = 1.0) -> str:
        """``median [min, max]``, e.g. ``1.06 [1.02, 1.10]``."""
        return (f"{self.median * scale:{spec}} [{self.min * scale:{spec}}, {self.max * scale:{spec}}]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Timing:
    """Seconds of each timed call (wall and CPU of the calling thread) and the last return value."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    last: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def spread(self, cpu: bool = False) -> Spread:
        return Spread.of(self.cpu if cpu else self.wall)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.wall), "max_s": max(self.wall),
                "cpu_median_s": statistics.median(self.cpu), "wall_s": self.wall, "cpu_s": self.cpu}


def interleaved(fns: Mapping[str, Callable], repeats: int, warmup: int = 1, device: str | None = None,
                section: bool = False) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, interleaved: round r calls all of them, in the given
    order on odd rounds and reversed on even ones, so every method sees the same machine load and
    neither always goes first. ``warmup`` untimed rounds come first. With ``section=True`` each
    callable gets a ``Stopwatch`` and times only the part it wraps in ``with clock:``."""
    if repeats < 1:
        raise ValueError(f"interleaved: repeats must be >= 1, got {repeats}")
    names = list(fns)
    timings = {name: Timing() for name in names}
    for rnd in range(warmup + repeats):
        for name in (names if rnd % 2 else names[::-1]):
            clock = Stopwatch(device)
            if section:
                value = fns[name](clock)
                if math.isnan(clock.wall):
                    raise RuntimeError(f"interleaved(section=True): {name!r} never entered its Stopwatch")
            else:
                with clock:
                    value = fns[name]()
            timings[name].last = value
            if rnd >= warmup:
                timings[name].wall.append(clock.wall)
                timings[name].cpu.append(clock.cpu)
    return timings


def ratio(numerator: Timing, denominator: Timing, cpu: bool = False) -> Spread:
    """Spread of the per-round ratios numerator / denominator (paired: both timed in the same round)."""
    a, b = (numerator.cpu, denominator.cpu) if cpu else (numerator.wall, denominator.wall)
    if len(a) != len(b):
        raise ValueError(f"ratio: {len(a)} vs {len(b)} samples; time both in the same interleaved() call")
    return Spread.of([x / y for x, y in zip(a, b)])


# --- markdown ------------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A markdown table; cells are ``str()``-ed (format numbers before). ``align``: one of l/r/c per
    column (default: first column left, the others right)."""
    header = list(header)
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"table: {len(header)} columns but align={align!r}")
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        row = [str(c) for c in row]
        if len(row) != len(header):
            raise ValueError(f"table: row {row} has {len(row)} cells, header has {len(header)}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# --- writer --------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return relative(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _arguments(args: argparse.Namespace) -> dict:
    return {k: (relative(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


class Run:
    """One benchmark run: provenance and environment taken at construction, written by ``write`` to
    ``out`` (default: ``--out``, see :func:`out_dir`)."""

    def __init__(self, name: str, sources: Sequence[str], args: argparse.Namespace, device: str | None = None,
                 script: str | None = None, out: Path | None = None) -> None:
        self.name, self.args, self.out = name, args, Path(out) if out is not None else out_dir(args)
        self.script = script or relative(sys.argv[0])
        self.provenance = provenance(self.script, sources, quick=bool(getattr(args, "quick", False)))
        self.environment = environment(device)

    def footer(self) -> str:
        p = self.provenance
        state = ("measured sources uncommitted: " + ", ".join(p["dirty_sources"]) if p["dirty_sources"]
                 else "measured sources committed")
        load = self.environment["load_average"]
        load = f"; load average {load[0]:.1f} on {self.environment['cpu_count']} CPUs at the start" if load else ""
        return (f"\n---\nProduced by `{p['command']}` at commit `{(p['commit'] or 'unknown')[:12]}` ({state}"
                f"{', --quick smoke run' if p['quick'] else ''}); {describe(self.environment)}{load}.\n")

    def write(self, payload: Mapping, markdown: str | None = None, figures: Mapping[str, Any] | None = None,
              files: Sequence[str] = ()) -> Path:
        """Write ``<name>.json`` (payload + provenance + environment), ``<name>.md`` (markdown + footer)
        and each figure (``{"<file>.png": matplotlib figure}``); ``files``: other files (relative to the
        output folder) this script wrote, claimed by this result. Returns the JSON path."""
        reserved = {"provenance", "environment", "arguments"} & set(payload)
        if reserved:
            raise ValueError(f"Run.write: payload keys {sorted(reserved)} are reserved for the harness")
        self.out.mkdir(parents=True, exist_ok=True)
        now = {f: file_hash(f) for f in self.provenance["sources"]}
        changed = sorted(f for f, h in now.items() if h != self.provenance["sources"][f])
        if changed:  # edited while it ran: the result matches neither version
            self.provenance["dirty_sources"] = sorted(set(self.provenance["dirty_sources"]) | set(changed))
        written = [f"{self.name}.json"]
        if markdown is not None:
            (self.out / f"{self.name}.md").write_text(markdown.rstrip("\n") + "\n" + self.footer())
            written.append(f"{self.name}.md")
        for filename, fig in (figures or {}).items():
            fig.savefig(self.out / filename, dpi=120)
            written.append(filename)
        self.provenance["files"] = written + list(files)
        document = {**payload, "arguments": _arguments(self.args), "provenance": self.provenance,
                    "environment": self.environment}
        path = self.out / f"{self.name}.json"
        path.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
        print(f"wrote {', '.join(written)} to {relative(self.out)}", flush=True)
        return path


# --- results-check -------------------------------------------------------------------------------
def stale_reasons(document: Mapping) -> list[str]:
    """Why a result (its parsed JSON) is stale; empty if fresh."""
    p = document.get("provenance")
    if not isinstance(p, Mapping) or "sources" not in p:
        return ["no provenance"]
    reasons = []
    if p.get("quick"):
        reasons.append("a --quick smoke run")
    if p.get("commit") is None:
        reasons.append("no git commit recorded")
    if p.get("dirty_sources"):
        reasons.append("produced from uncommitted sources: " + ", ".join(p["dirty_sources"]))
    recorded = p["sources"]
    current = expand_sources([p["script"], *p.get("declared_sources", [])])
    for f in sorted(set(recorded) | set(current)):
        now = file_hash(f) if f in current else None
        if f not in recorded:
            reasons.append(f"{f} is new since the result was produced")
        elif now is None:
            reasons.append(f"{f} no longer exists")
        elif now != recorded[f]:
            reasons.append(f"{f} changed since the result was produced")
    return reasons


def absolute_paths(text: str) -> list[str]:
    """Absolute paths of this machine in ``text`` (the repository's folder, its parent, home, /tmp)."""
    roots = {str(REPO.parent), str(Path.home()), tempfile.gettempdir()} - {"/"}
    # Not inside a longer path: "../../tmp/x" is relative and fine.
    return sorted({m.group(0) for root in roots
                   for m in re.finditer(r"(?<![\w./-])" + re.escape(root) + r"/[^\s\"'`)]*", text)})


def check(results: Path = RESULTS) -> list[tuple[str, str]]:
    """(result, reason) for every stale result under ``results`` and every file no result claims."""
    problems, claimed = [], set()
    for path in sorted(results.rglob("*.json")):
        rel = path.relative_to(results).as_posix()
        try:
            text = path.read_text()
            document = json.loads(text)
        except (OSError, ValueError) as err:
            problems.append((rel, f"unreadable JSON ({err})"))
            continue
        found = absolute_paths(text)
        if found:
            problems.append((rel, "holds absolute paths: " + ", ".join(found[:3])))
        if isinstance(document, Mapping) and isinstance(document.get("provenance"), Mapping):
            base = path.parent.relative_to(results)
            claimed.update((base / f).as_posix() for f in document["provenance"].get("files", []))
            claimed.add(rel)
            problems += [(rel, reason) for reason in stale_reasons(document)]
    unclaimed: dict[str, list[str]] = {}  # x.json, x.md, x.png of an old result: one line
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        rel = path.relative_to(results).as_posix()
        if rel not in claimed:
            unclaimed.setdefault(rel.removesuffix(path.suffix), []).append(path.suffix)
    for stem, suffixes in unclaimed.items():
        name = stem + (suffixes[0] if len(suffixes) == 1 else  # shell brace form: x.{json,md}
                       ".{" + ",".join(sorted(s.lstrip(".") for s in suffixes)) + "}")
        problems.append((name, "no provenance" if ".json" in suffixes else
                         "no provenance (no result JSON with provenance claims this file)"))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ift.bench", description="Benchmark results tools.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="list stale results; exit 1 if any")
    c.add_argument("--results", type=Path, default=RESULTS)
    opts = p.parse_args(argv)
    if not opts.results.is_dir():
        print(f"results-check: {opts.results} is not a folder; pass --results DIR")
        return 2
    problems = check(opts.results)
    for result, reason in problems:
        print(f"STALE {relative(opts.results / result)}: {reason}")
    n = len({r for r, _ in problems})
    print(f"results-check: {n} stale result(s)" if problems else "results-check: every result is fresh")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
