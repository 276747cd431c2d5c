"""Malformed configs: exit code 2, one line naming the field, nothing written."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from automl import ConfigError, load_config, parse_config
from automl._cli import app

VALID = {
    "name": "t",
    "dataset": {"name": "digits"},
    "base": {"model": "digits_cnn", "epochs": 1},
    "methods": {"none": {}, "tucker": {"rank_in": [0.2, 0.8]}},
    "budget": {"trials": 2, "epochs": 1},
}


def _with(path: str, value):
    cfg = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return cfg


_DELETE = object()

# (config, text the one-line message must contain: the field path)
MALFORMED = [
    pytest.param(_with("trails", 3), "trails: unknown key", id="unknown-top-level-key"),
    pytest.param(_with("budget.trials", "many"), "budget.trials", id="wrong-type"),
    pytest.param(_with("budget.trials", 0), "budget.trials", id="out-of-range"),
    pytest.param(_with("methods", {"foo": {}}), "methods: unknown method 'foo'; allowed: dwsep, ", id="unknown-method"),
    pytest.param(_with("dataset.name", "imagenet"), "dataset.name: unknown dataset 'imagenet'; allowed:", id="unknown-dataset"),
    pytest.param(_with("base.model", "vgg99"), "base.model: unknown base model 'vgg99'", id="unknown-model"),
    pytest.param(_with("methods", {"tucker": {"rank_in": [0.0, 2.0]}}), "methods: tucker.rank_in: `0.05 <= low <= high <= 1.0` must hold", id="range-outside-domain"),
    pytest.param(_with("methods", {"tucker": {"rank": 0.5}}), "unknown hyperparameter 'rank' of method 'tucker'; allowed: allocation, rank_in, rank_out, share", id="unknown-hyperparameter"),
    pytest.param(_with("dataset", _DELETE), "dataset: required field is missing", id="missing-section"),
    pytest.param(_with("objectives", ["accuracy", "speed"]), "objectives.1.metric", id="unknown-objective"),
    pytest.param(_with("objectives", ["accuracy", "accuracy"]), "objectives: objectives must be a non-empty list of distinct", id="duplicate-objective"),
    pytest.param(_with("storage", "my-database"), "storage: storage must be an SQLAlchemy URL", id="storage-not-url"),
    pytest.param(_with("sampler.name", "cmaes"), "sampler.name", id="unknown-sampler"),
    pytest.param(_with("dataset", {"name": "cifar10"}), "dataset: dataset 'cifar10' reads from disk: set dataset.root", id="missing-root"),
    pytest.param(_with("resources.cpus", 1.5), "resources: resources.cpus above 1 must be a whole number", id="fractional-cpus"),
    pytest.param(_with("latency.repeats", 1), "latency.repeats", id="too-few-repeats"),
    pytest.param(_with("plugins", ["no_such_module_xyz"]), "plugins: plugins[0]: module 'no_such_module_xyz' cannot be imported", id="bad-plugin"),
    pytest.param(_with("base.checkpoint", "/nonexistent/base.pt"), "base.checkpoint: checkpoint file must exist", id="missing-checkpoint"),
    pytest.param(_with("methods", {"none": []}), "methods.none", id="method-overrides-not-mapping"),
    pytest.param(_with("name", "../escape"), "name", id="bad-study-name"),
    pytest.param(_with("storage_retry_s", -1), "storage_retry_s: Input should be greater than or equal to 0, got -1", id="negative-storage-retry"),
    pytest.param(["not", "a", "mapping"], "the config must be a mapping", id="not-a-mapping"),
]


def _run(args: list[str]):
    return CliRunner().invoke(app, args)


def _assert_one_line_exit_2(result, must_contain: str, out_dir: Path) -> None:
    text = (result.stderr or "") + (result.stdout or "")
    lines = [l for l in text.splitlines() if l.strip()]
    assert result.exit_code == 2, f"exit code {result.exit_code} != 2; output: {text!r}"
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {text!r}"
    assert must_contain in lines[0], f"{must_contain!r} not in {lines[0]!r}"
    assert "Traceback" not in text, f"traceback in output: {text!r}"
    leftovers = list(out_dir.rglob("*")) if out_dir.exists() else []
    assert not leftovers, f"bad input left files behind: {leftovers}"


@pytest.mark.parametrize("config,must_contain", MALFORMED)
def test_malformed_config_exits_2_with_one_line(tmp_path, config, must_contain):
    out_dir = tmp_path / "runs"
    if isinstance(config, dict):
        config = {**config, "output_dir": str(out_dir)}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    _assert_one_line_exit_2(_run(["launch", str(path)]), must_contain, out_dir)


def test_missing_file_and_bad_yaml(tmp_path):
    out = tmp_path / "runs"
    _assert_one_line_exit_2(_run(["launch", str(tmp_path / "nope.yaml")]), "config file not found", out)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    _assert_one_line_exit_2(_run(["launch", str(bad)]), "not valid YAML at line", out)


def test_unreachable_storage_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**VALID, "output_dir": str(out)}))
    result = _run(["launch", str(path), "--storage", f"sqlite:///{tmp_path}/no/such/dir/x.db"])
    _assert_one_line_exit_2(result, "storage 'sqlite:///", out)


def test_cli_override_is_validated(tmp_path):
    out = tmp_path / "runs"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**VALID, "output_dir": str(out)}))
    _assert_one_line_exit_2(_run(["launch", str(path), "--storage", "nonsense"]), "command line: storage:", out)


def test_console_script_prints_no_traceback(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**VALID, "budget": {"trials": -1}, "output_dir": str(tmp_path / "runs")}))
    proc = subprocess.run([sys.executable, "-m", "automl", "launch", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}"
    assert proc.stderr.strip().count("\n") == 0 and "budget.trials" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists(), "a study folder was created for a bad config"


def test_valid_config_is_frozen_and_defaults_fill_in():
    cfg = parse_config(VALID)
    assert [o.metric for o in cfg.objectives] == ["accuracy", "size_bytes", "latency_ms"]
    assert [o.resolved_direction for o in cfg.objectives] == ["maximize", "minimize", "minimize"]
    with pytest.raises(Exception, match="frozen"):
        cfg.budget.trials = 5  # type: ignore[misc]
    assert cfg.storage_url.startswith("sqlite:///") and cfg.storage_url.endswith("runs/t/optuna.db")


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].joinpath("studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name and cfg.methods, f"{path}: empty study"


def test_config_error_is_value_error():
    with pytest.raises(ConfigError):
        parse_config({"name": "x"})


def test_relaunch_with_a_changed_search_is_refused(tmp_path):
    out = tmp_path / "runs"
    study_dir = out / "t"
    study_dir.mkdir(parents=True)
    old = parse_config({**VALID, "output_dir": str(out)})
    (study_dir / "config.yaml").write_text(yaml.safe_dump(old.model_dump(mode="json")))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**VALID, "methods": {"none": {}}, "output_dir": str(out)}))
    result = _run(["launch", str(path)])
    text = (result.stderr or "") + (result.stdout or "")
    assert result.exit_code == 2 and "already exists" in text and "methods" in text, text
    assert sorted(p.name for p in study_dir.iterdir()) == ["config.yaml", "optuna.db"], "refused relaunch wrote more than the storage"
