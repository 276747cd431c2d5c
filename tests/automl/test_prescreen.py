"""Costs before training, constraints before training, no repeated work (issue 13).

- the dry run of a plan (the chain without training) has exactly the trained model's params, size
  and MACs, for every registered method on the built-in CNNs (exits: MACs are an upper bound,
  fitted thresholds only make samples leave earlier); latency is compared through the artifact
  itself, the same ONNX graph (same ops, same tensor shapes), not through timings on a shared machine;
- a trial whose dry run breaks ``max_params`` is recorded PRUNED with its constraint values in
  Optuna and never reaches the training loop (its calls are counted);
- a plan equal to one already trained (or a tucker that converts nothing, i.e. the base as is)
  trains once; the repeat is recorded against the first trial;
- ``min_accuracy`` keeps a trial off the front, the knee and every pick.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import optuna
import pytest
import torch

import automl._trial
import searchspace
from automl._constraints import Constraints
from automl._latency import LatencySettings
from automl._measure import param_count
from automl._pareto import knee_point, load_view, pick
from automl._prescreen import Screen, dry_run, plan_key
from automl._trial import TrialSettings, run_trial
from automl._tune import DUPLICATE_OF, INFEASIBLE, searcher_class
from searchspace import Plan, SearchSpace
from tests.conftest import make_base, sample_params

FAST = LatencySettings(warmup=1, repeats=3, max_attempts=1, isolate=False, max_samples=20)
SETTINGS = TrialSettings(epochs=1, lr=1e-3, batch_size=100, latency=FAST)
CNNS = [("digits_cnn", "digits"), ("mnist1d_cnn", "mnist1d")]


def onnx_graph(folder: Path) -> list[tuple[str, list]]:
    """Per ONNX file in ``folder``: its node op types and its initializer shapes, in order."""
    out = []
    for f in sorted(folder.glob("*.onnx")):
        g = onnx.load(str(f)).graph
        out.append((f.name, [n.op_type for n in g.node], sorted((i.name, list(i.dims)) for i in g.initializer)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model_name,dataset", CNNS, ids=[m for m, _ in CNNS])
@pytest.mark.parametrize("name", searchspace.list_methods())
def test_dry_run_costs_equal_the_trained_model(name, model_name, dataset, request, tmp_path):
    data = request.getfixturevalue(dataset)
    method = searchspace.get_method(name)()
    base = make_base(model_name, data.input_shape)
    if method.supports(base) is not None:
        pytest.skip(f"{name} does not apply to {model_name}: {method.supports(base)}")
    params, _ = sample_params(method, seed=5)
    plan = Plan(chain=((name, params),), finetune={"distill": False})
    costs = dry_run(plan, base, data, SETTINGS, folder=tmp_path / "dry")
    trained = run_trial(plan, base, data, SETTINGS, folder=tmp_path / "trained").metrics
    if method.costs_after_training:
        # The artifact holds the fitted thresholds: only the stored weights are final before training.
        assert (costs.params, costs.state_dict_bytes) == (trained.params, trained.state_dict_bytes), f"{name}: dry run {(costs.params, costs.state_dict_bytes)} != trained {(trained.params, trained.state_dict_bytes)}"
        assert not costs.final and costs.known == ("params", "state_dict_bytes"), f"{name}: costs depend on training, known {costs.known}"
        assert costs.macs >= trained.macs, f"{name}: dry-run MACs {costs.macs} (nobody exits early) < trained expected MACs {trained.macs}"
        return
    assert (costs.params, costs.size_bytes, costs.state_dict_bytes) == (trained.params, trained.size_bytes, trained.state_dict_bytes), (
        f"{name} {params} on {model_name}: dry run (params, size, state dict) {(costs.params, costs.size_bytes, costs.state_dict_bytes)} "
        f"!= trained {(trained.params, trained.size_bytes, trained.state_dict_bytes)}"
    )
    assert costs.final and costs.macs == trained.macs, f"{name} {params} on {model_name}: dry-run MACs {costs.macs} != trained {trained.macs}"
    # Latency is timed on the artifact: the same graph (ops and shapes) is the same work.
    dry, real = onnx_graph(tmp_path / "dry"), onnx_graph(tmp_path / "trained")
    assert dry and dry == real, f"{name} on {model_name}: the dry run's ONNX graph differs from the trained model's"


# --- the searcher before training ------------------------------------------------------------


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
    study.set_user_attr("objectives", ["accuracy", "size_bytes", "latency_ms"])
    searcher = searcher_class()(
        space=SearchSpace(methods), metric=["accuracy", "size_bytes", "latency_ms"], mode=["max", "min", "min"],
        sampler=sampler, study_name="screen", storage=None, extra_metrics=("params", "macs"), budget=budget,
        screen=Screen(base=base, data=data, settings=SETTINGS, methods=methods, constraints=constraints),
    )
    searcher._ot_study = study
    return searcher, study


def train_config(config, base, data, tmp_path, counter) -> dict:
    plan = Plan.from_dict(config["plan"])
    out = run_trial(plan, base, data, SETTINGS, folder=tmp_path / f"t{config['optuna_trial_number']}")
    return {**out.metrics.as_dict(), "method": plan.label}


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
    assert first.state == optuna.trial.TrialState.PRUNED, f"the infeasible trial is {first.state}, not PRUNED"
    excess = param_count(base) - bound
    assert first.constraints == {"max_params": excess}, f"Optuna's constraint values {first.constraints} != max_params {excess}"
    assert first.user_attrs["params"] == param_count(base) and "params" in first.user_attrs[INFEASIBLE], first.user_attrs
    assert first.values is None and "accuracy" not in first.user_attrs, "an untrained model's accuracy must not be recorded"


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
    result = train_config(config, base, digits, tmp_path, counter)
    assert counter.calls == 1, f"`none` fine-tunes once, the loop ran {counter.calls} times"
    searcher.on_trial_complete("t0", result)
    from ray.tune.search import Searcher

    # Both repeats are recorded at once and fill the budget of 3: nothing is left to launch.
    assert searcher.suggest("t1") == Searcher.FINISHED, "the budget is spent: the searcher must finish"
    trials = study.trials
    assert len(trials) == 3, f"{len(trials)} trials recorded, expected the trained one and two repeats"
    assert counter.calls == 1, f"the training loop ran {counter.calls} times for one distinct plan"
    for t in trials[1:]:
        assert t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get(DUPLICATE_OF) == 0, f"trial {t.number}: {t.state} {t.user_attrs}"
        assert t.values == trials[0].values, f"trial {t.number}: values {t.values} != the first trial's {trials[0].values}"
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


def test_node_screen_dry_runs_in_a_ray_worker_with_the_launchers_costs(digits, ray_session):
    """The study's screen (NodeScreen) runs each dry run in a Ray worker, as trials run, not in the
    launcher beside Tune's loop; its exact costs are those of the same dry run in the launcher."""
    import os
    import tempfile

    import ray

    from automl._search import NodeScreen

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # tests.fixtures.whereami's LOG; not imported here, so its method is registered only in the worker.
    log = Path(tempfile.gettempdir()) / "automl-test-whereami.pids"
    log.unlink(missing_ok=True)
    base = make_base("digits_cnn", digits.input_shape)
    methods = {n: searchspace.get_method(n)() for n in ("none", "tucker")}
    local = Screen(base=base, data=digits, settings=SETTINGS, methods=methods, constraints=Constraints(max_params=param_count(base) - 1))
    node = NodeScreen(local, plugins=("tests.fixtures.whereami",), threads=1)
    tucker = Plan(chain=(("tucker", {"rank_out": 0.3, "rank_in": 0.3}),), finetune={"distill": False})
    here, there = local.check(tucker, {}), node.check(tucker, {})
    assert there.error is None and there.costs is not None, f"the node screen failed: {there.error}"
    exact = ("params", "size_bytes", "state_dict_bytes", "macs")
    assert {k: getattr(there.costs, k) for k in exact} == {k: getattr(here.costs, k) for k in exact}, "the worker's dry run measured other costs"
    assert there.costs.latency_ms > 0 and there.broken == here.broken == "", (there.broken, here.broken)
    base_plan = Plan(chain=(("none", {}),), finetune={"distill": False})
    assert node.check(base_plan, {}).broken.startswith("params "), "the base breaks max_params in the worker too"
    assert node.check(base_plan, {plan_key(base_plan): 7}).duplicate_of == 7, "a finished plan is recognised in the worker"
    verdict = node.check(Plan(chain=(("whereami", {"point": 0.5}),), finetune={"distill": False}), {})
    assert verdict.error is None, f"the plugin method's dry run failed in the worker: {verdict.error}"
    pids = [int(line) for line in log.read_text().split()]
    assert pids and os.getpid() not in pids, f"dry runs ran in processes {pids}; the launcher is {os.getpid()}"
