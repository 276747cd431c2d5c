"""Bounds a user puts on a model: one definition for the config's ``constraints:`` and the CLI's
``--max-latency/--max-size/--min-accuracy`` (``show``, ``report``, ``export --pick``).

A bound on a cost (``max_*``) is known before training (see :mod:`automl._prescreen`): a trial that
breaks one stops before it trains. ``min_accuracy`` is known only after training: it keeps a trial
off the front, the knee and every pick. Both reach Optuna through its constraint mechanism: each
trial's record (:func:`automl._records.write_trial`) holds one named value per bound, as
``Trial.set_constraint`` stores it (Optuna 5's replacement of the samplers' ``constraints_func``;
the values live in the trial's system attributes, where TPE and NSGA-II read them to learn the
feasible region and ``study.best_trials`` drops infeasible ones).

This module imports nothing of the project but :mod:`automl._metrics`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Constraints"]

#: bound field -> (metric, is an upper bound)
_BOUNDS: dict[str, tuple[str, bool]] = {
    "max_latency_ms": ("latency_ms", True),
    "max_size_bytes": ("size_bytes", True),
    "max_params": ("params", True),
    "max_macs": ("macs", True),
    "min_accuracy": ("accuracy", False),
}


class Constraints(BaseModel):
    """Bounds on a model's numbers (None = unbounded); validated once and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_latency_ms: float | None = Field(default=None, gt=0)
    max_size_bytes: float | None = Field(default=None, gt=0)
    max_params: float | None = Field(default=None, gt=0)
    max_macs: float | None = Field(default=None, gt=0)
    min_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)

    def bounds(self) -> list[tuple[str, str, bool, float]]:
        """``(field, metric, is_max, bound)`` of every set bound, in a fixed order."""
        return [(f, m, is_max, float(getattr(self, f))) for f, (m, is_max) in _BOUNDS.items() if getattr(self, f) is not None]

    @property
    def empty(self) -> bool:
        return not self.bounds()

    def violations(self, metrics: Mapping[str, Any], *, only: tuple[str, ...] | None = None) -> dict[str, float]:
        """Optuna constraint values of ``metrics``, by bound field (``<= 0`` feasible): ``value -
        bound`` for a max, ``bound - value`` for a min.

        A bounded number that was not measured (None, NaN) counts as broken (``+inf`` is not
        accepted by Optuna; 1.0 is used): we cannot promise it holds. ``only`` restricts the check
        to those metrics; the others get 0 (not known yet, e.g. accuracy before training).
        """
        out: dict[str, float] = {}
        for f, metric, is_max, bound in self.bounds():
            v = metrics.get(metric)
            if only is not None and metric not in only:
                out[f] = 0.0
            elif v is None or not math.isfinite(float(v)):
                out[f] = 1.0
            else:
                out[f] = float(v) - bound if is_max else bound - float(v)
        return out

    def admits(self, row: Any) -> bool:
        """Whether a record (a mapping of metrics, or anything with ``.metrics``) meets every bound."""
        metrics = getattr(row, "metrics", row)
        return all(v <= 0 for v in self.violations(metrics).values())

    def merged(self, other: Constraints) -> Constraints:
        """The tighter of the two bounds per field (a study's config bounds with the CLI's)."""
        values: dict[str, float] = {}
        for f, (_, is_max) in _BOUNDS.items():
            a, b = getattr(self, f), getattr(other, f)
            if a is None or b is None:
                v = a if b is None else b
            else:
                v = min(a, b) if is_max else max(a, b)
            if v is not None:
                values[f] = v
        return Constraints(**values)

    def describe(self) -> str:
        parts = [f"{metric} {'<=' if is_max else '>='} {bound:g}" for _, metric, is_max, bound in self.bounds()]
        return " and ".join(parts) or "no constraint"

    def filter(self, rows: Any) -> list[Any]:
        return [r for r in rows if self.admits(r)]
