"""The Pareto front of a study as plain records (data apart from drawing, Optuna style)."""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any, Mapping, Sequence

import numpy as np
import optuna

from automl._constraints import Constraints
from automl._metrics import METRIC_KEYS
from automl._records import CHECKPOINT, DUPLICATE_OF, FAIL_REASON, FINALIZED_FROM, METHOD, PLAN_KEY

__all__ = [
    "COST_REFERENCE",
    "Constraints",
    "DEFAULT_MAX_DROP",
    "FrontRow",
    "PICK_NAMES",
    "PlanGroup",
    "StudyView",
    "best_per_method",
    "group_by_plan",
    "hypervolume",
    "hypervolume_history",
    "knee_point",
    "load_view",
    "nondominated_mask",
    "normalise",
    "params_summary",
    "pick",
    "review_knee",
    "knee_objectives",
    "tolerance_knee",
    "study_constraints",
    "within_drop",
]

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
    state: str = "complete"  # "complete" | "failed"
    fail_reason: str | None = None

    @property
    def finalized_from(self) -> int | None:
        """The trial this one finalized (``automl finalize``), or None for a search trial."""
        value = self.attrs.get(FINALIZED_FROM)
        return None if value is None else int(value)

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint folder, relative to the study folder (None if the trial never saved one)."""
        value = self.attrs.get(CHECKPOINT)
        return str(value) if value else None

    @property
    def plan(self) -> str:
        """The plan this trial really is: its ``plan_key`` record (a repeat's is its first's, and a
        structure stage that converted nothing is recorded as ``none``); a trial without one (a
        variant, a finalized model, a study written by hand) is a plan of its own."""
        key = self.attrs.get(PLAN_KEY)
        return str(key) if key else f"trial {self.number}"


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
    failed: tuple[FrontRow, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def study_dir(self) -> str | None:
        return self.attrs.get("study_dir")

    def row(self, number: int) -> FrontRow | None:
        """The finished or failed trial ``number`` (None if it is running or does not exist)."""
        return next((r for r in (*self.trials, *self.failed) if r.number == number), None)


def _row(t: optuna.trial.FrozenTrial, base: dict[str, Any]) -> FrontRow:
    """One trial's record: every measured number is its user attribute of that name
    (:mod:`automl._records`), whatever the study's objectives; None where none was measured."""
    metrics: dict[str, float | None] = {k: t.user_attrs.get(k) for k in METRIC_KEYS}
    attrs = {k: v for k, v in t.user_attrs.items() if k not in METRIC_KEYS}
    method = str(t.user_attrs.get(METHOD, t.params.get("method", "?")))
    if t.state == optuna.trial.TrialState.FAIL:
        return FrontRow(number=t.number, method=method, params=dict(t.params), metrics=metrics, attrs=attrs, state="failed", fail_reason=str(t.user_attrs.get(FAIL_REASON, "unknown")))

    def ratio(a: Any, b: Any) -> float | None:
        return float(a) / float(b) if a and b else None

    return FrontRow(
        number=t.number,
        method=method,
        params=dict(t.params),
        metrics=metrics,
        compression=ratio(base.get("size_bytes"), metrics.get("size_bytes")),
        speedup=ratio(base.get("latency_ms"), metrics.get("latency_ms")),
        accuracy_delta=(metrics["accuracy"] - base["accuracy"]) if metrics.get("accuracy") is not None and "accuracy" in base else None,
        attrs=attrs,
    )


def load_view(study: optuna.Study) -> StudyView:
    """Everything a review needs from one study, read once from its storage."""
    attrs = study.user_attrs
    objectives = tuple(attrs.get("objectives") or [f"objective_{i}" for i in range(len(study.directions))])
    directions = tuple(d.name.lower() for d in study.directions)
    base = dict(attrs.get("base") or {})
    all_trials = study.get_trials(deepcopy=False)
    done = [t for t in all_trials if t.state == optuna.trial.TrialState.COMPLETE]
    rows = tuple(_row(t, base) for t in done)
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
        failures=tuple((t.number, str(t.user_attrs.get(FAIL_REASON, "unknown"))) for t in failed),
        failed=tuple(_row(t, base) for t in failed),
        attrs={k: v for k, v in attrs.items() if k != "base"},
    )


