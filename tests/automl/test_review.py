"""Reviewing a study: a plan and its repeats as one row, and the knee and picks within an accuracy
tolerance of the base (``review.max_drop``), on studies whose answers are known by construction."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from pydantic import ValidationError
from optuna.trial import TrialState
from typer.testing import CliRunner

from automl._cli import app, front_json, front_table
from automl._config import ConfigError, parse_config
from automl._pareto import DEFAULT_MAX_DROP, group_by_plan, knee_point, load_view, pick, review_knee, within_drop
from automl._records import write_trial
from automl._report import build_report
from automl._study import open_storage
from tests.automl.test_pareto import BASE, pt

#: Base accuracy 0.90. Trial 0 trained plan P (the base's own plan); trial 1 is its repeat (same
#: numbers, ``duplicate_of`` 0); trial 2 is 0.5 points below the base and smaller and faster;
#: trial 3 is 3 points below and much smaller and faster; trial 4 is 40 points below; trial 5 is
#: exactly 1 point below but dominated by trial 2 (never on the front).
#:
#: Knee of the whole front {0, 2, 3, 4} (objectives scaled to [0, 1] over it): the best-accuracy
#: extreme is trial 0, the size and latency extremes are both trial 4, so they span no plane and
#: the knee is the point closest to the ideal: trial 3 (|z| = 0.15; trial 2: 0.92, trial 0: 1.41,
#: trial 4: 1). Within 1 point the front is {0, 2}, and the knee trades off only size and latency
#: there (accuracy is the constraint): trial 2 is smaller and faster than trial 0.
TRIALS = [
    ("none", pt(0.90, 1000, 1.0), {"plan_key": "P"}),
    ("none", pt(0.90, 1000, 1.0), {"plan_key": "P", "duplicate_of": 0}),
    ("none+prune", pt(0.895, 600, 0.8), {"plan_key": "Q"}),
    ("tucker", pt(0.87, 200, 0.3), {"plan_key": "R"}),
    ("tucker", pt(0.50, 100, 0.25), {"plan_key": "S"}),
    ("tucker", pt(0.89, 900, 0.95), {"plan_key": "T"}),
]
OBJECTIVES = ("accuracy", "size_bytes", "latency_ms")


def write_study(study: optuna.Study, trials=TRIALS) -> optuna.Study:
    study.set_user_attr("base", BASE)
    study.set_user_attr("objectives", list(OBJECTIVES))
    dist = {"method": optuna.distributions.CategoricalDistribution(["none", "tucker", "none+prune"])}
    for i, (method, metrics, attrs) in enumerate(trials):
        write_trial(
            study, None, state=TrialState.COMPLETE, objectives=OBJECTIVES, metrics=metrics, checkpoint=f"checkpoints/trial_{i:05d}",
            attrs={"method": method, **attrs}, params={"method": method}, distributions=dist,
        )
    return study


def view_of(trials=TRIALS):
    return load_view(write_study(optuna.create_study(directions=["maximize", "minimize", "minimize"]), trials))


def test_knee_within_max_drop_is_the_known_trial_and_without_it_three_points_below():
    view = view_of()
    assert sorted(r.number for r in view.front) == [0, 1, 2, 3, 4], f"front differs: {[r.number for r in view.front]}"
    assert knee_point(view.front, view) == 3 and review_knee(view, None) == 3, "without a tolerance the knee is trial 3, 3 points below the base"
    assert review_knee(view, DEFAULT_MAX_DROP) == 2, f"within 1 point the knee must be trial 2, got {review_knee(view, DEFAULT_MAX_DROP)}"
    assert pick(view, "knee").number == 3 and pick(view, "knee", max_drop=0.01).number == 2, "pick knee follows the tolerance"
    assert pick(view, "smallest").number == 4 and pick(view, "smallest", max_drop=0.01).number == 2, "smallest within 1 point is trial 2"
    assert pick(view, "fastest", max_drop=0.05).number == 3, "within 5 points the fastest is trial 3"
    assert pick(view, "best-accuracy", max_drop=0.01).number == 0, "of a plan and its repeat, the trial that trained it is picked"


#: Base 0.90 / 1000 B / 1.0 ms. Within 1 point: A (+0.0 pt) and K (-0.2 pt) cost more than M on both
#: size and latency; S, M, L (-0.8 pt) are the size/latency front. Scaled to [0, 1] over that
#: front S = (0, 1), M = (0.5, 1/3), L = (1, 0): M lies 0.118 inside the line S-L, so the knee
#: within the tolerance is M. X is 10 points below the base. M2 has M's costs at -0.5 pt.
COSTS = [
    ("none", pt(0.900, 600, 0.8), {"plan_key": "A"}),
    ("none+prune", pt(0.892, 200, 0.7), {"plan_key": "S"}),
    ("none+prune", pt(0.892, 400, 0.4), {"plan_key": "L"}),
    ("none+prune", pt(0.898, 450, 0.6), {"plan_key": "K"}),
    ("none+prune", pt(0.892, 300, 0.5), {"plan_key": "M"}),
    ("tucker", pt(0.80, 100, 0.3), {"plan_key": "X"}),
]


def test_within_max_drop_the_knee_trades_off_the_costs_and_accuracy_only_breaks_ties():
    view = view_of(COSTS)
    assert review_knee(view, DEFAULT_MAX_DROP) == 4, "within 1 point the knee is M, the knee of the size/latency front S-M-L"
    assert pick(view, "knee", max_drop=DEFAULT_MAX_DROP).number == 4, "export --pick knee and show take the same knee as the report"
    admitted = [r for r in view.front if r.number != 5]
    assert knee_point(admitted, view) == 3, "over all three objectives scaled to one point of accuracy, K's 0.6 points would win"
    tied = view_of([*COSTS, ("none+prune", pt(0.895, 300, 0.5), {"plan_key": "M2"})])
    assert review_knee(tied, DEFAULT_MAX_DROP) == 6, "of two models with the same costs, the more accurate is the knee"
    from tests.automl.test_pareto import make_study

    one_cost = load_view(make_study([("none" if m == "none+prune" else m, p) for m, p, _ in COSTS], objectives=("accuracy", "latency_ms")))
    assert review_knee(one_cost, DEFAULT_MAX_DROP) == 2, "with latency the only cost, the knee is the fastest model within 1 point (L)"


def test_within_drop_keeps_exactly_max_drop_and_nothing_below():
    view = view_of()
    inside = {r.number for r in view.trials if within_drop(r, 0.01)}
    assert inside == {0, 1, 2, 5}, f"within 1 point of 0.90 are 0.90, 0.895 and exactly 0.89, got {inside}"
    assert all(within_drop(r, None) for r in view.trials), "no tolerance admits every trial"
    assert {r.number for r in view.trials if within_drop(r, 0.0)} == {0, 1}, "a tolerance of 0 admits the base's accuracy only"


def test_pick_with_no_model_within_max_drop_says_so_in_one_line():
    view = view_of([t for t in TRIALS if t[1]["accuracy"] < 0.88])
    with pytest.raises(ValueError) as err:
        pick(view, "knee", max_drop=0.01)
    message = str(err.value)
    assert "\n" not in message and "review.max_drop 0.01" in message and "trial 0 at 0.8700" in message, message
    assert review_knee(view, 0.01) is None, "no model within the tolerance: no knee"


def test_a_plan_and_its_repeats_are_one_row_with_their_count():
    view = view_of()
    groups = group_by_plan(view.front)
    assert [(g.row.number, g.numbers, g.count) for g in groups] == [(0, (0, 1), 2), (2, (2,), 1), (3, (3,), 1), (4, (4,), 1)], groups
    # A repeat listed before the trial that trained the plan still groups under that trial.
    assert [(g.row.number, g.numbers) for g in group_by_plan([view.row(1), view.row(0)])] == [(0, (0, 1))]

    table = front_table(view, max_drop=0.01)
    assert [(g.row.number, g.count) for g in table.rows] == [(0, 2), (2, 1)], f"within 1 point: plan P (2 trials) and trial 2, got {table.rows}"
    assert [g.row.number for g in table.beyond] == [3, 4], f"beyond max_drop: trials 3 and 4, got {table.beyond}"
    assert table.knee == 2 and table.beyond_title.startswith("beyond review.max_drop (more than 1 point below"), table
    rows = front_json(table)
    assert [(r["trial"], r["trials"], r["count"], r["within_max_drop"], r["knee"]) for r in rows] == [
        (0, [0, 1], 2, True, False), (2, [2], 1, True, True), (3, [3], 1, False, False), (4, [4], 1, False, False),
    ], rows

    data = build_report(view, max_drop=0.01)
    front = data.front.set_index("trial")
    assert list(front.index) == [0, 2, 3, 4] and front.loc[0, "count"] == 2 and front.loc[0, "same_plan"] == "1", front
    assert data.knee == 2 and list(front["within_max_drop"]) == [True, True, False, False] and bool(front.loc[2, "knee"]), front
    assert build_report(view).knee == 3, "the report without a tolerance takes the whole front's knee"


@pytest.mark.parametrize(
    "review, field",
    [({"max_drop": 1.5}, "review.max_drop"), ({"max_drop": -0.01}, "review.max_drop"), ({"max_drop": "one"}, "review.max_drop"), ({"tolerance": 0.01}, "review.tolerance")],
)
def test_review_config_is_validated_with_one_line_naming_the_field(review, field):
    data = {"name": "r", "dataset": {"name": "digits"}, "base": {"model": "digits_cnn"}, "review": review}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert "\n" not in str(err.value) and f": {field}:" in str(err.value), str(err.value)
    cfg = parse_config({k: v for k, v in data.items() if k != "review"})
    assert cfg.review.max_drop == DEFAULT_MAX_DROP == 0.01, "the default tolerance is 1 point"
    with pytest.raises(ValidationError):
        cfg.review.max_drop = 0.5  # frozen like every other section


def test_launch_with_a_bad_max_drop_exits_2_and_writes_nothing(tmp_path):
    config = {"name": "r", "dataset": {"name": "digits"}, "base": {"model": "digits_cnn"}, "review": {"max_drop": 2}, "output_dir": str(tmp_path / "runs")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    r = CliRunner().invoke(app, ["launch", str(path)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "review.max_drop" in r.output, r.output
    assert not (tmp_path / "runs").exists(), "a bad config must write nothing"


def test_show_and_export_take_the_study_tolerance_and_the_flag(tmp_path):
    """``show`` on a study folder: the knee within the config's review.max_drop, the rest apart;
    ``--max-drop`` overrides it; a bad ``--max-drop`` exits 2 with one line."""
    folder = tmp_path / "reviewed"
    folder.mkdir()
    config = {"name": "reviewed", "dataset": {"name": "digits"}, "base": {"model": "digits_cnn"}, "output_dir": str(tmp_path), "review": {"max_drop": 0.01}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    study = optuna.create_study(study_name="reviewed", storage=open_storage(f"sqlite:///{folder / 'optuna.db'}"), directions=["maximize", "minimize", "minimize"])
    write_study(study)
    runner = CliRunner()
    r = runner.invoke(app, ["show", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [x["trial"] for x in rows if x["knee"]] == [2] and [x["trial"] for x in rows if not x["within_max_drop"]] == [3, 4], rows
    r = runner.invoke(app, ["show", str(folder)])
    assert r.exit_code == 0 and "beyond review.max_drop" in r.output and "knee: trial 2" in r.output, r.output
    assert "0 (+1)" in r.output, f"plan P is one row naming its repeat: {r.output}"
    r = runner.invoke(app, ["show", str(folder), "--json", "--max-drop", "1"])
    # A tolerance of 100 points admits every model and spends all of it on size and latency: trial 4
    # (40 points below the base) is the smallest and the fastest.
    assert [x["trial"] for x in json.loads(r.output) if x["knee"]] == [4], "--max-drop 1 admits every model: the knee of their costs"
    for command in (["show", str(folder)], ["export", str(folder), "--pick", "knee"]):
        r = runner.invoke(app, [*command, "--max-drop", "2"])
        assert r.exit_code == 2 and r.output.strip() == "error: --max-drop must be a fraction in [0, 1] (0.01 = 1 point), got 2.0", r.output
