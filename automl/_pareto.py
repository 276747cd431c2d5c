"""The Pareto front of a study as plain records (data apart from drawing, Optuna style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna

__all__ = ["FrontRow", "StudyView", "front_rows", "load_view", "params_summary"]

_METRIC_KEYS = ("accuracy", "params", "size_bytes", "macs", "latency_ms", "latency_iqr_ms")


@dataclass(frozen=True)
class FrontRow:
    """One finished trial with every measured number and its ratios to the base model."""

    number: int
    method: str
    params: dict[str, Any]
    metrics: dict[str, float | None]
    compression: float | None = None  # base size_bytes / size_bytes
    speedup: float | None = None  # base latency / latency
    accuracy_delta: float | None = None  # accuracy - base accuracy (fraction)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyView:
    name: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    base: dict[str, Any]
    trials: tuple[FrontRow, ...]
    front: tuple[FrontRow, ...]
    n_failed: int
    n_running: int
    failures: tuple[tuple[int, str], ...]


def _row(t: optuna.trial.FrozenTrial, objectives: tuple[str, ...], base: dict[str, Any]) -> FrontRow:
    metrics: dict[str, float | None] = {k: t.user_attrs.get(k) for k in _METRIC_KEYS}
    for name, value in zip(objectives, t.values or ()):
        metrics[name] = value

    def ratio(a: Any, b: Any) -> float | None:
        return float(a) / float(b) if a and b else None

    return FrontRow(
        number=t.number,
        method=str(t.user_attrs.get("method", t.params.get("method", "?"))),
        params=dict(t.params),
        metrics=metrics,
        compression=ratio(base.get("size_bytes"), metrics.get("size_bytes")),
        speedup=ratio(base.get("latency_ms"), metrics.get("latency_ms")),
        accuracy_delta=(metrics["accuracy"] - base["accuracy"]) if metrics.get("accuracy") is not None and "accuracy" in base else None,
        attrs={k: v for k, v in t.user_attrs.items() if k not in _METRIC_KEYS},
    )


def front_rows(study: optuna.Study) -> list[FrontRow]:
    """The non-dominated finished trials, most accurate first."""
    return list(load_view(study).front)


def load_view(study: optuna.Study) -> StudyView:
    """Everything a review needs from one study, read once from its storage."""
    attrs = study.user_attrs
    objectives = tuple(attrs.get("objectives") or [f"objective_{i}" for i in range(len(study.directions))])
    directions = tuple(d.name.lower() for d in study.directions)
    base = dict(attrs.get("base") or {})
    all_trials = study.get_trials(deepcopy=False)
    done = [t for t in all_trials if t.state == optuna.trial.TrialState.COMPLETE]
    rows = tuple(_row(t, objectives, base) for t in done)
    best = {t.number for t in study.best_trials} if done else set()
    key = "accuracy" if "accuracy" in objectives else objectives[0]
    front = tuple(sorted((r for r in rows if r.number in best), key=lambda r: -(r.metrics.get(key) or 0.0)))
    failed = [t for t in all_trials if t.state == optuna.trial.TrialState.FAIL]
    return StudyView(
        name=study.study_name,
        objectives=objectives,
        directions=directions,
        base=base,
        trials=rows,
        front=front,
        n_failed=len(failed),
        n_running=sum(t.state == optuna.trial.TrialState.RUNNING for t in all_trials),
        failures=tuple((t.number, str(t.user_attrs.get("fail_reason", "unknown"))) for t in failed),
    )


def params_summary(params: dict[str, Any], limit: int = 80) -> str:
    """Short ``key=value`` text of a trial's parameters for tables."""
    parts = []
    for k, v in params.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"

