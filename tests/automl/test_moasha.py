"""MO-ASHA's rung decision on constructed trials whose answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from automl._moasha import Rungs, crowding_distance, nondominated_ranks, promotable

# (validation accuracy, size) per trial, in the order they reach the rung. C and E are dominated
# (A is more accurate and smaller than both); A, B, D, F are the front. Within it, F (most accurate,
# largest) and B (least accurate, smallest) are the extremes, so their crowding distance is infinite.
TRIALS = {"A": (0.90, 100), "B": (0.80, 50), "C": (0.70, 200), "D": (0.85, 80), "E": (0.60, 300), "F": (0.95, 400)}


def minimised(points):
    return {k: (-acc, size) for k, (acc, size) in points.items()}


def test_promotable_keeps_the_front_extremes_of_the_top_third():
    # 6 trials, reduction factor 3: ceil(6/3) = 2 go on, the two extremes of the first front.
    assert promotable(minimised(TRIALS), 3) == ["B", "F"], f"got {promotable(minimised(TRIALS), 3)}"
    ranks = nondominated_ranks(np.array(list(minimised(TRIALS).values())))
    assert ranks.tolist() == [0, 0, 1, 0, 2, 0], f"fronts {ranks.tolist()}: C is dominated by A, B, D; E by C too"


def test_asynchronous_rung_decisions_in_arrival_order():
    rungs = Rungs(grace_epochs=1, reduction_factor=3, max_epochs=27, directions=("maximize", "minimize"))
    assert rungs.milestones == [1, 3, 9], f"milestones {rungs.milestones}"
    # A alone goes on; B ties A (both extremes of a two-point front) and loses on arrival order; C,
    # D, E are not among the top ceil(n/3) when they arrive; F is, as the most accurate extreme.
    got = {k: rungs.decide(k, 1, v) for k, v in TRIALS.items()}
    assert got == {"A": True, "B": False, "C": False, "D": False, "E": False, "F": True}, f"decisions {got}"
    assert rungs.decide("C", 2, TRIALS["C"]), "an epoch that is no rung never stops a trial"


def test_crowding_distance_closed_form():
    pts = np.array([[0.0, 4.0], [1.0, 2.0], [2.0, 1.0], [4.0, 0.0]])
    d = crowding_distance(pts)
    # Interior points: sum over both objectives of (next - previous) / range = (2-0)/4 + (4-1)/4.
    assert math.isinf(d[0]) and math.isinf(d[3]), f"extremes must be infinite: {d}"
    assert d[1] == pytest.approx(2 / 4 + 3 / 4) and d[2] == pytest.approx(3 / 4 + 2 / 4), f"interior distances {d}"


def test_ranks_against_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.random((40, 3))
    ranks = nondominated_ranks(pts)

    def dominates(a, b):
        return (a <= b).all() and (a < b).any()

    for i, r in enumerate(ranks):
        same_or_better = [j for j in range(len(pts)) if ranks[j] >= r and dominates(pts[j], pts[i])]
        assert not same_or_better, f"point {i} (front {r}) is dominated by {same_or_better} of a front not before it"
        if r > 0:
            assert any(dominates(pts[j], pts[i]) for j in np.flatnonzero(ranks == r - 1)), f"point {i} (front {r}) has no dominator in front {r - 1}"
