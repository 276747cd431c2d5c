"""The study's metric names, their directions and what each means: written once, imported everywhere.

This module imports nothing of the project (and no torch), so the config, the measurement, the Ray
Tune glue and the review code (``_pareto``, ``_report``, ``_cli``) can all read it.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["DEFAULT_DIRECTION", "METRIC_KEYS", "OBJECTIVE_METRICS", "ObjectiveName", "RUNTIMES", "Runtime"]

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

#: Every scalar a trial records (objectives and the numbers shown beside them). A trial's objective
#: values are its Optuna values; the others are user attributes of the same names.
METRIC_KEYS: tuple[str, ...] = (*OBJECTIVE_METRICS, "latency_iqr_ms", "state_dict_bytes")

#: Where latency is measured: the artifact ``automl export`` ships for that runtime.
Runtime = Literal["onnxruntime", "torchscript", "eager"]
RUNTIMES: tuple[str, ...] = ("onnxruntime", "torchscript", "eager")
