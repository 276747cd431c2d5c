"""Where latency is measured (automl._target): a user's runner, the target node of a Ray cluster,
the provenance every record carries, and the config rules of ``latency.node`` / ``latency.runner``.

The cluster test reuses test_cluster's loopback two-node Ray (its head declares ``head_node``, its
second node ``worker_node``): with ``latency.node: worker_node`` every latency of the study must
carry the second node's id, while trials train on both nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from automl._config import ConfigError, parse_config
from automl._latency import LatencySettings
from automl._measure import measure
from automl._target import TARGET_KEYS, provenance, target_of, target_summary
from tests.automl.test_cluster import ROOT, _exit_code, _launcher, cluster_gate, ray_cluster, ray_nodes  # noqa: F401 - fixtures reused
from tests.conftest import make_base
from tests.fixtures import runner as fixed_runner
from tests.fixtures.gate import wait_until

RUNNER = "tests.fixtures.runner:fixed_times"


def _cfg(**latency) -> dict:
    return {
        "name": "t",
        "dataset": {"name": "digits"},
        "base": {"model": "digits_cnn", "epochs": 1},
        "latency": latency,
    }


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "latency, field, words",
    [
        ({"node": 5}, "latency.node", "valid string"),
        ({"node": ["target"]}, "latency.node", "valid string"),
        ({"node": "has space"}, "latency.node", "custom resource"),
        ({"node": "CPU"}, "latency.node", "built-in"),
        ({"runner": "no_such_module_anywhere:time_it"}, "latency.runner", "cannot be imported"),
        ({"runner": "tests.fixtures.runner:not_there"}, "latency.runner", "has no function 'not_there'"),
        ({"runner": "tests.fixtures.runner:NOT_A_FUNCTION"}, "latency.runner", "has no function 'NOT_A_FUNCTION'"),
        ({"runner": "just_a_module"}, "latency.runner", "'module:function'"),
        ({"runner": 3}, "latency.runner", "valid string"),
        ({"runner": RUNNER, "runtime": "eager"}, "latency", "has none"),
    ],
)
def test_bad_target_settings_are_one_line_naming_the_field(latency, field, words):
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(**latency))
    text = str(err.value)
    assert "\n" not in text, f"the error must be one line: {text!r}"
    assert f": {field}" in text and words in text, f"the error must name {field} and say {words!r}: {text}"


def test_good_target_settings_reach_the_timing_settings():
    cfg = parse_config(_cfg(node="phone_box", runner=RUNNER))
    assert (cfg.latency.settings().node, cfg.latency.settings().runner) == ("phone_box", RUNNER)
    assert (LatencySettings().node, LatencySettings().runner) == (None, None), "default: timed where the artifact is built"


def test_a_bad_runner_exits_2_at_launch_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**_cfg(runner="no_such_module_anywhere:time_it"), "output_dir": str(tmp_path / "runs")}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "automl", "launch", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "latency.runner" in lines[0], f"rc {proc.returncode}, stderr {proc.stderr!r}"
    assert not (tmp_path / "runs").exists(), "nothing may be written for a bad config"


# --- runner and provenance ---------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript"])
def test_the_runners_times_are_the_recorded_latency(digits, tmp_path, runtime):
    settings = LatencySettings(runtime=runtime, runner=RUNNER, batch_size=4, max_attempts=1, attempt_gap_s=0.0)
    model = make_base("digits_cnn", digits.input_shape)
    metrics, _ = measure(model, digits, settings, folder=tmp_path, accuracy=False)
    assert (metrics.latency_ms, metrics.latency_iqr_ms) == (2.0, 2.0), f"median and IQR of {fixed_runner.TIMES} are 2.0 and 2.0, got {metrics.latency_ms}, {metrics.latency_iqr_ms}"
    where = target_of(metrics.latency_target)
    assert where is not None and where["runner"] == RUNNER and where["runtime"] == runtime, f"the record must name the runner: {where}"


def test_every_timing_records_where_it_ran(digits, tmp_path):
    settings = LatencySettings(warmup=1, repeats=3, max_attempts=1, attempt_gap_s=0.0)
    metrics, _ = measure(make_base("digits_cnn", digits.input_shape), digits, settings, folder=tmp_path, accuracy=False)
    where = target_of(metrics.latency_target)
    here = provenance(settings)
    assert where is not None and set(TARGET_KEYS) <= set(where) and {"node_id", "pid"} <= set(where), f"incomplete record: {where}"
    assert {k: where[k] for k in TARGET_KEYS} == {k: here[k] for k in TARGET_KEYS}, f"timed here, so the record is this process's: {where} vs {here}"
    assert where["pid"] == os.getpid() and where["runtime_version"], where
    assert json.loads(metrics.latency_target) == where, "kept as JSON text, one shape in every record"


def test_disagreeing_records_are_reported():
    a = {"resource": None, "host": "a", "cpu": "X", "cores": 2, "runtime": "onnxruntime", "runtime_version": "1", "device": "cpu", "threads": 1, "runner": None, "node_id": "n1", "pid": 1}
    same_target_other_process = {**a, "node_id": "n2", "pid": 2}  # a restarted node: same machine
    other = {**a, "host": "b", "cpu": "Y"}
    agree = target_summary([json.dumps(a), same_target_other_process, None])
    assert agree.warning is None and agree.unknown == 1 and len(agree.targets) == 1 and agree.targets[0][1] == 2, agree
    assert agree.line is not None and "a (X, 2 cores)" in agree.line, agree.line
    split = target_summary([a, other, other])
    assert split.targets[0][1] == 2 and split.targets[0][0]["host"] == "b", "the most common target first"
    assert split.warning is not None and "2 on b" in split.warning and "1 on a" in split.warning, split.warning


# --- the target node of a real two-node cluster -------------------------------------------------


def _cluster_config(path: Path, output_dir: Path, *, node: str) -> Path:
    cfg = {
        "name": "target",
        "plugins": ["tests.fixtures.gated"],
        "dataset": {"name": "digits"},
        "base": {"model": "digits_cnn", "epochs": 1},
        "methods": {"gated": {}},
        "budget": {"trials": 4, "epochs": 1},
        "resources": {"cpus": 1},
        "latency": {"node": node, "warmup": 2, "repeats": 3, "min_attempts": 1, "max_attempts": 1, "attempt_gap_s": 0.0, "drift_check": True},
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _node_ids(address: str) -> dict[str, str]:
    """Custom resource -> id of the node that declares it (``head_node``, ``worker_node``)."""
    probe = (
        "import json, ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR');"
        "print(json.dumps({k: n['NodeID'] for n in ray.nodes() if n['Alive'] for k in n['Resources'] if k.endswith('_node')}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_latency_is_measured_on_the_target_node_while_training_runs_on_both(tmp_path, ray_cluster, cluster_gate):
    nodes = _node_ids(ray_cluster)
    target = nodes["worker_node"]

    # No node declares the resource: exit 2 at launch, one line, nothing trained or written.
    missing = _cluster_config(tmp_path / "missing.yaml", tmp_path / "missing", node="phone")
    log = tmp_path / "missing.log"
    proc = _launcher(["launch", str(missing), "--address", ray_cluster], tmp_path, log)
    rc = _exit_code(proc, "without target", log, safety_s=300)
    text = [line for line in log.read_text().splitlines() if line.strip()]
    assert rc == 2 and len(text) == 1 and "latency.node" in text[0] and "'phone'" in text[0], f"rc {rc}: {text}"
    assert not (tmp_path / "missing" / "target").exists(), "a refused launch writes no study folder"

    # The second node declares it: every latency is timed there, trials train on both nodes.
    gate = cluster_gate
    out = tmp_path / "runs"
    cfg = _cluster_config(tmp_path / "target.yaml", out, node="worker_node")
    log = tmp_path / "target.log"
    proc = _launcher(["launch", str(cfg), "--address", ray_cluster], tmp_path, log)
    try:
        # Each node's one CPU holds a trial at the gate: training runs on both nodes.
        wait_until("two trials held at the gate, one per node", lambda: len(gate.held()) == 2 or None, proc=proc, log=log)
        gate.open()
        rc = _exit_code(proc, "with target", log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, f"launcher exited {rc}:\n{log.read_text()[-3000:]}"

    study = optuna.load_study(study_name="target", storage=f"sqlite:///{out / 'target' / 'optuna.db'}")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(complete) == 4, f"want 4 COMPLETE trials, got {[(t.number, t.state.name, t.user_attrs.get('fail_reason')) for t in study.get_trials()]}"
    trained_on = {t.user_attrs.get("node") for t in complete}
    assert trained_on == set(nodes.values()), f"trials must train on both nodes {nodes}, trained on {trained_on}"
    records = {"base": target_of(study.user_attrs["base"].get("latency_target"))}
    for t in complete:
        records[f"trial {t.number}"] = target_of(t.user_attrs.get("latency_target"))
        records[f"dry run {t.number}"] = target_of((t.user_attrs.get("dry_run") or {}).get("latency_target"))
    records["drift check"] = target_of(study.user_attrs.get("latency_drift_target"))
    wrong = {k: (w or {}).get("node_id") for k, w in records.items() if w is None or w.get("node_id") != target or w.get("resource") != "worker_node"}
    assert not wrong, f"every latency must be timed on the worker_node node {target}; these were not: {wrong}"

    show = subprocess.run([sys.executable, "-m", "automl", "show", str(out / "target")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert show.returncode == 0 and "latency measured on node with resource 'worker_node'" in show.stdout and "disagree" not in show.stdout, show.stdout + show.stderr


def test_an_onnx_artifact_with_external_data_travels_to_the_target_whole(tmp_path, monkeypatch):
    """What is sent to the target node is every file of the artifact (the graph and the weights a
    model too large for one ONNX file keeps beside it; torch's threshold lowered to 0 here), and
    the target's task opens and times it from those bytes alone."""
    import torch
    from torch.onnx._internal.exporter import _onnx_program

    from automl._artifact import build_artifact
    from automl._target import _shipped, _timing_task

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    artifact = build_artifact(make_base("digits_cnn", (1, 8, 8)), torch.zeros(1, 1, 8, 8), tmp_path / "a")
    files, module = _shipped(artifact)
    assert module is None and sorted(files) == ["model.onnx", "model.onnx.data"], f"both files must travel: {sorted(files or {})}"
    assert sum(len(b) for b in files.values()) == artifact.size_bytes, "the bytes sent are the bytes measured"
    timing = _timing_task(files, None, "onnxruntime", torch.randn(1, 1, 8, 8), LatencySettings(warmup=1, repeats=3, min_attempts=1, max_attempts=1), False)
    assert timing[0] > 0, f"the target must time the shipped artifact: {timing}"
