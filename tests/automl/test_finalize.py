"""Finalize: the long fine-tune of a chosen trial, stored as a linked trial with its own checkpoint,
the kept epoch chosen on validation accuracy; export of the parent ships it."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from typer.testing import CliRunner

from automl import build_model, load_model
from automl._cli import app
from automl._data import dataset_from_config
from automl._recovery import finished_count
from automl._train import TrainOptions, evaluate, fit
from tests.automl.conftest import copy_study


def test_early_stopping_keeps_the_best_validation_epoch_and_stops_after_patience(digits):
    """At learning rate 0 nothing improves after the first epoch: it runs 1 + patience epochs and keeps epoch 1."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", input_shape=digits.input_shape, num_classes=10)
    history: dict = {}
    fit(model, digits, TrainOptions(epochs=20, lr=0.0, batch_size=200, schedule="constant", patience=2), history=history)
    assert len(history["val_accuracy"]) == 3 and history["kept_epoch"] == 1, f"expected 3 epochs, kept 1: {history}"
    # With learning, the kept epoch is the first best of the validation curve, and its weights are returned.
    torch.manual_seed(0)
    model = build_model("digits_cnn", input_shape=digits.input_shape, num_classes=10)
    history = {}
    fit(model, digits, TrainOptions(epochs=4, lr=3e-3, batch_size=100, patience=10), history=history)
    curve = history["val_accuracy"]
    assert history["kept_epoch"] == curve.index(max(curve)) + 1, f"kept epoch {history['kept_epoch']} is not the best of {curve}"
    assert evaluate(model, digits, "val") == pytest.approx(max(curve), abs=1e-12), "the returned weights must be the kept epoch's"


