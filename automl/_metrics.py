"""The study's metric names, their directions and what each means: written once, imported everywhere.

This module imports nothing of the project (and no torch), so the config, the measurement, the Ray
Tune glue, the trial records (:mod:`automl._records`) and the review code (``_pareto``, ``_report``,
``_cli``) can all read it. What each number measures is :mod:`automl._measure`'s docstring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = ["DEFAULT_DIRECTION", "MEASURED_KEYS", "METRIC_KEYS", "Metrics", "OBJECTIVE_METRICS", "ObjectiveName", "RUNTIMES", "Runtime"]

#: Metrics a study may optimise, with their natural direction.
DEFAULT_DIRECTION: dict[str, str] = {
    "accuracy": "maximize",
    "size_bytes": "minimize",
    "params": "minimize",
    "latency_ms": "minimize",
    "macs": "minimize",
}
OBJECTIVE_METRICS: tuple[str, ...] = tuple(DEFAULT_DIRECTION)
ObjectiveName = Literal["accuracy", "size_bytes", "params", "latency_ms", "macs"]

#: Every scalar a trial records: the objectives and the numbers shown beside them.
METRIC_KEYS: tuple[str, ...] = (*OBJECTIVE_METRICS, "latency_iqr_ms", "state_dict_bytes")

#: Where latency is measured: the artifact ``automl export`` ships for that runtime.
Runtime = Literal["onnxruntime", "torchscript", "eager"]
RUNTIMES: tuple[str, ...] = ("onnxruntime", "torchscript", "eager")


@dataclass(frozen=True)
class Metrics:
    """Every number measured on one model (see :mod:`automl._measure` for what each means)."""

    accuracy: float
    params: int
    size_bytes: int
    macs: int | None
    latency_ms: float
    latency_iqr_ms: float
    state_dict_bytes: int | None = None
    #: The runtime whose artifact was measured (``latency.runtime``).
    runtime: str | None = None
    exit_fractions: list[float] | None = None
    exit_accuracy: list[float | None] | None = None
    exit_macs: list[int | None] | None = None
    #: Per-sample timing (a dynamic model): median and 90th percentile over the test samples of
    #: each sample's latency, in ms; ``latency_ms`` is their mean. None for a static model.
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    #: Where ``latency_ms`` was measured (:func:`automl._target.provenance`), as JSON text: Ray
    #: Tune flattens nested results, so text keeps one shape in every record.
    latency_target: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: What a trial's record holds of its measured model: every field of :class:`Metrics`, each under
#: its own user attribute (None where nothing was measured), whatever the study's objectives are.
MEASURED_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Metrics))
