"""The core's settings types, filled by applications from their config groups.

A :class:`ConfigGroup` is a frozen dataclass with ``from_dict``: unknown keys and renamed keys (or
values) fail with one line naming the key under the application's ``group`` (``group`` is a ClassVar
the application's subclass sets to its own config key; the core itself names no application key).

:class:`MinimizeConfig` holds the arguments of :func:`ift.implicit.minimize` (``method``, ``max_iter``,
``tol``, ``damping``, ``lr``, ``momentum``, ``betas``, ``clip``, ``max_abs``) plus the one
non-stationarity policy (:class:`NonStationary`) of an inner solve whose result feeds the IFT:

- ``drop``: a problem that stopped above ``tol`` leaves the implicit gradient path; each application
  says what it does with it (e.g. train it at its starting point, or leave it out of the outer loss);
- ``ift``: use the IFT anyway (at a non-stationary point it is the gradient of nothing in particular);
- ``error``: raise :class:`NonStationaryError`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

from ift.implicit.minimize import METHODS


class NonStationary(enum.StrEnum):
    """What an application does with a problem whose inner solve stopped above its tolerance."""

    DROP = "drop"
    IFT = "ift"
    ERROR = "error"


class NonStationaryError(RuntimeError):
    """An inner solve stopped above its tolerance under ``nonstationary=error``."""


def reject_renamed(values: Mapping[str, Any], renamed: Mapping[str, str], group: str,
                   renamed_values: Mapping[str, Mapping[Any, Any]] | None = None) -> None:
    """One ValueError line for a renamed config key or value. ``renamed``: old key -> new key, relative to
    ``group`` when it has no dot (``"max_iter"``), else the new full key (``"<other group>.<key>"``);
    ``renamed_values``: key -> {old value: new value}."""
    for old, new in renamed.items():
        if old in values:
            new_key = new if "." in new else f"{group}.{new}"
            raise ValueError(f"{group}.{old} was renamed {new_key} (the core's name); rename the key in your "
                             "config or override")
    for key, table in (renamed_values or {}).items():
        value = values.get(key)
        if isinstance(value, str) and value in table:
            raise ValueError(f"{group}.{key}={value} was renamed {group}.{key}={table[value]} (the core's name); "
                             "change the value in your config or override")


def require(ok: bool, group: str, key: str, want: str, got: Any) -> None:
    """The one-line settings error ``<group>.<key> must be <want>, got <got>``."""
    if not ok:
        raise ValueError(f"{group}.{key} must be {want}, got {got!r}")


def is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass(frozen=True)
class ConfigGroup:
    """Base of the core's settings types: ``from_dict`` with the one-line unknown / renamed key errors."""

    group: ClassVar[str] = "config"
    renamed: ClassVar[dict[str, str]] = {}
    renamed_values: ClassVar[dict[str, dict[Any, Any]]] = {}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None):
        values = dict(values or {})
        reject_renamed(values, cls.renamed, cls.group, cls.renamed_values)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{cls.group} has unknown keys {unknown}; known: {known}")
        return cls(**values)


@dataclass(frozen=True)
class MinimizeConfig(ConfigGroup):
    """Settings of an inner solve by :func:`ift.implicit.minimize` (see its arguments) and the
    non-stationarity policy; ``minimize_kwargs()`` gives minimize's keyword arguments. Applications
    subclass it for their defaults, their ``group`` and their own fields."""

    method: str = "newton"
    max_iter: int = 20
    tol: float = 1e-5
    damping: float = 1e-3
    lr: float = 1.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float | None = None
    max_abs: float = math.inf
    nonstationary: NonStationary = NonStationary.DROP

    group: ClassVar[str] = "inner"
    renamed: ClassVar[dict[str, str]] = {"rtol": "tol", "maxiter": "max_iter"}

    def __post_init__(self) -> None:
        g = self.group
        require(self.method in METHODS, g, "method", f"one of {', '.join(METHODS)}", self.method)
        require(not isinstance(self.max_iter, bool) and isinstance(self.max_iter, int) and self.max_iter >= 0,
                g, "max_iter", "an int >= 0", self.max_iter)
        require(is_number(self.tol) and self.tol >= 0, g, "tol", "a number >= 0", self.tol)
        require(is_number(self.damping) and self.damping > 0, g, "damping", "a number > 0", self.damping)
        require(is_number(self.lr) and self.lr > 0, g, "lr", "a number > 0", self.lr)
        require(is_number(self.momentum) and 0 <= self.momentum <= 1, g, "momentum", "in [0, 1]", self.momentum)
        require(self.clip is None or (is_number(self.clip) and self.clip > 0), g, "clip", "a number > 0 or null",
                self.clip)
        require(is_number(self.max_abs) and self.max_abs > 0, g, "max_abs", "a number > 0", self.max_abs)
        betas = tuple(self.betas)
        require(len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas), g, "betas",
                "two numbers in [0, 1)", self.betas)
        object.__setattr__(self, "betas", betas)
        policies = [p.value for p in NonStationary]
        require(self.nonstationary in policies, g, "nonstationary", f"one of {', '.join(policies)}",
                self.nonstationary)
        object.__setattr__(self, "nonstationary", NonStationary(self.nonstationary))

    def minimize_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ift.implicit.minimize` these settings fix."""
        return {"method": self.method, "max_iter": self.max_iter, "tol": self.tol, "damping": self.damping,
                "lr": self.lr, "momentum": self.momentum, "betas": self.betas, "clip": self.clip,
                "max_abs": self.max_abs}
