"""Pareto-aware asynchronous successive halving (MO-ASHA, Schmucker et al. 2021, arXiv 2106.12639).

Ray Tune's schedulers rank trials on one metric; a compression search has several objectives, and
its costs are known before training (:mod:`automl._prescreen`). At each rung (``grace_epochs x
reduction_factor^k`` epochs of fine-tuning) a trial goes on only if it is among the top
``ceil(n / reduction_factor)`` of the ``n`` trials that reached that rung so far (itself included),
ranked by non-dominated sorting on (validation accuracy so far, its costs) and, within a front, by
crowding distance (Deb et al. 2002; the extremes of a front first). Asynchronous, as ASHA: a trial
is judged when it reaches the rung, against those that reached it before.

:class:`Rungs` is the decision alone; :class:`MOASHAScheduler` wraps it as a Ray Tune scheduler
reading ``result[time_attr]`` (epochs), ``result[metric]`` (validation accuracy, never
test accuracy) and the cost keys from each reported result.

Wiring (``scheduler: {name: moasha}`` in a study config): each trial reports, after every training
epoch, its validation accuracy and its dry-run costs (:class:`automl._tune._EpochReporter`; the
epoch count is all of the trial's training epochs so far, monotone over a chain that fine-tunes
after several stages); :func:`automl._search.run_search` hands this scheduler to the Tuner, and the
searcher records a trial it stopped as PRUNED (:attr:`MOASHAScheduler.stopped` tells it which).
This module imports Ray; the run loop imports it only for a study that names this scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

__all__ = ["MOASHAScheduler", "Rungs", "crowding_distance", "nondominated_ranks", "promotable"]


def nondominated_ranks(points: np.ndarray) -> np.ndarray:
    """Front index of each row (0 = non-dominated), all objectives minimised (fast non-dominated sort)."""
    pts = np.asarray(points, dtype=float)
    n = len(pts)
    ranks = np.full(n, -1, dtype=int)
    left = np.arange(n)
    rank = 0
    while len(left):
        sub = pts[left]
        dominated = np.array([((sub <= p).all(axis=1) & (sub < p).any(axis=1)).any() for p in sub], dtype=bool)
        ranks[left[~dominated]] = rank
        left = left[dominated]
        rank += 1
    return ranks


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """Crowding distance of each row within its set (Deb et al. 2002): the extremes of every
    objective get infinity, the others the sum over objectives of the normalised gap between
    their two neighbours."""
    pts = np.asarray(points, dtype=float)
    n, k = pts.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, math.inf)
    for j in range(k):
        order = np.argsort(pts[:, j], kind="stable")
        lo, hi = pts[order[0], j], pts[order[-1], j]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for a in range(1, n - 1):
            dist[order[a]] += (pts[order[a + 1], j] - pts[order[a - 1], j]) / (hi - lo)
    return dist


def promotable(points: Mapping[Hashable, Sequence[float]], reduction_factor: float) -> list[Hashable]:
    """The ids among ``points`` (minimised objective vectors) that go on: the best
    ``ceil(n / reduction_factor)`` by (front, larger crowding distance, insertion order)."""
    ids = list(points)
    if not ids:
        return []
    pts = np.array([list(points[i]) for i in ids], dtype=float)
    ranks = nondominated_ranks(pts)
    crowd = np.zeros(len(ids))
    for r in set(ranks.tolist()):
        members = np.flatnonzero(ranks == r)
        crowd[members] = crowding_distance(pts[members])
    order = sorted(range(len(ids)), key=lambda i: (ranks[i], -crowd[i], i))
    keep = math.ceil(len(ids) / reduction_factor)
    return [ids[i] for i in order[:keep]]


@dataclass
class Rungs:
    """The rungs of one MO-ASHA bracket and the points recorded at each.

    ``directions`` is one of ``"maximize"``/``"minimize"`` per objective; the first objective is the
    validation accuracy so far, the others the trial's costs (final before training).
    """

    grace_epochs: int
    reduction_factor: float
    max_epochs: int
    directions: tuple[str, ...]
    recorded: dict[int, dict[Hashable, tuple[float, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.grace_epochs < 1 or self.reduction_factor < 2:
            raise ValueError(f"moasha: grace_epochs must be >= 1 and reduction_factor >= 2, got {self.grace_epochs}, {self.reduction_factor}")

    @property
    def milestones(self) -> list[int]:
        out, m = [], self.grace_epochs
        while m < self.max_epochs:
            out.append(int(m))
            m = math.ceil(m * self.reduction_factor)
        return out

    def decide(self, trial: Hashable, epoch: int, values: Sequence[float]) -> bool:
        """Record ``trial`` at the rung ``epoch`` (if it is one) and say whether it goes on."""
        if epoch not in self.milestones:
            return True
        signs = [-1.0 if d == "maximize" else 1.0 for d in self.directions]
        point = tuple(s * float(v) for s, v in zip(signs, values))
        rung = self.recorded.setdefault(epoch, {})
        rung.setdefault(trial, point)
        return trial in promotable(rung, self.reduction_factor)


def _finite_or_worst(value: Any, direction: str) -> float:
    """A cost that was not measured ranks as the worst possible (it cannot promise anything)."""
    v = math.nan if value is None else float(value)
    if math.isfinite(v):
        return v
    return -math.inf if direction == "maximize" else math.inf


class MOASHAScheduler(FIFOScheduler):
    """MO-ASHA as a Ray Tune scheduler (see the module docstring)."""

    #: What the searcher records as ``pruned_by``.
    name = "moasha"

    def __init__(self, *, metric: str, costs: Sequence[str], cost_directions: Sequence[str], grace_epochs: int, reduction_factor: float, max_epochs: int, time_attr: str = "epoch") -> None:
        super().__init__()
        # Not ``_metric``: Tune would then require it in every result, the final one too.
        self._val_metric = metric
        self._costs = tuple(costs)
        self._time_attr = time_attr
        self.rungs = Rungs(grace_epochs, reduction_factor, max_epochs, ("maximize", *cost_directions))
        #: Ray trial ids this scheduler stopped (the searcher records them PRUNED).
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self._time_attr not in result or self._val_metric not in result:
            return TrialScheduler.CONTINUE
        values = [result[self._val_metric], *(_finite_or_worst(result.get(c), d) for c, d in zip(self._costs, self.rungs.directions[1:]))]
        go_on = self.rungs.decide(trial.trial_id, int(result[self._time_attr]), values)
        if not go_on:
            self.stopped.add(trial.trial_id)
        return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP
