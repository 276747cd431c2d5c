"""A finished trial's record (automl._records): one writer, one shape for every kind of trial.

- :func:`write_trial` refuses a record that breaks the shape: numbers on a trial without a measured
  model, a metric or the checkpoint passed as a plain attribute, a COMPLETE trial without a finite
  value for each objective;
- nothing in ``automl/`` but ``automl._records`` finishes a trial or writes its record;
- a small real study (Ray Tune x Optuna, SQLite) holds one trial of each kind (trained, a repeat,
  stopped before training by a cost bound, failed, an extra operating point, finalized,
  interrupted), and every one has the same metric attributes, measured on its own model or None.
  (A trial a scheduler stopped is read back in ``test_moasha_study.py``.)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState

import automl._records as records
from automl import build_model, parse_config
from automl._measure import count_macs
from automl._metrics import MEASURED_KEYS, METRIC_KEYS
from automl._pareto import load_view
from automl._records import (
    CHECKPOINT,
    DERIVED_FROM,
    DRY_RUN,
    DUPLICATE_OF,
    FAIL_REASON,
    FINALIZED_FROM,
    INFEASIBLE,
    INTERRUPTED,
    measured,
    write_trial,
)
from tests.conftest import REPO

NONE = dict.fromkeys(MEASURED_KEYS)
DIST = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _study() -> optuna.Study:
    return optuna.create_study(directions=["maximize", "minimize"])


def test_a_record_has_every_metric_attribute_and_the_objectives_as_values():
    study = _study()
    t = write_trial(
        study, None, state=TrialState.COMPLETE, objectives=("accuracy", "size_bytes"), metrics={"accuracy": 0.9, "size_bytes": 100, "macs": 7},
        checkpoint="checkpoints/x", attrs={"method": "none"}, params={"x": 0.5}, distributions=DIST,
    )
    assert t.values == [0.9, 100.0] and measured(t) == {**NONE, "accuracy": 0.9, "size_bytes": 100, "macs": 7}, (t.values, measured(t))
    assert t.user_attrs[CHECKPOINT] == "checkpoints/x" and t.user_attrs["method"] == "none" and t.params == {"x": 0.5}, t.user_attrs
    running = study.ask()
    failed = write_trial(study, running, state=TrialState.FAIL, attrs={FAIL_REASON: "boom"})
    assert failed.state == TrialState.FAIL and failed.values is None and measured(failed) == NONE and failed.user_attrs[CHECKPOINT] is None, failed.user_attrs
    pruned = write_trial(study, study.ask(), state=TrialState.PRUNED, constraints={"max_params": 3.0}, attrs={DRY_RUN: {"params": 12}})
    assert pruned.constraints == {"max_params": 3.0} and measured(pruned) == NONE and pruned.user_attrs[DRY_RUN] == {"params": 12}, pruned


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"state": TrialState.PRUNED, "metrics": {"latency_ms": 1.0}}, "no measured model"),
        ({"state": TrialState.FAIL, "metrics": {"accuracy": 0.5}}, "no measured model"),
        ({"state": TrialState.PRUNED, "attrs": {"latency_ms": 1.0}}, "attrs may not hold ['latency_ms']"),
        ({"state": TrialState.FAIL, "attrs": {CHECKPOINT: "c"}}, "attrs may not hold ['checkpoint']"),
        ({"state": TrialState.COMPLETE, "objectives": ("accuracy", "size_bytes"), "metrics": {"accuracy": 0.5}}, "finite value for every objective"),
        ({"state": TrialState.COMPLETE, "objectives": ("accuracy", "size_bytes"), "metrics": {"accuracy": 0.5, "size_bytes": float("nan")}}, "finite value"),
        ({"state": TrialState.COMPLETE, "objectives": ("accuracy", "size_bytes"), "metrics": {"accuracy": 0.5, "size_bytes": 1, "speed": 2}}, "fields of Metrics"),
        ({"state": TrialState.RUNNING}, "COMPLETE, PRUNED or FAIL"),
        ({"state": TrialState.PRUNED, "constraints": {"max_params": float("nan")}}, "finite"),
    ],
)
def test_a_record_that_breaks_the_shape_is_refused_and_nothing_is_written(kwargs, needle):
    study = _study()
    trial = study.ask()
    with pytest.raises(ValueError, match=None) as err:
        write_trial(study, trial, **kwargs)
    assert needle in str(err.value), f"{err.value!r} should say {needle!r}"
    after = study.trials[0]
    assert after.state == TrialState.RUNNING and after.user_attrs == {} and after.constraints == {}, f"a refused record wrote {after}"


#: Writes that finish a trial or change its record: only automl._records makes them.
_FINISHING = {"tell", "add_trial", "add_trials", "create_trial", "set_constraint", "set_trial_state_values", "set_trial_system_attr"}
#: What a RUNNING trial carries before its record: its owner, heartbeat, Ray id and sampled plan.
_RUNNING_ATTRS = {"launcher", "heartbeat", "ray_trial_id", "method"}


def _key(node: ast.expr) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return getattr(records, node.id, node.id)
    return ast.unparse(node)


def test_only_the_record_module_writes_a_finished_trial():
    """Every call that finishes a trial or writes a trial attribute, outside ``automl._records``,
    is a running trial's bookkeeping (owner, heartbeat) or a study attribute."""
    found = []
    for path in sorted((REPO / "automl").glob("*.py")):
        if path.name == "_records.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, receiver = node.func.attr, ast.unparse(node.func.value)
            where = f"{path.name}:{node.lineno} {ast.unparse(node)[:80]}"
            if name in _FINISHING and node.args:
                found.append(where)
            elif name == "set_user_attr" and "study" not in receiver and _key(node.args[0]) not in _RUNNING_ATTRS:
                found.append(where)
            elif name == "set_trial_user_attr" and _key(node.args[1]) not in _RUNNING_ATTRS:
                found.append(where)
    assert not found, f"trials written outside automl._records.write_trial: {found}"