def params_summary(params: dict[str, Any], limit: int = 80) -> str:
    """Short ``key=value`` text of a trial's parameters for tables."""
    parts = []
    for k, v in params.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"



# --- plans and the accuracy tolerance -------------------------------------------------------

#: The default ``review.max_drop``: models more than 1 percentage point below the base's accuracy
#: are left out of the knee and the picks (Intel Neural Compressor's default tolerance is 1 %).
DEFAULT_MAX_DROP = 0.01


@dataclass(frozen=True)
class PlanGroup:
    """One plan as ``show`` and the report list it: the trial that trained it and its repeats."""

    #: The trial that trained the plan (else the first listed): its numbers are the plan's.
    row: FrontRow
    #: Every listed trial of the plan, ``row`` first, the others by number.
    numbers: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.numbers)


def group_by_plan(rows: Sequence[FrontRow]) -> list[PlanGroup]:
    """``rows`` with each plan once (:attr:`FrontRow.plan`), in the order of each plan's first row.

    A repeat (``duplicate_of``) carries the numbers of the trial it repeats, so a plan listed with
    its repeats is one model listed several times; the trial that trained it stands for the group.
    """
    groups: dict[str, list[FrontRow]] = {}
    for r in rows:
        groups.setdefault(r.plan, []).append(r)
    out = []
    for members in groups.values():
        trained = [r for r in members if DUPLICATE_OF not in r.attrs]
        head = min(trained or members, key=lambda r: r.number)
        out.append(PlanGroup(row=head, numbers=(head.number, *sorted(r.number for r in members if r is not head))))
    return out


def within_drop(row: FrontRow, max_drop: float | None) -> bool:
    """Whether ``row``'s accuracy is at most ``max_drop`` (a fraction) below the base's.

    True for every row when ``max_drop`` is None (no tolerance) or the base's accuracy is unknown;
    False for a row without a measured accuracy. A rounding margin of 1e-9 keeps a model exactly
    ``max_drop`` below the base inside.
    """
    if max_drop is None or row.accuracy_delta is None and row.metrics.get("accuracy") is not None:
        return True
    return row.accuracy_delta is not None and row.accuracy_delta >= -max_drop - 1e-9


def _admitted(view: StudyView, max_drop: float | None) -> list[FrontRow]:
    return [r for r in view.trials if within_drop(r, max_drop)] if view.base.get("accuracy") is not None else list(view.trials)


def review_knee(view: StudyView, max_drop: float | None = None) -> int | None:
    """The knee of the front among the models within ``max_drop`` of the base's accuracy (None:
    no such model); the trial that trained its plan stands for a plan's repeats (:func:`tolerance_knee`)."""
    admitted = {r.number for r in _admitted(view, max_drop)}
    knee = tolerance_knee([g.row for g in group_by_plan([r for r in view.front if r.number in admitted])], view, max_drop)
    return None if knee is None else knee.number


def knee_objectives(view: StudyView, max_drop: float | None) -> list[str]:
    """The objectives the knee trades off (:func:`tolerance_knee`): within a tolerance (``max_drop``
    given and the base's accuracy known) every objective but accuracy, which is then the
    constraint; otherwise all of them."""
    if max_drop is None or view.base.get("accuracy") is None:
        return list(view.objectives)
    return [o for o in view.objectives if o != "accuracy"]


