"""The Ray Tune searcher (automl._searcher), driven directly on an in-memory Optuna study.

- a trial whose dry run breaks ``max_params`` is recorded PRUNED with its constraint values in
  Optuna and never reaches the training loop (its calls are counted); its costs sit under
  ``dry_run`` only, never under a metric's name;
- a plan equal to one already trained (or a tucker that converts nothing, i.e. the base as is)
  trains once; the repeat is recorded against the first trial with its numbers;
- ``min_accuracy`` keeps a trial off the front, the knee and every pick;
- a trained model's extra operating points become derived trials with their own parameters,
  numbers and checkpoint;
- Ctrl-C closes the running trials as interrupted and re-queues their parameters;
- no class of ``automl/`` is defined inside a function.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

import automl._trial
import searchspace
from automl._constraints import Constraints
from automl._latency import LatencySettings
from automl._measure import param_count
from automl._metrics import MEASURED_KEYS
from automl._pareto import knee_point, load_view, pick
from automl._prescreen import Screen, plan_key
from automl._records import DERIVED_FROM, DRY_RUN, DUPLICATE_OF, FAIL_REASON, INFEASIBLE, INTERRUPTED, measured
from automl._searcher import StudySearcher
from automl._trial import TrialSettings, run_trial
from automl._tune import VARIANTS
from searchspace import Plan, SearchSpace
from tests.conftest import REPO, make_base

FAST = LatencySettings(warmup=1, repeats=3, max_attempts=1, isolate=False, max_samples=20)
SETTINGS = TrialSettings(epochs=1, lr=1e-3, batch_size=100, latency=FAST)
OBJECTIVES = ["accuracy", "size_bytes", "latency_ms"]


class CountingFit:
    """The real training loop, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = automl._trial.fit

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def make_searcher(base, data, constraints: Constraints, *, budget: int):
    methods = {n: searchspace.get_method(n)() for n in ("none", "tucker")}
    sampler = optuna.samplers.TPESampler(seed=0)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler, study_name="screen")
    study.set_user_attr("objectives", OBJECTIVES)
    searcher = StudySearcher(
        space=SearchSpace(methods), metric=OBJECTIVES, mode=["max", "min", "min"],
        sampler=sampler, study_name="screen", storage=None, budget=budget,
        screen=Screen(base=base, data=data, settings=SETTINGS, methods=methods, constraints=constraints),
    )
    searcher._ot_study = study  # the searcher's own in-memory study, reachable for inspection
    return searcher, study


def train_config(config, base, data, tmp_path) -> dict:
    plan = Plan.from_dict(config["plan"])
    out = run_trial(plan, base, data, SETTINGS, folder=tmp_path / f"t{config['optuna_trial_number']}")
    return {**out.metrics.as_dict(), "method": plan.label, "seconds": out.seconds}


def test_trial_breaking_max_params_never_trains_and_is_infeasible(digits, monkeypatch):
    counter = CountingFit()
    monkeypatch.setattr(automl._trial, "fit", counter)
    base = make_base("digits_cnn", digits.input_shape)
    bound = param_count(base) - 1  # the base as is breaks it; a tucker at rank 0.3 does not
    searcher, study = make_searcher(base, digits, Constraints(max_params=bound), budget=10)
    study.enqueue_trial({"method": "none", "distill": False})
    study.enqueue_trial({"method": "tucker", "tucker.rank_out": 0.3, "tucker.rank_in": 0.3, "distill": False})
    config = searcher.suggest("t0")
    assert config["plan"]["chain"][0]["method"] == "tucker", f"the infeasible plan must be skipped, got {config['plan']}"
    assert counter.calls == 0, f"the training loop ran {counter.calls} times before any feasible trial was launched"
    first = study.trials[0]
    assert first.state == TrialState.PRUNED, f"the infeasible trial is {first.state}, not PRUNED"
    excess = param_count(base) - bound
    assert first.constraints == {"max_params": excess}, f"Optuna's constraint values {first.constraints} != max_params {excess}"
    assert first.user_attrs[DRY_RUN]["params"] == param_count(base) and "params" in first.user_attrs[INFEASIBLE], first.user_attrs
    # Its costs are the untrained model's: under dry_run only, never under a measured metric's name.
    assert first.values is None and measured(first) == dict.fromkeys(MEASURED_KEYS), f"a PRUNED trial has no measured numbers: {measured(first)}"
    assert first.user_attrs[DRY_RUN]["latency_ms"] > 0 and "accuracy" not in first.user_attrs[DRY_RUN], first.user_attrs[DRY_RUN]
    # The trial that trains carries its dry-run costs in its config, for a scheduler.
    assert config["costs"]["params"] < param_count(base), config["costs"]