# --- one trial of each kind, from a real study -------------------------------------------------

EXITS = {
    "method": "exits", "exits.points": "stages", "exits.count": 1, "exits.head": "avgpool", "exits.pool": 2,
    "exits.training": "frozen", "exits.thresholds": "budget", "exits.q": 0.5, "distill": False,
}
TUCKER = {"method": "tucker", "tucker.rank_out": 0.3, "tucker.rank_in": 0.3, "distill": False}
OPTIONS = {"width": 0.5}


@pytest.fixture(scope="module")
def kinds_study(tmp_path_factory, ray_session):
    """Trained tucker, its repeat, the base (breaks ``max_macs``: stopped before training), a method
    that raises, an early-exit model with its extra operating points; then the tucker finalized
    and a trial of a dead launcher closed as interrupted."""
    from automl._finalize import finalize_trial
    from automl._recovery import LAUNCHER, close_interrupted
    from automl._search import run_search
    from automl._study import open_storage

    base_macs = count_macs(build_model("digits_cnn", input_shape=(1, 8, 8), num_classes=10, options=OPTIONS), torch.zeros(1, 1, 8, 8))
    cfg = parse_config(
        {
            "name": "kinds",
            "plugins": ["tests.fixtures.flaky"],
            "dataset": {"name": "digits"},
            "base": {"model": "digits_cnn", "epochs": 10, "options": OPTIONS},
            "methods": {"none": {}, "tucker": {}, "exits": {}, "flaky": {}},
            "objectives": ["accuracy", "size_bytes", "latency_ms"],
            "constraints": {"max_macs": base_macs - 1},
            "budget": {"trials": 5, "epochs": 1},
            "sampler": {"name": "random", "seed": 0},
            "resources": {"cpus": 1, "max_concurrent": 1},
            "latency": {"warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1, "max_samples": 20, "drift_check": False},
            "output_dir": str(tmp_path_factory.mktemp("kinds") / "runs"),
        }
    )
    cfg.study_dir.mkdir(parents=True)
    study = optuna.create_study(storage=open_storage(cfg.storage_url), study_name=cfg.name, directions=[o.resolved_direction for o in cfg.objectives])
    for point in (TUCKER, TUCKER, {"method": "none", "distill": False}, {"method": "flaky", "flaky.mode": "raise", "distill": False}, EXITS):
        study.enqueue_trial(point)  # the config's enqueue would skip the repeat
    study = run_search(cfg, log=lambda _m: None)
    trained = next(t for t in study.get_trials() if t.params.get("method") == "tucker" and DUPLICATE_OF not in t.user_attrs)
    finalize_trial(cfg, study, trained.number, epochs=1, log=lambda _m: None)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)
    orphan = study.ask()
    study._storage.set_trial_user_attr(orphan._trial_id, "launcher", {**LAUNCHER, "pid": dead, "id": "a-dead-launcher"})
    assert close_interrupted(study, log=lambda _m: None) == [orphan.number], "the dead launcher's trial must be closed"
    return cfg, base_macs, optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)