def tolerance_knee(rows: Sequence[FrontRow], view: StudyView, max_drop: float | None) -> FrontRow | None:
    """The knee among ``rows``, the models admitted within ``max_drop`` (one per plan; None: no row).

    Within the tolerance accuracy is the constraint, not a cost: the knee trades off the other
    objectives (size, latency, ...) among the rows that no other row beats on all of them, and
    accuracy only breaks ties (then the lower trial number). Scaled to [0, 1] over a front one
    point wide, one test sample (0.28 points of the digits test split) would weigh as much as a
    quarter of the size or speed range, though it is well inside the test split's own noise. Intel
    Neural Compressor and NNCF's accuracy-aware modes treat the tolerance the same way. With no
    tolerance (``max_drop`` None, or no base accuracy) the knee of the rows' front is taken over
    every objective, accuracy included (:func:`knee_point`).
    """
    costs = knee_objectives(view, max_drop)
    # Most accurate first: of rows tied on the traded objectives, the knee is the first.
    ordered = sorted(rows, key=lambda r: (-float(r.metrics.get("accuracy") or 0.0), r.number))
    if not costs:
        return ordered[0] if ordered else None
    front = _non_dominated([r for r in ordered if all(r.metrics.get(o) is not None for o in costs)], view, costs)
    number = knee_point(front, view, objectives=costs)
    return next((r for r in front if r.number == number), None)


# --- constraints and picks ------------------------------------------------------------------


#: ``pick`` strategies: name -> (metric, maximise?). ``knee`` is handled apart.
PICKS: dict[str, tuple[str, bool]] = {
    "best-accuracy": ("accuracy", True),
    "smallest": ("size_bytes", False),
    "fastest": ("latency_ms", False),
    "fewest-macs": ("macs", False),
}
#: Every ``pick`` strategy a user may name (``--pick``), the knee first.
PICK_NAMES: tuple[str, ...] = ("knee", *PICKS)


def pick(view: StudyView, how: str, constraints: Constraints = Constraints(), *, max_drop: float | None = None) -> FrontRow:
    """Choose one finished trial: ``knee`` of the (constrained) front or the best by one metric,
    among the trials within ``max_drop`` of the base's accuracy (``review.max_drop``; None: all).

    Ties on the metric are broken by accuracy, then by the lower trial number, so a pick is stable;
    of a plan's repeats, the trial that trained it is picked.

    Raises:
        ValueError: unknown ``how``, or no finished trial meets ``constraints`` and ``max_drop`` (one line).
    """
    if how not in PICK_NAMES:
        raise ValueError(f"--pick must be one of {', '.join(PICK_NAMES)}, got {how!r}")
    # The study's own bounds (config ``constraints:``, kept as the study attribute) hold as well.
    constraints = study_constraints(view).merged(constraints)
    rows = constraints.filter(view.trials)
    if not rows:
        raise ValueError(f"no finished trial of study {view.name!r} meets {constraints.describe()} ({len(view.trials)} finished)")
    admitted = {r.number for r in _admitted(view, max_drop)}
    close = [r for r in rows if r.number in admitted]
    if not close:
        best = max(rows, key=lambda r: (r.metrics.get("accuracy") or 0.0, -r.number))
        meeting = "" if constraints.empty else f" meeting {constraints.describe()}"
        raise ValueError(
            f"no finished trial of study {view.name!r}{meeting} is within review.max_drop {max_drop:g} ({100 * max_drop:g} points) of the base "
            f"accuracy {view.base['accuracy']:.4f}; the most accurate is trial {best.number} at {best.metrics.get('accuracy') or 0.0:.4f} "
            "(raise review.max_drop or pass --max-drop)"
        )
    rows = [g.row for g in group_by_plan(close)]
    if how == "knee":
        # The knee of the front of the admitted trials: constraining first, then taking the front,
        # keeps the pick on the trade-off curve the user can actually use.
        knee = tolerance_knee(rows, view, max_drop)
        if knee is None:
            raise ValueError(f"--pick knee: no finished trial meeting {constraints.describe()} has every objective of the study ({', '.join(view.objectives)}) measured")
        return knee
    metric, maximise = PICKS[how]
    measured = [r for r in rows if r.metrics.get(metric) is not None]
    if not measured:
        raise ValueError(f"--pick {how}: no finished trial meeting {constraints.describe()} has a measured {metric}")
    sign = -1.0 if maximise else 1.0
    return min(measured, key=lambda r: (sign * float(r.metrics[metric]), -(r.metrics.get("accuracy") or 0.0), r.number))