def test_duplicate_plan_and_a_tucker_that_converts_nothing_train_once(digits, monkeypatch, tmp_path):
    counter = CountingFit()
    monkeypatch.setattr(automl._trial, "fit", counter)
    base = make_base("digits_cnn", digits.input_shape)
    searcher, study = make_searcher(base, digits, Constraints(), budget=3)
    study.enqueue_trial({"method": "none", "distill": False})
    study.enqueue_trial({"method": "none", "distill": False})
    # Full ranks save nothing on any layer: tucker converts none, the plan really is `none`.
    study.enqueue_trial({"method": "tucker", "tucker.rank_out": 1.0, "tucker.rank_in": 1.0, "distill": False})
    config = searcher.suggest("t0")
    result = train_config(config, base, digits, tmp_path)
    assert counter.calls == 1, f"`none` fine-tunes once, the loop ran {counter.calls} times"
    searcher.on_trial_complete("t0", result)

    # Both repeats are recorded at once and fill the budget of 3: nothing is left to launch.
    assert searcher.suggest("t1") == Searcher.FINISHED, "the budget is spent: the searcher must finish"
    trials = study.trials
    assert len(trials) == 3, f"{len(trials)} trials recorded, expected the trained one and two repeats"
    assert counter.calls == 1, f"the training loop ran {counter.calls} times for one distinct plan"
    first = trials[0]
    assert measured(first) == {k: result[k] for k in MEASURED_KEYS}, f"the trained trial's record {measured(first)} != its result"
    assert first.user_attrs["checkpoint"] == "checkpoints/trial_00000" and first.user_attrs["seconds"] == result["seconds"], first.user_attrs
    for t in trials[1:]:
        assert t.state == TrialState.COMPLETE and t.user_attrs.get(DUPLICATE_OF) == 0, f"trial {t.number}: {t.state} {t.user_attrs}"
        assert t.values == first.values and measured(t) == measured(first), f"trial {t.number}: {t.values} {measured(t)} != the first trial's"
        assert t.user_attrs["checkpoint"] == first.user_attrs["checkpoint"] and t.user_attrs["seconds"] == result["seconds"], t.user_attrs
    assert trials[2].user_attrs["converted_nothing"] == ["tucker"] and trials[2].user_attrs["method"] == "none", trials[2].user_attrs
    assert trials[2].user_attrs["plan_key"] == plan_key(Plan(chain=(("none", {}),), finetune={"distill": False})), trials[2].user_attrs


def test_min_accuracy_keeps_a_trial_off_the_front_knee_and_pick(digits):
    base = make_base("digits_cnn", digits.input_shape)
    searcher, study = make_searcher(base, digits, Constraints(min_accuracy=0.99), budget=10)
    study.set_user_attr("constraints", {"min_accuracy": 0.99})
    study.set_user_attr("base", {"accuracy": 1.0, "size_bytes": 400, "latency_ms": 4.0})
    study.enqueue_trial({"method": "tucker", "tucker.rank_out": 0.3, "tucker.rank_in": 0.3, "distill": False})
    study.enqueue_trial({"method": "tucker", "tucker.rank_out": 0.5, "tucker.rank_in": 0.5, "distill": False})
    # Two non-dominated trained results: A small but below the bound, B above it.
    results = {"t0": {"accuracy": 0.95, "size_bytes": 100, "latency_ms": 1.0}, "t1": {"accuracy": 0.995, "size_bytes": 200, "latency_ms": 2.0}}
    for tid, result in results.items():
        searcher.suggest(tid)
        searcher.on_trial_complete(tid, result)
    a, b = study.trials
    assert a.constraints == {"min_accuracy": pytest.approx(0.04)} and b.constraints["min_accuracy"] < 0, f"constraint values in Optuna: A {a.constraints}, B {b.constraints}"
    view = load_view(study)
    assert [r.number for r in view.front] == [b.number], f"front {[r.number for r in view.front]}: A (accuracy 0.95 < 0.99) must be off"
    assert knee_point(view.front, view) == b.number, "the knee must not be A"
    for how in ("smallest", "fastest", "knee", "best-accuracy"):
        assert pick(view, how).number == b.number, f"--pick {how} chose A, which breaks min_accuracy"
    assert pick(view, "smallest", Constraints()).number == b.number, "the study's own bound holds with no CLI bound"


def _plain_searcher(methods: tuple[str, ...], objectives: list[str], name: str) -> tuple[StudySearcher, optuna.Study]:
    space = SearchSpace({n: searchspace.get_method(n)() for n in methods})
    study = optuna.create_study(directions=["maximize"] + ["minimize"] * (len(objectives) - 1), study_name=name)
    searcher = StudySearcher(
        space=space, metric=objectives, mode=["max"] + ["min"] * (len(objectives) - 1),
        sampler=optuna.samplers.RandomSampler(seed=0), study_name=name, storage=None,
    )
    searcher._ot_study = study
    return searcher, study


