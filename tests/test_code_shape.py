"""The layout rules of CONTRIBUTING.md that a reviewer would otherwise check by eye: short functions,
and a core (``ift.implicit``) that names none of the applications built on it."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_BODY_LINES = 50
CORE = ROOT / "src" / "ift" / "implicit"
# Application names, their packages and their config keys (``model.inner.tol``) have no place in the core.
APPLICATION_WORDS = re.compile(r"\b(savi|i?maml|optnet|saliency|sudoku|sa-vae)\b|\bift\.(savi|imaml|optnet|saliency)\b"
                               r"|\bmodel\.[a-z_]+", re.IGNORECASE)


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring does not count
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def _sources() -> list[Path]:
    return sorted((ROOT / "src").rglob("*.py")) + [ROOT / "train.py", ROOT / "eval.py"]


def test_no_function_body_is_longer_than_fifty_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({_body_lines(node)} lines)"
            for path in _sources() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > MAX_BODY_LINES]
    assert not long, f"split these functions (body > {MAX_BODY_LINES} lines, docstring aside): {long}"


def test_the_core_names_no_application():
    hits = [f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}"
            for path in sorted(CORE.glob("*.py")) if path.name != "examples.py"
            for lineno, line in enumerate(path.read_text().splitlines(), 1) if APPLICATION_WORDS.search(line)]
    assert not hits, f"the core names an application or a model.* config key: {hits}"


def test_the_checks_see_the_layout_they_guard():
    # Guards against a moved tree making both tests above vacuous.
    assert len(list(CORE.glob("*.py"))) >= 5 and len(_sources()) >= 40