def test_keep_start_makes_the_weights_before_training_epoch_0(digits):
    """A trained model fine-tuned at a destructive learning rate gets worse every epoch: with
    ``keep_start`` the weights it started from are kept (epoch 0), exactly, after ``patience`` epochs."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", input_shape=digits.input_shape, num_classes=10)
    fit(model, digits, TrainOptions(epochs=3, lr=3e-3, batch_size=100))
    start_val = evaluate(model, digits, "val")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    history: dict = {}
    fit(model, digits, TrainOptions(epochs=10, lr=1.0, batch_size=100, patience=2, keep_start=True), history=history)
    assert max(history["val_accuracy"]) < start_val, f"lr 1.0 should make every epoch worse than {start_val}: {history}"
    assert history["kept_epoch"] == 0 and len(history["val_accuracy"]) == 2, f"expected epoch 0 kept after 2 epochs: {history}"
    assert history["start_val_accuracy"] == start_val, f"start accuracy {history['start_val_accuracy']} != {start_val}"
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), f"{k} differs from the weights before training"


def test_finalize_never_returns_a_model_worse_on_validation_than_its_parent(small_study, tmp_path):
    """Finalize chooses on validation accuracy, and the parent's model is a candidate: at a learning
    rate that wrecks the model, the finalized trial is the parent's model (kept epoch 0), not the
    wrecked epoch (before the fix it kept epoch 1, far below the parent on validation)."""
    cfg = copy_study(small_study, tmp_path)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    parent = next(t for t in complete if t.user_attrs.get("method") in ("none", "prune") and "derived_from" not in t.user_attrs)
    data = dataset_from_config(cfg.dataset, download=False)
    parent_val = evaluate(load_model(cfg.study_dir / parent.user_attrs["checkpoint"]), data, "val")

    r = CliRunner().invoke(app, ["finalize", str(cfg.study_dir), "--trial", str(parent.number), "--epochs", "2", "--lr", "1.0"])
    assert r.exit_code == 0, f"finalize failed: {r.output}"
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    t = next(t for t in study.get_trials() if t.user_attrs.get("finalized_from") == parent.number)
    info = t.user_attrs["finalize"]
    assert max(info["val_accuracy"]) < parent_val, f"lr 1.0 should make every epoch worse than the parent's {parent_val}: {info}"
    final_val = evaluate(load_model(cfg.study_dir / t.user_attrs["checkpoint"]), data, "val")
    assert final_val == pytest.approx(parent_val, abs=1e-12), f"finalized model's validation accuracy {final_val} is below its parent's {parent_val}: {info}"
    assert info["kept_epoch"] == 0 and info["start_val_accuracy"] == pytest.approx(parent_val, abs=1e-12), f"expected epoch 0 (the parent) kept: {info}"


def test_finalize_creates_a_linked_trial_and_export_ships_it(small_study, tmp_path):
    cfg = copy_study(small_study, tmp_path)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    parent = next(t for t in complete if t.user_attrs.get("method") in ("none", "prune") and "derived_from" not in t.user_attrs)
    counted = finished_count(study)
    runner = CliRunner()

    r = runner.invoke(app, ["finalize", str(cfg.study_dir), "--trial", str(parent.number), "--epochs", "3", "--lr", "0.001"])
    assert r.exit_code == 0, f"finalize failed: {r.output}"
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    final = [t for t in study.get_trials() if t.user_attrs.get("finalized_from") == parent.number]
    assert len(final) == 1, f"expected one trial finalized from {parent.number}, got {[t.number for t in final]}"
    t = final[0]
    assert t.state == optuna.trial.TrialState.COMPLETE and t.params == parent.params, f"trial {t.number}: {t.state}, params {t.params} != {parent.params}"
    assert finished_count(study) == counted, "a finalized trial must not count toward the search budget"
    info = t.user_attrs["finalize"]
    curve = info["val_accuracy"]
    candidates = [info["start_val_accuracy"], *curve]  # epoch 0 is the parent's model
    assert 1 <= len(curve) <= 3 and info["kept_epoch"] == candidates.index(max(candidates)), f"kept epoch not the best on validation: {info}"

    folder = cfg.study_dir / t.user_attrs["checkpoint"]
    data = dataset_from_config(cfg.dataset, download=False)
    model = load_model(folder)
    assert evaluate(model, data, "val") == pytest.approx(max(candidates), abs=1e-12), "the checkpoint must hold the kept (best validation) epoch's weights"
    recorded = t.values[study.metric_names.index("accuracy")]
    assert evaluate(model, data, "test") == pytest.approx(recorded, abs=1.5 / data.n("test")), f"recorded test accuracy {recorded} is not the finalized model's"

    r = runner.invoke(app, ["show", str(cfg.study_dir), "--all"])
    assert r.exit_code == 0 and f"(finalized from {parent.number})" in r.output, f"show must mark the finalized trial: {r.output}"

    out = tmp_path / "export"
    r = runner.invoke(app, ["export", str(cfg.study_dir), "--trial", str(parent.number), "--out", str(out)])
    assert r.exit_code == 0, f"export failed: {r.output}"
    assert f"has a finalized version, trial {t.number}" in r.output, f"export must say it ships the finalized version: {r.output}"
    card = json.loads((out / "card.json").read_text())
    assert card["trial"] == t.number and card["metrics"]["recorded"]["accuracy"] == pytest.approx(recorded), f"card is not the finalized trial's: {card['trial']}"


def test_finalize_of_an_int8_trial_fine_tunes_its_float_model_and_replays_int8(small_study, tmp_path):
    """int8 is post-training: finalize fine-tunes the float model it started from (``float/``) and
    quantises the result again with int8's own apply; the new trial is int8 and its float/ is the kept epoch's."""
    from automl._checkpoint import FLOAT_FOLDER

    cfg = copy_study(small_study, tmp_path)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    parent = next(t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if t.user_attrs.get("method", "").endswith("int8"))
    r = CliRunner().invoke(app, ["finalize", str(cfg.study_dir), "--trial", str(parent.number), "--epochs", "2"])
    assert r.exit_code == 0, f"finalize of int8 trial {parent.number} failed: {r.output}"
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    t = next(t for t in study.get_trials() if t.user_attrs.get("finalized_from") == parent.number)
    folder = cfg.study_dir / t.user_attrs["checkpoint"]
    data = dataset_from_config(cfg.dataset, download=False)
    model, float_model = load_model(folder), load_model(folder / FLOAT_FOLDER)
    def int8(v) -> bool:  # a quantised tensor, packed weights, or a (dynamic) tuple holding one
        if isinstance(v, (tuple, list)):
            return any(int8(e) for e in v)
        return isinstance(v, torch.ScriptObject) or (isinstance(v, torch.Tensor) and v.is_quantized)

    from searchspace import artifact_quantization

    quantized = [k for k, v in model.state_dict().items() if int8(v)]
    # int8 either quantises the module (torch.ao) or leaves the recipe its runtime's quantiser applies to the artifact.
    assert quantized or artifact_quantization(model) is not None, "the finalized model of an int8 trial must be int8 again"
    info = t.user_attrs["finalize"]
    best = max(info["start_val_accuracy"], *info["val_accuracy"])  # epoch 0 is the parent's float model
    assert evaluate(float_model, data, "val") == pytest.approx(best, abs=1e-12), "float/ must hold the kept (best validation) epoch's weights"
    assert abs(evaluate(model, data, "val") - best) < 0.05, "int8 of the kept float model must keep its validation accuracy within 5 points"


def test_finalize_bad_input_exits_2_with_one_line(small_study, tmp_path):
    cfg = copy_study(small_study, tmp_path)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    donor = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[0]
    study.add_trial(optuna.trial.create_trial(params=donor.params, distributions=donor.distributions, state=optuna.trial.TrialState.FAIL))
    failed = study.get_trials()[-1].number
    before = len(study.get_trials())
    runner = CliRunner()
    for args, words in (
        (["--trial", "9999"], "has no trial 9999"),
        (["--trial", str(failed)], "only COMPLETE trials"),
        (["--trial", str(donor.number), "--epochs", "0"], "--epochs must be >= 1"),
        ([], "exactly one of"),
    ):
        r = runner.invoke(app, ["finalize", str(cfg.study_dir), *args])
        lines = [line for line in r.output.strip().splitlines() if line.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and words in lines[0], f"{args}: expected exit 2 and one line with {words!r}, got {r.exit_code}: {r.output}"
    assert len(optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).get_trials()) == before, "bad input must add no trial"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_finalize_trains_as_a_ray_task_with_the_trial_resources(small_study, tmp_path, ray_session):
    """With ``resources.gpus`` the fine-tune is a Ray task holding the trial's GPU share, as the
    base training is: on Ray's logical GPU here, handed GPU 0, falling back to the CPU and saying so."""
    import ray

    from automl._finalize import finalize_trial

    cfg = copy_study(small_study, tmp_path)
    cfg = cfg.with_overrides(resources={"cpus": 1, "gpus": 0.5})
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    parent = next(t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if t.user_attrs.get("method") == "none")
    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        t = finalize_trial(cfg, study, parent.number, epochs=1, log=lambda _m: None)
    finally:
        ray.shutdown()
    notes = t.user_attrs["notes"]
    assert notes.get("gpu_ids") == ["0"] and notes.get("device") == "cpu" and "gpu_fallback" in notes, f"finalize did not run as a Ray task with a GPU share: {notes}"


@pytest.mark.parametrize("schedule,expected", [("onecycle", "cosine"), ("cosine", "cosine"), ("constant", "constant")])
def test_finalize_recipe_never_warms_up_and_keeps_the_rest_of_the_recipe(schedule, expected):
    """Early stopping must not judge a warm-up: one-cycle becomes cosine; optimiser, momentum,
    weight decay and label smoothing stay the study's."""
    from automl import parse_config
    from automl._finalize import finalize_recipe

    cfg = parse_config({
        "name": "recipe", "dataset": {"name": "digits"}, "base": {"model": "digits_cnn"},
        "budget": {"schedule": schedule, "optimizer": "sgd", "momentum": 0.8, "weight_decay": 1e-4, "label_smoothing": 0.1},
    })
    recipe = cfg.budget.recipe()
    got = finalize_recipe(recipe)
    assert got["schedule"] == expected, f"{schedule} -> {got['schedule']}, expected {expected}"
    assert {k: v for k, v in got.items() if k != "schedule"} == {k: v for k, v in recipe.items() if k != "schedule"}, got
