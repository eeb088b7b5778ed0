"""Every command in README.md and docs/*.md runs as written on a fresh clone.

Commands are taken from fenced `bash`/`sh`/`console` blocks and from inline code spans that start
with `python`, `make`, `srun` or an environment assignment. Without running long trainings:

- `python train.py ...` / `python eval.py ...`: the overrides compose through Hydra exactly as the
  entry point composes them (unknown keys or options fail), `-m` is not combined with `--cfg`, a
  SLURM sweep passes the launcher's checks (explicit device counts), and the config checks that run
  before training pass, except that paths written as placeholders (`/path/to/...`, `<run>`) are
  accepted; any other `data.root` / `ckpt_path` must exist in a fresh clone.
- `python benchmarks/x.py --flag ...`: the script exists and defines every flag used.
- `make target ARGS=...`: the target exists in the Makefile and its ARGS compose as above.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from tests.conftest import CONFIGS, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`((?:[A-Z_]+=\S+\s+)*(?:python|make|srun)\s[^`]+)`")
PLACEHOLDER = re.compile(r"^/path/to/|PLACEHOLDER_")


def strip_comment(line: str) -> str:
    """Drop a trailing `# comment` that is outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "\"'" and quote in (None, ch):
            quote = None if quote == ch else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def check_no_angle_placeholders(command: str) -> None:
    """In a shell `<run>` is an input redirection: fenced commands must run when pasted."""
    assert not re.search(r"<[^>]+>", command), \
        "a shell reads <...> as a redirection: write ckpt_path=last, /path/to/..., or move it to the prose"


def extract(path: Path) -> list[tuple[str, str]]:
    """(`file:line`, command) for every shell command in a markdown file."""
    found, lang, pending, start = [], None, "", 0
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line.strip())
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        where = f"{path.relative_to(ROOT)}:{number}"
        if lang in ("bash", "sh", "shell", "console"):
            text = strip_comment(line.strip().removeprefix("$ "))
            if not pending:
                start = number
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            command, pending = (pending + text).strip(), ""
            if command:
                found.append((f"{path.relative_to(ROOT)}:{start}", "FENCED " + command))
        elif lang is None:
            found += [(where, m.group(1).strip()) for m in INLINE.finditer(line)]
    return found


COMMANDS = [item for doc in DOCS for item in extract(doc)]


def tracked(path: str) -> bool:
    """The path exists in a fresh clone (relative paths are relative to the repository root)."""
    p = Path(path)
    if p.is_absolute() or ".." in p.parts:
        return False
    listed = subprocess.run(["git", "ls-files", "--", path], cwd=ROOT, capture_output=True, text=True).stdout
    return bool(listed.strip())


def split_env(words: list[str]) -> list[str]:
    while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] in ("srun", "env")):
        words = words[1:]
    return words


def check_entry_point(script: str, args: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ift.config import Preflight
    from ift.validation import check_eval_keys, validate_config

    if "--help" in args:  # Hydra's help lists the config groups: run it as written
        done = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and "Configuration groups" in done.stdout, done.stderr[-2000:]
        return
    if any(a.startswith("hparams_search=") for a in args) and importlib.util.find_spec(
            "hydra_plugins.hydra_optuna_sweeper") is None:
        pytest.skip("hydra-optuna-sweeper not installed (pip install -e '.[optuna]')")
    multirun = any(a in ("-m", "--multirun") for a in args)
    assert not (multirun and any(a.startswith("--cfg") or a == "-c" for a in args)), \
        "Hydra rejects -m together with --cfg: show the config of one job without -m"
    overrides, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-m", "--multirun"):
            continue
        if a in ("--cfg", "-c", "--package", "-p"):
            skip = True
            continue
        assert not a.startswith("-"), f"unknown flag {a}"
        key, _, value = a.partition("=")
        if multirun and "," in value and not value.startswith("["):
            value = value.split(",")[0]  # one point of the sweep
        overrides.append(f"{key}={value}")
    name = script.removesuffix(".py")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    if multirun:
        with _no_exit():
            Preflight().on_multirun_start(config=cfg)
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "last", "???"):
        assert PLACEHOLDER.search(str(ckpt)) or tracked(str(ckpt)), f"ckpt_path={ckpt}: not a file of a fresh clone"
    written = next((a.split("=", 1)[1] for a in overrides if a.startswith("data.root=")), None)
    if written is not None:
        assert PLACEHOLDER.search(written) or tracked(written), f"data.root={written}: not a path a user has"
    if name == "train":
        if cfg.data.get("root") is not None and not cfg.data.get("download", False):
            assert written is not None, f"{cfg.data._target_} needs data.root=/path/to/<folder> (none in a fresh clone)"
        with open_dict(cfg):
            cfg.data.root, cfg.ckpt_path = None, None  # checked above
        validate_config(cfg)
    if name == "eval":
        check_eval_keys(cfg.eval)


class _no_exit:
    """Turn the preflight's sys.exit(1) into a test failure with its message."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is SystemExit:
            pytest.fail(f"the SLURM launch would stop: exit {value.code} (message on stderr above)")
        return False


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))


def check(command: str) -> None:
    if command.startswith("FENCED "):
        command = command.removeprefix("FENCED ")
        check_no_angle_placeholders(command)
    # Prose placeholders such as <run> stand for a folder the reader has: compose with a stand-in.
    words = split_env(shlex.split(re.sub(r"<([^>]+)>", r"PLACEHOLDER_\1", command)))
    assert words, command
    program = words[0]
    if program == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        assert targets and set(targets) <= make_targets(), f"unknown make target in {targets}"
        args = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("ARGS=")), None)
        if args is not None and targets[0] in ("train", "eval"):
            check_entry_point(f"{targets[0]}.py", shlex.split(args))
        return
    if program.startswith("python"):
        rest = words[1:]
        if rest[:2] == ["-m", "ift.compare"]:
            assert rest[2:3] in (["runs"], ["sweep"]), f"ift.compare has the commands runs and sweep, got {rest[2:3]}"
            return
        if rest[:1] == ["-m"]:
            return  # python -m pytest / pip: not ours to check
        script = rest[0]
        assert (ROOT / script).is_file(), f"{script} does not exist"
        if script in ("train.py", "eval.py"):
            check_entry_point(script, rest[1:])
        else:
            source = (ROOT / script).read_text()
            # bench.parser gives every script on the harness --out and --quick
            shared = {"--out", "--quick"} if "bench.parser(" in source else set()
            for flag in (w.split("=", 1)[0] for w in rest[1:] if w.startswith("--")):
                assert flag in shared or f'"{flag}"' in source or f"'{flag}'" in source, f"{script} defines no {flag}"
        return
    # Other tools (pip, conda, wandb sync, git ...) are not this project's commands.


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs_as_written(where, command):
    check(command)


def test_commands_were_found():
    """The extraction must see the entry-point commands (a broken extractor would pass everything)."""
    words = [split_env(shlex.split(c.removeprefix("FENCED ").replace("<", "").replace(">", ""))) for _, c in COMMANDS]
    scripts = {w[1] for w in words if w[0].startswith("python")}
    assert {"train.py", "eval.py"} <= scripts, scripts
    assert len(COMMANDS) >= 20, COMMANDS
