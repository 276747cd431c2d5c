"""The command line (``automl._cli``): the records its tables draw, its choices, its one-line errors.

The records (``front_table``, ``front_cells``, ``compare_rows``) are checked on in-memory Optuna
studies whose numbers are known by construction; the commands on the shared small study.
"""

from __future__ import annotations

import math

import optuna
import pytest
from typer.testing import CliRunner

from automl._cli import FRONT_COLUMNS, _TRIAL_OR_PICK, app, compare_rows, front_cells, front_table
from automl._pareto import PICK_NAMES, PICKS, Constraints, load_view
from tests.automl.test_pareto import BASE, make_study, pt

#: Two trials on the (accuracy, size) front of a 2-objective study, in base units (-1, 0.5) and
#: (-0.5, 0.25) with the reference (0, 2): boxes 1 x 1.5 and 0.5 x 1.75 overlapping in 0.5 x 1.5,
#: so the front's hypervolume is 1.5 + 0.875 - 0.75 = 1.625.
TWO = [("tucker", pt(0.9, 500, 0.5)), ("wsnet", pt(0.45, 250, 2.0))]


def _view(points, **kw):
    return load_view(make_study(points, **kw))


def test_every_pick_name_is_offered_and_named_in_the_messages():
    assert PICK_NAMES == ("knee", *PICKS)
    assert _TRIAL_OR_PICK == "give exactly one of --trial N or --pick {knee,best-accuracy,smallest,fastest,fewest-macs}"
    runner = CliRunner()
    for command in ("export", "finalize"):
        help_text = " ".join(runner.invoke(app, [command, "--help"], terminal_width=400).output.split())
        missing = [n for n in PICK_NAMES if n not in help_text]
        assert not missing, f"`automl {command} --help` must offer every pick, misses {missing}"


@pytest.mark.parametrize("command", ["export", "finalize"])
@pytest.mark.parametrize("selection", [[], ["--trial", "1", "--pick", "knee"]], ids=["neither", "both"])
def test_trial_or_pick_exits_2_with_one_line(command, selection, tmp_path):
    r = CliRunner().invoke(app, [command, str(tmp_path / "nostudy"), *selection])
    assert r.exit_code == 2, r.output
    assert r.output.strip() == f"error: {_TRIAL_OR_PICK}", f"one line naming both options and every pick, got {r.output!r}"


def test_front_table_rows_and_cells_have_the_known_numbers():
    view = _view(TWO, objectives=("accuracy", "size_bytes"))
    table = front_table(view)
    assert table.empty is None and table.title == "Pareto front (2 trials)", table
    assert [g.row.number for g in table.rows] == [0, 1], "the front, most accurate first"
    assert table.summary == "study " + view.name + ": 2 complete, 0 failed, 0 running; base accuracy 0.9000, 1000 bytes, 1.000 ms"
    cells = dict(zip((c for c, _ in FRONT_COLUMNS), front_cells(table.rows[1])))
    assert cells == {
        "trial": "1", "count": "1", "method": "wsnet", "accuracy": "0.4500", "Δacc": "-45.00pt", "size (B)": "250", "x smaller": "4.00",
        "latency (ms)": "2.000", "x faster": "0.50", "MACs": "5,000", "params": "method=wsnet",
    }, cells


def test_front_table_says_why_it_is_empty():
    view = _view(TWO, objectives=("accuracy", "size_bytes"), failed=[("none", "boom")])
    bound = Constraints(max_size_bytes=100)
    table = front_table(view, bound)
    assert table.rows == () and table.empty == "no trial on the front meets size_bytes <= 100", table.empty
    assert table.failures == ((2, "boom"),), table.failures
    kept = front_table(view, Constraints(min_accuracy=0.5), all_trials=True)
    assert kept.title == "finished trials: 1 of 2 trials with accuracy >= 0.5" and [g.row.number for g in kept.rows] == [0], kept.title
    empty = front_table(_view([]))
    assert empty.empty == "no finished trial yet: the front is empty" and empty.rows == ()


def test_compare_rows_have_the_hypervolume_of_the_box_union():
    view = _view(TWO, objectives=("accuracy", "size_bytes"))
    rows = compare_rows(view, view)
    assert rows[0] == rows[1], "a study compared with itself gives equal rows"
    row = rows[0]
    assert math.isclose(row.hypervolume, 1.625, rel_tol=1e-9), row.hypervolume
    assert (row.finished, row.failed, row.front) == (2, 0, 2)
    assert (row.best_accuracy, row.smallest_bytes, row.fastest_ms) == (0.9, 250, 0.5)


def test_compare_rows_measure_both_studies_in_the_first_base():
    a = _view(TWO, objectives=("accuracy", "size_bytes"))
    study = make_study([("tucker", pt(0.9, 500, 0.5))], objectives=("accuracy", "size_bytes"))
    study.set_user_attr("base", {**BASE, "size_bytes": 500})  # another base: its own units would say 1.0
    b = load_view(study)
    row = compare_rows(a, b)[1]
    # In a's units the point is (-1, 0.5): the box 1 x 1.5.
    assert math.isclose(row.hypervolume, 1.5, rel_tol=1e-9), row.hypervolume


def test_show_filters_and_compare(small_study):
    runner = CliRunner()
    view = load_view(optuna.load_study(study_name=small_study.name, storage=small_study.storage_url))
    best = max(r.metrics["accuracy"] for r in view.front)
    r = runner.invoke(app, ["show", str(small_study.study_dir), "--front", "--min-accuracy", str(best)])
    assert r.exit_code == 0 and f"with accuracy >= {best:g}" in r.output, f"show --min-accuracy failed: {r.output}"
    kept = [r_.number for r_ in view.front if r_.metrics["accuracy"] >= best]
    assert f"{len(kept)} of {len(view.front)} trials" in r.output, f"filter kept the wrong number of trials: {r.output}"
    r = runner.invoke(app, ["show", str(small_study.study_dir), "--max-size", "1"])
    assert r.exit_code == 0 and "no trial on the front meets size_bytes <= 1" in r.output, f"empty filter must say so: {r.output}"
    r = runner.invoke(app, ["compare", str(small_study.study_dir), str(small_study.study_dir)])
    assert r.exit_code == 0, f"compare failed: {r.output}"
    hv = [line for line in r.output.splitlines() if line.strip().startswith("│ tiny")]
    assert len(hv) == 2 and hv[0] == hv[1], f"a study compared with itself must show equal rows: {hv}"