def test_searcher_records_variants_as_derived_trials():
    searcher, study = _plain_searcher(("none", "exits"), ["accuracy", "latency_ms"], "variants")
    # Ask until the sampler picks `exits` with direct thresholds, to check a mode switch replays.
    for i in range(200):
        config = searcher.suggest(f"t{i}")
        chain = config["plan"]["chain"]
        if chain[0]["method"] == "exits" and chain[0]["params"]["thresholds"] == "direct":
            break
        searcher.on_trial_complete(f"t{i}", {FAIL_REASON: "skipped by the test"})
    else:
        pytest.fail("200 random trials never sampled exits with direct thresholds")
    variants = [
        {"params": {"exits.thresholds": "budget", "exits.q": q}, "state": {"thresholds": [0.9]},
         "metrics": {"accuracy": 0.8, "latency_ms": 0.1 * q, "macs": 1000, "exit_fractions": [0.5, 0.5]}}
        for q in (0.1, 1.0)
    ]
    result = {"accuracy": 0.9, "latency_ms": 0.3, "macs": 2000, VARIANTS: json.dumps(variants)}
    searcher.on_trial_complete(f"t{i}", result)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    parent = [t for t in done if DERIVED_FROM not in t.user_attrs]
    derived = [t for t in done if DERIVED_FROM in t.user_attrs]
    assert len(parent) == 1 and len(derived) == 2, f"{len(parent)} parent and {len(derived)} derived trials"
    assert parent[0].user_attrs["checkpoint"] == f"checkpoints/trial_{parent[0].number:05d}", parent[0].user_attrs
    for k, (t, q) in enumerate(zip(derived, (0.1, 1.0))):
        assert t.user_attrs[DERIVED_FROM] == parent[0].number, f"derived_from {t.user_attrs[DERIVED_FROM]} != {parent[0].number}"
        assert t.user_attrs["checkpoint"] == f"{parent[0].user_attrs['checkpoint']}/variant_{k}", f"a variant must point at its own checkpoint, got {t.user_attrs['checkpoint']}"
        assert t.params["exits.thresholds"] == "budget" and t.params["exits.q"] == q, f"variant params {t.params}"
        assert not any(p.startswith("exits.threshold_") for p in t.params), f"direct thresholds must be dropped: {t.params}"
        assert t.values == [0.8, pytest.approx(0.1 * q)], f"variant values {t.values}"
        want = {**dict.fromkeys(MEASURED_KEYS), **variants[k]["metrics"]}
        assert measured(t) == want, f"variant {k}: record {measured(t)} != its measured numbers {want}"
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert all(t.user_attrs[FAIL_REASON] == "skipped by the test" and measured(t) == dict.fromkeys(MEASURED_KEYS) for t in failed), "a FAIL trial has no numbers"


def test_close_running_records_interrupted_trials_and_requeues_them():
    searcher, study = _plain_searcher(("none", "tucker"), ["accuracy", "size_bytes"], "interrupt")
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    searcher.on_trial_complete("t0", {"accuracy": 0.9, "size_bytes": 100})
    closed = searcher.close_running("interrupted: stopped with Ctrl-C; its parameters were re-queued")
    numbers = [c["optuna_trial_number"] for c in configs]
    assert closed == numbers[1:], f"closed {closed}, the running trials were {numbers[1:]}"
    trials = {t.number: t for t in study.get_trials()}
    assert trials[numbers[0]].state == TrialState.COMPLETE, "a finished trial is left as it is"
    for n in closed:
        t = trials[n]
        assert t.state == TrialState.FAIL and t.user_attrs[INTERRUPTED] is True and "Ctrl-C" in t.user_attrs[FAIL_REASON], t.user_attrs
        assert measured(t) == dict.fromkeys(MEASURED_KEYS) and t.user_attrs["checkpoint"] is None, t.user_attrs
    waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["requeue_of"] for t in waiting) == closed, waiting
    assert {t.user_attrs["requeue_of"]: t.system_attrs["fixed_params"] for t in waiting} == {n: trials[n].params for n in closed}, "the same parameters are re-queued"


def test_no_class_is_defined_inside_a_function():
    """A class inside a function hides from readers and tools (and from pickling by reference)."""
    nested = []
    for path in sorted((REPO / "automl").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested += [f"{path.name}:{c.lineno} {c.name} in {node.name}()" for c in ast.walk(node) if isinstance(c, ast.ClassDef)]
    assert not nested, f"classes defined inside functions: {nested}"
