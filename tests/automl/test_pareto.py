"""Pareto records on real (in-memory) Optuna studies whose numbers are known by construction."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from automl._pareto import (
    COST_REFERENCE,
    Constraints,
    best_per_method,
    front_hypervolume,
    hypervolume_history,
    knee_point,
    load_view,
    normalise,
    pick,
)
from automl._records import write_trial

BASE = {"accuracy": 0.9, "size_bytes": 1000, "latency_ms": 1.0, "macs": 10_000, "params": 250}


def make_study(points, *, objectives=("accuracy", "size_bytes", "latency_ms"), failed=(), running=0):
    """A study like ``run_search`` leaves it, written by the one writer (automl._records)."""
    directions = ["maximize" if o == "accuracy" else "minimize" for o in objectives]
    study = optuna.create_study(directions=directions)
    study.set_user_attr("base", BASE)
    study.set_user_attr("objectives", list(objectives))
    study.set_user_attr("study_dir", "/nonexistent")
    dist = {"method": optuna.distributions.CategoricalDistribution(["none", "tucker", "wsnet"])}
    for i, (method, metrics) in enumerate(points):
        write_trial(
            study, None, state=TrialState.COMPLETE, objectives=objectives, metrics=metrics, checkpoint=f"checkpoints/trial_{i:05d}",
            attrs={"method": method}, params={"method": method}, distributions=dist,
        )
    for method, reason in failed:
        write_trial(study, None, state=TrialState.FAIL, attrs={"method": method, "fail_reason": reason}, params={"method": method}, distributions=dist)
    for _ in range(running):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params={"method": "tucker"}, distributions=dist))
    return study


def pt(acc, size, lat, macs=5000):
    return {"accuracy": acc, "size_bytes": size, "latency_ms": lat, "macs": macs, "params": 100}


def test_base_alone_has_hypervolume_one():
    view = load_view(make_study([("none", pt(0.9, 1000, 1.0))]))
    hv = front_hypervolume(view.front, view.objectives, view.directions, view.base)
    assert math.isclose(hv, 1.0, rel_tol=1e-12), f"a trial equal to the base must have hypervolume 1 (base units), got {hv}"


def test_hypervolume_matches_hand_computed_box_union():
    # Normalised (minimised): a -> (-1, 0.5, 1), b -> (-0.5, 0.25, 1); reference (0, 2, 2).
    view = load_view(make_study([("tucker", pt(0.9, 500, 1.0)), ("tucker", pt(0.45, 250, 1.0))]))
    pts, ref = normalise([[0.9, 500, 1.0], [0.45, 250, 1.0]], view.objectives, view.directions, view.base)
    assert pts.tolist() == [[-1.0, 0.5, 1.0], [-0.5, 0.25, 1.0]], f"normalised points differ: {pts.tolist()}"
    assert ref.tolist() == [0.0, COST_REFERENCE, COST_REFERENCE], f"reference point differs: {ref.tolist()}"
    # a's box: 1 * 1.5 * 1 = 1.5; b's box 0.5 * 1.75 * 1 = 0.875; overlap 0.5 * 1.5 * 1 = 0.75.
    expected = 1.5 + 0.875 - 0.75
    history = hypervolume_history(view)
    assert [n for n, _ in history] == [0, 1], f"history must list every finished trial in order, got {history}"
    assert math.isclose(history[0][1], 1.5) and math.isclose(history[1][1], expected), f"hypervolume history {history} != [1.5, {expected}]"


def test_points_beyond_reference_add_nothing():
    view = load_view(make_study([("none", pt(0.9, 3000, 1.0))]))  # 3x the base size > 2x reference
    assert hypervolume_history(view)[-1][1] == 0.0, "a trial larger than the reference must add no hypervolume"


def test_knee_is_farthest_from_extreme_line_in_2d():
    # Front on (accuracy max, size min): the middle point bulges toward the ideal corner.
    pts = [("tucker", pt(0.50, 100, 1.0)), ("tucker", pt(0.85, 200, 1.0)), ("tucker", pt(0.90, 1000, 1.0)), ("tucker", pt(0.60, 600, 1.0))]
    view = load_view(make_study(pts, objectives=("accuracy", "size_bytes")))
    assert {r.number for r in view.front} == {0, 1, 2}, f"front differs: {[r.number for r in view.front]}"
    assert knee_point(view.front, view) == 1, f"knee must be trial 1 (largest distance to the line through the extremes), got {knee_point(view.front, view)}"


def test_knee_in_3d_and_fallbacks():
    pts = [("tucker", pt(0.90, 1000, 1.0)), ("tucker", pt(0.50, 100, 1.0)), ("tucker", pt(0.60, 900, 0.1)), ("tucker", pt(0.85, 250, 0.3))]
    view = load_view(make_study(pts))
    assert knee_point(view.front, view) == 3, f"3-D knee must be the balanced trial 3, got {knee_point(view.front, view)}"
    one = load_view(make_study(pts[:1]))
    assert knee_point(one.front, one) == 0, "a front of one point is its own knee"
    empty = load_view(make_study([]))
    assert knee_point(empty.front, empty) is None, "an empty front has no knee"


def test_constraints_and_picks():
    pts = [("none", pt(0.92, 1000, 1.0)), ("tucker", pt(0.88, 400, 0.4)), ("tucker", pt(0.80, 200, 0.2)), ("wsnet", pt(0.70, 100, 0.5))]
    view = load_view(make_study(pts))
    c = Constraints(max_latency_ms=0.45)
    assert [r.number for r in c.filter(view.trials)] == [1, 2], f"latency bound kept {[r.number for r in c.filter(view.trials)]}"
    assert pick(view, "best-accuracy", c).number == 1, "most accurate under 0.45 ms must be trial 1"
    assert pick(view, "smallest").number == 3, "smallest must be trial 3"
    assert pick(view, "fastest", Constraints(min_accuracy=0.85)).number == 1, "fastest with accuracy >= 0.85 must be trial 1"
    assert pick(view, "knee", Constraints(max_size_bytes=500)).number in {1, 2, 3}, "knee must respect the size bound"
    with pytest.raises(ValueError, match="no finished trial .* meets latency_ms <= 0.01"):
        pick(view, "best-accuracy", Constraints(max_latency_ms=0.01))
    with pytest.raises(ValueError, match="--pick must be one of knee, best-accuracy"):
        pick(view, "prettiest")


def test_best_per_method_and_failed_and_running_trials():
    pts = [("tucker", pt(0.80, 200, 0.2)), ("tucker", pt(0.88, 400, 0.4)), ("none", pt(0.92, 1000, 1.0))]
    view = load_view(make_study(pts, failed=[("wsnet", "RuntimeError: shapes do not match")], running=2))
    best = {r.method: r.number for r in best_per_method(view)}
    assert best == {"tucker": 1, "none": 2}, f"best per method differs: {best}"
    assert view.n_failed == 1 and view.n_running == 2, f"counts differ: failed {view.n_failed}, running {view.n_running}"
    (failed,) = view.failed
    assert failed.state == "failed" and failed.method == "wsnet" and "shapes do not match" in failed.fail_reason, f"failed row differs: {failed}"
    assert view.row(3) is failed and view.row(4) is None, "row() must find finished and failed trials only"


def test_front_is_optunas_best_trials_with_the_same_values_whatever_the_drift_check_records():
    """One set of numbers: the view's front is ``study.best_trials`` (what optuna-dashboard shows)
    with exactly the trial values; a recorded latency drift never replaces a value."""
    import optuna as _optuna

    from automl._pareto import load_view

    study = _optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["accuracy", "latency_ms"])
    study.set_user_attr("base", {"accuracy": 0.9, "latency_ms": 2.0, "size_bytes": 100})
    for values in ([0.9, 4.0], [0.8, 1.0], [0.7, 3.0], [0.95, 8.0]):
        write_trial(study, None, state=TrialState.COMPLETE, objectives=("accuracy", "latency_ms"), metrics=dict(zip(("accuracy", "latency_ms"), values)))
    study.set_user_attr("latency_drift", {"0": -0.75, "1": 2.0})
    view = load_view(study)
    best = {t.number: t.values for t in study.best_trials}
    assert {r.number for r in view.front} == set(best) == {0, 1, 3}, f"front {[r.number for r in view.front]} != best_trials {sorted(best)}"
    for r in view.front:
        assert [r.metrics["accuracy"], r.metrics["latency_ms"]] == best[r.number], f"trial {r.number}: {r.metrics} != values {best[r.number]}"
    assert view.row(0).speedup == 0.5, f"speed-up = base latency / trial value, got {view.row(0).speedup}"
