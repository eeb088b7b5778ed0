"""The one way modules check their hyperparameters: each check returns the value or raises a
one-line ValueError naming the full config key (``model.<key>``), what it must be and what it got.
Nested keys pass their path below ``model``: ``hparams.positive("inner.tol", tol)``."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def fail(key: str, want: str, got: Any) -> None:
    """Raise the one-line error for ``model.<key>``; ``want`` completes "must be ..."."""
    raise ValueError(f"model.{key} must be {want}, got {got!r}")


def require(ok: bool, key: str, want: str, got: Any) -> Any:
    """``got`` when ``ok``, else the one-line error."""
    if not ok:
        fail(key, want, got)
    return got


def integer(key: str, value: Any, low: int = 0) -> int:
    """An int (not a bool) of at least ``low``."""
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= low
    return require(ok, key, f"an int >= {low}", value)


def positive(key: str, value: Any, allow_zero: bool = False, allow_none: bool = False) -> float | None:
    """A number > 0 (>= 0 with ``allow_zero``; None passes with ``allow_none``)."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
    want = f"a number {'>=' if allow_zero else '>'} 0" + (" or null" if allow_none else "")
    return float(require(ok, key, want, value))


def one_of(key: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices``."""
    return require(value in choices, key, f"one of {', '.join(map(str, choices))}", value)


def in_range(key: str, value: Any, low: float, high: float, closed_high: bool = False) -> float:
    """A number in ``[low, high)`` (``[low, high]`` with ``closed_high``)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and low <= value and (value <= high if closed_high else value < high))
    return float(require(ok, key, f"in [{low}, {high}{']' if closed_high else ')'}", value))