def study_constraints(view: StudyView) -> Constraints:
    """The bounds of the study's config (study attribute ``constraints``; none if it has none)."""
    return Constraints(**(view.attrs.get("constraints") or {}))


def best_per_method(view: StudyView) -> list[FrontRow]:
    """For each method chain (label), its most accurate finished trial (ties: smaller, then earlier)."""
    best: dict[str, FrontRow] = {}
    for r in view.trials:
        key = (-(r.metrics.get("accuracy") or 0.0), r.metrics.get("size_bytes") or 0.0, r.number)
        cur = best.get(r.method)
        if cur is None or key < (-(cur.metrics.get("accuracy") or 0.0), cur.metrics.get("size_bytes") or 0.0, cur.number):
            best[r.method] = r
    return sorted(best.values(), key=lambda r: -(r.metrics.get("accuracy") or 0.0))


# --- normalised objective space, hypervolume, knee ------------------------------------------

#: Reference point of a cost objective (minimised: size, latency, MACs, params) in base units:
#: a model twice as large/slow as the base still adds volume, anything worse adds none.
COST_REFERENCE = 2.0


def normalise(values: Sequence[Sequence[float]], objectives: Sequence[str], directions: Sequence[str], base: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Objective values in base-relative units, all to be minimised, and the reference point.

    Each objective is divided by the base model's value, so every axis reads "times the base" and a
    hypervolume means the same for any model, dataset or unit:

    - a minimised (cost) objective ``v`` becomes ``v / base``; its reference is
      :data:`COST_REFERENCE` (2x the base's cost);
    - a maximised objective (accuracy) ``v`` becomes ``-v / base``; its reference is 0 (accuracy 0).

    The base model itself therefore sits at ``(-1, 1, 1, ...)`` and its own hypervolume is exactly 1:
    a front's hypervolume is "how many times the volume the base alone dominates". Where the base
    lacks a value (or it is 0), the largest absolute value among ``values`` is the unit instead.

    Returns:
        ``(points, reference)``: an ``(n, k)`` array and a ``(k,)`` array.
    """
    pts = np.asarray(values, dtype=float).reshape(-1, len(objectives))
    unit = np.ones(len(objectives))
    for j, name in enumerate(objectives):
        b = base.get(name)
        if b is not None and float(b) != 0.0 and math.isfinite(float(b)):
            unit[j] = abs(float(b))
        elif len(pts) and np.isfinite(pts[:, j]).any():
            unit[j] = float(np.nanmax(np.abs(pts[:, j]))) or 1.0
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    ref = np.array([0.0 if d == "maximize" else COST_REFERENCE for d in directions])
    return signs * pts / unit, ref


def _objective_values(rows: Sequence[FrontRow], objectives: Sequence[str]) -> np.ndarray:
    return np.array([[float(r.metrics[o]) if r.metrics.get(o) is not None else np.nan for o in objectives] for r in rows], dtype=float).reshape(len(rows), len(objectives))


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume (minimisation) dominated by ``points`` and bounded by ``reference``.

    Uses Optuna's exact WFG implementation (``optuna._hypervolume.compute_hypervolume``, the function
    ``optuna.visualization.plot_hypervolume_history`` uses; Optuna has no public alias). We do not
    call ``plot_hypervolume_history`` itself because it works in raw units against one reference
    point, where size in bytes would swamp accuracy; :func:`normalise` puts every objective in base
    units first. Points not strictly better than the reference in every objective (or with a missing
    value) dominate nothing inside the box and are dropped first.
    """
    from optuna._hypervolume import compute_hypervolume

    pts = np.asarray(points, dtype=float).reshape(-1, len(reference))
    keep = np.isfinite(pts).all(axis=1) & (pts < reference).all(axis=1)
    if not keep.any():
        return 0.0
    return float(compute_hypervolume(pts[keep], np.asarray(reference, dtype=float)))


def hypervolume_history(view: StudyView) -> list[tuple[int, float]]:
    """``(trial number, hypervolume of all finished trials up to it)`` in trial order (normalised space)."""
    rows = sorted(view.trials, key=lambda r: r.number)
    pts, ref = normalise(_objective_values(rows, view.objectives), view.objectives, view.directions, view.base)
    out: list[tuple[int, float]] = []
    front = np.empty((0, len(ref)))
    value = 0.0
    for r, p in zip(rows, pts):
        # Keep only the running non-dominated set inside the box: a dominated or out-of-box trial
        # leaves the volume unchanged, and WFG then works on tens of points, not on every trial.
        if np.isfinite(p).all() and (p < ref).all() and not ((front <= p).all(axis=1)).any():
            front = np.vstack([front[~((p <= front).all(axis=1))], p])
            value = hypervolume(front, ref)
        out.append((r.number, value))
    return out


def front_hypervolume(rows: Sequence[FrontRow], objectives: Sequence[str], directions: Sequence[str], base: Mapping[str, Any]) -> float:
    pts, ref = normalise(_objective_values(rows, objectives), objectives, directions, base)
    return hypervolume(pts, ref)


def nondominated_mask(points: np.ndarray) -> np.ndarray:
    """Which rows of ``points`` (minimisation, finite) no other row dominates; one vectorised pass per row."""
    pts = np.asarray(points, dtype=float)
    keep = np.isfinite(pts).all(axis=1)
    for i in np.flatnonzero(keep):
        others = pts[keep]
        if ((others <= pts[i]).all(axis=1) & (others < pts[i]).any(axis=1)).any():
            keep[i] = False
    return keep


def _non_dominated(rows: Sequence[FrontRow], view: StudyView, objectives: Sequence[str] | None = None) -> list[FrontRow]:
    """The rows no other row beats on ``objectives`` (default: all of the view's)."""
    names = list(view.objectives if objectives is None else objectives)
    directions = [view.directions[view.objectives.index(o)] for o in names]
    pts, _ = normalise(_objective_values(rows, names), names, directions, view.base)
    return [r for r, k in zip(rows, nondominated_mask(pts)) if k]


def knee_point(front: Sequence[FrontRow], view: StudyView, objectives: Sequence[str] | None = None) -> int | None:
    """Trial number of the knee of ``front`` (None if it is empty) over ``objectives`` (default:
    all of the view's); of points tied on them, the first in ``front``.

    Definition (Das, 1999, "On characterizing the knee of the Pareto curve"; the "maximum distance to
    the extreme-point hyperplane" of Branke et al., 2004): map the front's objectives to minimisation
    and scale each to [0, 1] over the front; take the k extreme points (the best point of each
    objective) and the hyperplane through them (the line through both extremes for k = 2); the knee
    is the point farthest from that hyperplane on the side of the ideal point, i.e. the point where
    giving up a little of one objective buys the most of the others. If the extremes do not span a
    hyperplane (fewer distinct extremes than objectives, e.g. a front of one or two points in 3-D),
    the knee falls back to the point closest to the ideal point (the origin after scaling).
    """
    names = list(view.objectives if objectives is None else objectives)
    directions = [view.directions[view.objectives.index(o)] for o in names]
    rows = [r for r in front if all(r.metrics.get(o) is not None for o in names)]
    if not rows:
        return None
    if len(rows) == 1:
        return rows[0].number
    pts, _ = normalise(_objective_values(rows, names), names, directions, view.base)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    z = (pts - lo) / span
    k = z.shape[1]
    extremes = z[[int(np.argmin(z[:, j])) for j in range(k)]]
    diffs = extremes[1:] - extremes[0]
    best: int | None = None
    if k >= 2 and np.linalg.matrix_rank(diffs, tol=1e-9) == k - 1:
        normal = np.linalg.svd(diffs)[2][-1]
        # Orient the normal toward the ideal point (the origin), then measure signed distance.
        if float(normal @ (np.zeros(k) - extremes[0])) < 0:
            normal = -normal
        dist = (z - extremes[0]) @ normal
        if dist.max() > 1e-12:
            best = int(np.argmax(dist))
    if best is None:
        best = int(np.argmin(np.linalg.norm(z, axis=1)))
    return rows[best].number
