"""MO-ASHA wired into a study: config validation, PRUNED trials kept off every front, and a real
Ray Tune x Optuna (SQLite) study on digits in which the scheduler provably stops a trial."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from automl import parse_config
from automl._cli import app
from automl._config import ConfigError
from automl._metrics import MEASURED_KEYS
from automl._pareto import PICKS, load_view, pick
from automl._records import write_trial


def _base_config(tmp_path, **changes):
    data = {
        "name": "moasha-e2e",
        "dataset": {"name": "digits"},
        "base": {"model": "digits_cnn", "epochs": 10, "options": {"width": 0.5}},
        "methods": {"none": {}, "tucker": {}},
        "objectives": ["accuracy", "size_bytes"],
        "budget": {"trials": 2, "epochs": 2},
        "sampler": {"name": "random", "seed": 0},
        "scheduler": {"name": "moasha", "grace_epochs": 1, "reduction_factor": 4},
        "resources": {"cpus": 1, "max_concurrent": 1},
        "latency": {"warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1, "drift_check": False},
        "output_dir": str(tmp_path / "runs"),
    }
    data.update(changes)
    return data


# --- config ---------------------------------------------------------------------------------


def test_scheduler_defaults_to_fifo(tmp_path):
    data = _base_config(tmp_path)
    del data["scheduler"]
    cfg = parse_config(data)
    assert cfg.scheduler.name == "fifo", f"default scheduler {cfg.scheduler}"
    with pytest.raises(Exception):
        cfg.scheduler.grace_epochs = 3  # frozen


@pytest.mark.parametrize(
    "scheduler, changes, needle",
    [
        ({"name": "hyperband"}, {}, "scheduler.name"),
        ({"name": "moasha", "reduction_factor": 1.5}, {}, "scheduler.reduction_factor"),
        ({"name": "moasha", "grace_epochs": 0}, {}, "scheduler.grace_epochs"),
        ({"name": "moasha", "eta": 3}, {}, "scheduler.eta: unknown key"),
        # 2 epochs x 1 fine-tuning stage (none, tucker are structure methods): no rung below 2.
        ({"name": "moasha", "grace_epochs": 2}, {}, "scheduler.grace_epochs must be below the most epochs a trial fine-tunes (budget.epochs x fine-tuning stages of the enabled methods = 2)"),
        ({"name": "moasha"}, {"objectives": ["size_bytes", "latency_ms"]}, "accuracy must be an objective"),
    ],
)
def test_bad_scheduler_section_is_one_line_naming_the_field(tmp_path, scheduler, changes, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(_base_config(tmp_path, scheduler=scheduler, **changes))
    text = str(err.value)
    assert needle in text and "\n" not in text, f"error {text!r} should name {needle!r} on one line"


def test_bad_scheduler_exits_2_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_base_config(tmp_path, scheduler={"name": "moasha", "reduction_factor": 1})))
    out = CliRunner().invoke(app, ["launch", str(path)])
    assert out.exit_code == 2 and "scheduler.reduction_factor" in out.output, out.output
    assert not (tmp_path / "runs").exists(), "a bad config wrote a study folder"


def test_max_training_epochs_counts_fine_tuning_stages(tmp_path):
    cfg = parse_config(_base_config(tmp_path, methods={"none": {}, "prune": {}, "int8": {}}, budget={"trials": 2, "epochs": 3}))
    # structure (none) and prune fine-tune, int8 does not: 3 epochs x 2 stages.
    assert cfg.max_training_epochs == 6, cfg.max_training_epochs


# --- PRUNED trials never reach a front ------------------------------------------------------


def test_pruned_trial_is_off_front_show_and_picks():
    """A PRUNED trial whose attributes would dominate every COMPLETE trial is on no front."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["accuracy", "size_bytes"])
    study.set_user_attr("base", {"accuracy": 0.9, "size_bytes": 1000.0, "latency_ms": 1.0})
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, (acc, size) in enumerate([(0.90, 800.0), (0.80, 400.0)]):
        write_trial(
            study, None, state=optuna.trial.TrialState.COMPLETE, objectives=("accuracy", "size_bytes"), metrics={"accuracy": acc, "size_bytes": size, "latency_ms": 1.0},
            attrs={"method": "tucker"}, params={"x": i / 10}, distributions=dist,
        )
    # Written past the record's rules on purpose: no reader may take a PRUNED trial's numbers.
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.9}, distributions=dist, state=optuna.trial.TrialState.PRUNED,
            user_attrs={"method": "none", "val_accuracy": 1.0, "accuracy": 1.0, "size_bytes": 1.0, "latency_ms": 0.01, "pruned_by": "moasha"},
        )
    )
    pruned = 2
    assert pruned not in {t.number for t in study.best_trials}, "Optuna's best_trials hold a PRUNED trial"
    view = load_view(study)
    assert {r.number for r in view.front} == {0, 1}, f"front {[r.number for r in view.front]}"
    assert pruned not in {r.number for r in view.trials}, "a PRUNED trial is among the finished rows (show --all)"
    for how in ("knee", *PICKS):
        if how in ("fewest-macs",):
            continue
        assert pick(view, how).number != pruned, f"--pick {how} chose the PRUNED trial"


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_moasha_stops_a_dominated_trial_in_a_real_study(tmp_path, ray_session):
    """Two trials, one at a time. Trial 0 (tucker, smaller) reaches the rung at epoch 1 alone and
    goes on. Trial 1 is the base (``none``): larger, so it cannot dominate trial 0, and of the 2
    trials at the rung only ceil(2/4) = 1 goes on, ranked by (front, crowding, arrival): on the
    same front both are extremes (infinite crowding) and trial 0 came first; on a later front it
    loses anyway. So trial 1 is stopped after 1 of its 2 epochs, whatever the accuracies. Trial 2
    asks for trial 1's plan again: recorded PRUNED against it at once, never trained."""
    from automl import run_search

    data = _base_config(
        tmp_path,
        enqueue=[
            {"method": "tucker", "tucker.rank_out": 0.3, "tucker.rank_in": 0.3, "distill": False},
            {"method": "none", "distill": False},
            {"method": "none", "distill": False},
        ],
    )
    data["budget"] = {**data["budget"], "trials": 3}
    cfg = parse_config(data)
    lines: list[str] = []
    study = run_search(cfg, log=lines.append)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, *[optuna.trial.TrialState.PRUNED] * 2], [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    first, stopped, repeat = trials
    assert repeat.user_attrs.get("duplicate_of") == stopped.number, repeat.user_attrs
    for k in ("pruned_by", "epoch", "val_accuracy"):
        assert repeat.user_attrs.get(k) == stopped.user_attrs[k], f"{k}: repeat {repeat.user_attrs.get(k)} != stopped {stopped.user_attrs[k]}"
    assert sum("stopped after" in line for line in lines) == 1, f"only trial 1 trains and is stopped: {lines}"
    assert any("which moasha stopped: recorded PRUNED, not trained again" in line for line in lines), lines
    assert first.params["method"] == "tucker" and stopped.params["method"] == "none", [t.params for t in trials]
    attrs = stopped.user_attrs
    assert attrs.get("pruned_by") == "moasha" and attrs.get("epoch") == 1, attrs
    assert 0.0 < attrs["val_accuracy"] <= 1.0, attrs
    # No model of it was measured: every metric attribute is None, its costs are its dry run's.
    assert all(attrs[k] is None for k in MEASURED_KEYS), f"a stopped trial has no measured numbers: {attrs}"
    assert all(attrs["dry_run"][cost] > 0 for cost in ("size_bytes", "params", "macs")), attrs["dry_run"]
    assert attrs["dry_run"]["size_bytes"] > first.user_attrs["size_bytes"], "the base must be larger than the tucker trial (the construction)"
    assert not (cfg.study_dir / "checkpoints" / f"trial_{stopped.number:05d}").exists(), "a stopped trial left a checkpoint"
    assert any("stopped after 1 training epochs" in line for line in lines), lines

    assert [t.number for t in study.best_trials] == [first.number], [t.number for t in study.best_trials]
    view = load_view(study)
    assert [r.number for r in view.front] == [first.number] and stopped.number not in {r.number for r in view.trials}
    for how in ("knee", "best-accuracy", "smallest", "fastest"):
        assert pick(view, how).number == first.number, how
    runner = CliRunner()
    for flag in ("--front", "--all"):
        shown = runner.invoke(app, ["show", str(cfg.study_dir), flag, "--json"])
        assert shown.exit_code == 0, shown.output
        numbers = {row["trial"] for row in json.loads(shown.output)}
        assert numbers == {first.number}, f"show {flag}: {numbers}"  # neither PRUNED trial
    report = runner.invoke(app, ["report", str(cfg.study_dir), "--format", "md"])
    assert report.exit_code == 0, report.output


def test_epoch_count_is_monotone_over_a_two_stage_chain(digits, tmp_path):
    """tucker -> prune fine-tunes 2 epochs after each stage: the scheduler sees epochs 1..4 (each
    stage's fit starts again at its own epoch 1), each with that epoch's validation accuracy and
    the dry-run costs, and never the test accuracy."""
    import torch

    from automl import build_model
    from automl._latency import LatencySettings
    from automl._train import TrainOptions, fit
    from automl._trial import TrialSettings, run_trial
    from automl._tune import EPOCH, PARTIAL, VAL_ACCURACY, _EpochReporter
    from searchspace import Plan

    torch.manual_seed(0)
    base = fit(build_model("digits_cnn", input_shape=digits.input_shape, num_classes=10, options={"width": 0.5}), digits, TrainOptions(epochs=3, lr=3e-3)).eval()
    plan = Plan(chain=(("tucker", {"rank_out": 0.5, "rank_in": 0.5}), ("prune", {"criterion": "l1", "ratio": 0.3, "per_stage": False})))
    costs = {"size_bytes": 1234, "params": 99, "latency_ms": 0.5, "macs": None}
    reporter = _EpochReporter(None, plan.label, costs)
    seen, results = [], []

    def progress(stats):
        seen.append(stats)
        results.append(reporter.next_result(stats))

    settings = TrialSettings(epochs=2, lr=1e-3, batch_size=100, latency=LatencySettings(warmup=1, repeats=3))
    run_trial(plan, base, digits, settings, folder=tmp_path / "artifact", progress=progress)
    assert [s.epoch for s in seen] == [1, 2, 1, 2], f"per-fit epochs {[s.epoch for s in seen]}"
    assert [r[EPOCH] for r in results] == [1, 2, 3, 4], f"scheduler epochs {[r[EPOCH] for r in results]}"
    for stats, r in zip(seen, results):
        assert r[VAL_ACCURACY] == stats.val_accuracy and r[PARTIAL] is True, r
        assert r["size_bytes"] == 1234 and r["params"] == 99 and r["macs"] != r["macs"], f"costs not carried (macs unknown = NaN): {r}"
        assert r["accuracy"] != r["accuracy"], "an intermediate result must not carry a test accuracy"