def _kinds(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    trials = study.get_trials()

    def one(kind: str, test) -> optuna.trial.FrozenTrial:
        found = [t for t in trials if test(t)]
        assert len(found) >= 1, f"no {kind} trial: {[(t.number, t.state.name, t.params, t.user_attrs.get(FAIL_REASON)) for t in trials]}"
        return found[0]

    is_tucker = lambda t: t.params.get("method") == "tucker"  # noqa: E731
    return {
        "trained": one("trained", lambda t: is_tucker(t) and t.state == TrialState.COMPLETE and DUPLICATE_OF not in t.user_attrs and FINALIZED_FROM not in t.user_attrs),
        "duplicate": one("duplicate", lambda t: DUPLICATE_OF in t.user_attrs),
        "infeasible": one("infeasible", lambda t: INFEASIBLE in t.user_attrs),
        "failed": one("failed", lambda t: t.state == TrialState.FAIL and "injected failure" in str(t.user_attrs.get(FAIL_REASON))),
        "parent": one("parent", lambda t: t.params.get("method") == "exits" and DERIVED_FROM not in t.user_attrs),
        "variant": one("variant", lambda t: DERIVED_FROM in t.user_attrs),
        "finalized": one("finalized", lambda t: FINALIZED_FROM in t.user_attrs),
        "interrupted": one("interrupted", lambda t: t.user_attrs.get(INTERRUPTED)),
    }


@pytest.mark.slow
def test_every_kind_of_trial_has_the_same_metric_attributes(kinds_study):
    cfg, base_macs, study = kinds_study
    kinds = _kinds(study)
    shapes = {kind: sorted(k for k in t.user_attrs if k in (*MEASURED_KEYS, CHECKPOINT)) for kind, t in kinds.items()}
    assert all(s == sorted((*MEASURED_KEYS, CHECKPOINT)) for s in shapes.values()), f"metric attributes differ between kinds: {shapes}"
    objectives = [o.metric for o in cfg.objectives]
    view = load_view(study)
    for kind in ("trained", "duplicate", "parent", "variant", "finalized"):
        t = kinds[kind]
        assert t.state == TrialState.COMPLETE, f"{kind}: {t.state}"
        numbers = measured(t)
        assert all(numbers[k] is not None for k in METRIC_KEYS) and numbers["runtime"] == "onnxruntime", f"{kind}: {numbers}"
        assert t.values == [float(numbers[o]) for o in objectives], f"{kind}: values {t.values} != its attributes {numbers}"
        assert view.row(t.number).metrics == {k: numbers[k] for k in METRIC_KEYS}, f"{kind}: the review reads other numbers"
        record = json.loads((cfg.study_dir / t.user_attrs[CHECKPOINT] / "trial.json").read_text())
        assert record["metrics"]["accuracy"] == numbers["accuracy"], f"{kind}: checkpoint accuracy {record['metrics']['accuracy']} != recorded {numbers['accuracy']}"
    for kind in ("infeasible", "failed", "interrupted"):
        t = kinds[kind]
        assert t.values is None and measured(t) == NONE and t.user_attrs[CHECKPOINT] is None, f"{kind} has numbers: {t.user_attrs}"


@pytest.mark.slow
def test_each_kind_records_what_it_is(kinds_study):
    cfg, base_macs, study = kinds_study
    kinds = _kinds(study)
    trained, duplicate = kinds["trained"], kinds["duplicate"]
    assert duplicate.user_attrs[DUPLICATE_OF] == trained.number and measured(duplicate) == measured(trained), (duplicate.user_attrs, trained.user_attrs)
    assert duplicate.user_attrs[CHECKPOINT] == trained.user_attrs[CHECKPOINT] == f"checkpoints/trial_{trained.number:05d}", duplicate.user_attrs
    infeasible = kinds["infeasible"]
    # The base's dry run is final: its MACs break the bound by exactly 1, recorded under dry_run only.
    assert infeasible.state == TrialState.PRUNED and infeasible.user_attrs[DRY_RUN]["macs"] == base_macs, infeasible.user_attrs
    assert infeasible.constraints == {"max_macs": 1.0} and infeasible.user_attrs[DRY_RUN]["latency_ms"] > 0, (infeasible.constraints, infeasible.user_attrs)
    for kind in ("trained", "duplicate", "parent"):
        assert DRY_RUN in kinds[kind].user_attrs, f"{kind}: a screened trial keeps its dry run"
    assert trained.user_attrs[DRY_RUN]["params"] == trained.user_attrs["params"], "a tucker's dry-run params are the trained model's"
    variant, parent = kinds["variant"], kinds["parent"]
    assert variant.user_attrs[DERIVED_FROM] == parent.number and variant.user_attrs[CHECKPOINT].startswith(parent.user_attrs[CHECKPOINT] + "/variant_"), variant.user_attrs
    finalized = kinds["finalized"]
    assert finalized.user_attrs[FINALIZED_FROM] == trained.number and finalized.user_attrs[CHECKPOINT] == f"checkpoints/finalized_{trained.number:05d}", finalized.user_attrs
    assert isinstance(trained.user_attrs["notes"], dict) and isinstance(finalized.user_attrs["notes"], dict), "notes are a mapping on every trial"
    assert kinds["interrupted"].state == TrialState.FAIL and "interrupted" in kinds["interrupted"].user_attrs[FAIL_REASON], kinds["interrupted"].user_attrs
