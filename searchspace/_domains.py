"""Hyperparameter domains of a compression method.

A method declares each of its settings as a domain. The study config may narrow a domain (a
sub-range, a subset of choices, or one fixed value); the narrowed domain is validated here once and
sampling goes through :meth:`Domain.suggest`, so `space(trial)` works with any Optuna trial,
including ``optuna.trial.FixedTrial`` and the trial Ray Tune's ``OptunaSearch`` hands out.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Sequence

import optuna

__all__ = ["Categorical", "Domain", "Float", "Int"]


class Domain(abc.ABC):
    """One searchable setting."""

    @abc.abstractmethod
    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Sample a value for parameter ``name`` from ``trial``; sampling only, no side effect."""

    @abc.abstractmethod
    def narrow(self, value: Any) -> Domain:
        """Return the sub-domain a config asks for, or raise ``ValueError`` stating the rule.

        Args:
            value: a fixed value, ``[low, high]`` for a numeric domain, or a list of choices.
        """

    @abc.abstractmethod
    def describe(self) -> str:
        """A short human description of what is allowed, used in error messages."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Float(Domain):
    """A float in ``[low, high]``, optionally log-scaled."""

    low: float
    high: float
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        if self.low == self.high:
            return float(self.low)
        return float(trial.suggest_float(name, self.low, self.high, log=self.log))

    def narrow(self, value: Any) -> Float:
        if _is_number(value):
            lo = hi = float(value)
        elif (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(_is_number(v) for v in value)
        ):
            lo, hi = float(value[0]), float(value[1])
        else:
            raise ValueError(f"expected a number or [low, high] within {self.describe()}, got {value!r}")
        if not (self.low <= lo <= hi <= self.high):
            raise ValueError(f"`{self.low} <= low <= high <= {self.high}` must hold, but got {value!r}")
        return Float(lo, hi, self.log)

    def describe(self) -> str:
        return f"[{self.low}, {self.high}]" + (" (log)" if self.log else "")


@dataclass(frozen=True)
class Int(Domain):
    """An integer in ``[low, high]``."""

    low: int
    high: int
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        if self.low == self.high:
            return int(self.low)
        return int(trial.suggest_int(name, self.low, self.high, log=self.log))

    def narrow(self, value: Any) -> Int:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if is_int(value):
            lo = hi = value
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) for v in value):
            lo, hi = value
        else:
            raise ValueError(
                f"expected an integer or [low, high] within {self.describe()}, got {value!r}"
            )
        if not (self.low <= lo <= hi <= self.high):
            raise ValueError(f"`{self.low} <= low <= high <= {self.high}` must hold, but got {value!r}")
        return Int(lo, hi, self.log)

    def describe(self) -> str:
        return f"integers in [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Categorical(Domain):
    """One of a fixed tuple of choices (str, int, float or bool)."""

    choices: tuple[Any, ...]

    def __init__(self, choices: Sequence[Any]) -> None:
        object.__setattr__(self, "choices", tuple(choices))

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if len(self.choices) == 1:
            return self.choices[0]
        return trial.suggest_categorical(name, self.choices)

    def narrow(self, value: Any) -> Categorical:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if v not in self.choices]
        if not values or bad:
            raise ValueError(f"allowed choices are {list(self.choices)}, got {value!r}")
        return Categorical(values)

    def describe(self) -> str:
        return f"one of {list(self.choices)}"
