"""End to end: a real Ray Tune x Optuna study into a real SQLite file, then review and resume."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from typer.testing import CliRunner

from automl import parse_config, run_search
from automl._cli import app

FLAKY_POINTS = [
    {"method": "flaky", "flaky.mode": "raise", "distill": False},
    {"method": "flaky", "flaky.mode": "nan", "distill": False},
]


def _config(tmp_path, trials: int = 7):
    return parse_config(
        {
            "name": "e2e",
            "plugins": ["tests.fixtures.flaky"],
            "dataset": {"name": "digits"},
            "base": {"model": "digits_cnn", "epochs": 10, "options": {"width": 0.5}},
            "methods": {"none": {}, "tucker": {}, "flaky": {}},
            "enqueue": [*FLAKY_POINTS, {"method": "tucker", "tucker.rank_out": 0.3, "tucker.rank_in": 0.3, "distill": True}],
            "budget": {"trials": trials, "epochs": 1},
            "sampler": {"name": "random", "seed": 1},
            "latency": {"warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1},
            "output_dir": str(tmp_path / "runs"),
        }
    )


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("study")
    cfg = _config(tmp)
    lines: list[str] = []
    study = run_search(cfg, log=lines.append)
    return cfg, study, lines


def test_every_trial_is_recorded_with_links(finished_study):
    cfg, _, _ = finished_study
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    trials = study.get_trials()
    assert len(trials) == cfg.budget.trials, f"{len(trials)} trials in storage, budget {cfg.budget.trials}"
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, "no trial completed"
    for t in complete:
        assert len(t.values) == 3 and all(v == v for v in t.values), f"trial {t.number}: values {t.values}"
        assert t.user_attrs.get("ray_trial_id"), f"trial {t.number} has no ray_trial_id"
        ckpt = cfg.study_dir / t.user_attrs["checkpoint"]
        assert (ckpt / "model.onnx").is_file() and (ckpt / "trial.json").is_file(), f"trial {t.number}: checkpoint {ckpt} incomplete"
        assert not (ckpt / "model.ts").exists(), f"trial {t.number}: an onnxruntime study writes no TorchScript"
        record = json.loads((ckpt / "trial.json").read_text())
        assert record["metrics"]["accuracy"] == pytest.approx(t.values[0]), f"trial {t.number}: checkpoint accuracy differs"
    base = study.user_attrs["base"]
    assert base["accuracy"] > 0.8 and base["params"] > 0, f"base model not recorded: {base}"


def test_failing_trials_are_recorded_and_the_study_goes_on(finished_study):
    cfg, study, _ = finished_study
    by_mode = {}
    for t in study.get_trials():
        if t.params.get("method") == "flaky":
            by_mode.setdefault(t.params["flaky.mode"], []).append(t)
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE, f"trial {t.number} ({t.params}) is {t.state}: {t.user_attrs.get('fail_reason')}"
    assert by_mode.get("raise") and by_mode.get("nan"), f"enqueued failing points did not run: {sorted(by_mode)}"
    for t in by_mode["raise"]:
        assert t.state == optuna.trial.TrialState.FAIL and "injected failure" in t.user_attrs["fail_reason"], t.user_attrs
    for t in by_mode["nan"]:
        assert t.state == optuna.trial.TrialState.FAIL and "loss became nan" in t.user_attrs["fail_reason"], t.user_attrs
    for t in by_mode.get("ok", []):
        assert t.state == optuna.trial.TrialState.COMPLETE, f"flaky ok trial {t.number} failed"


def test_progress_is_reported(finished_study):
    cfg, _, lines = finished_study
    progress = [l for l in lines if l.startswith("[")]
    assert len(progress) == cfg.budget.trials, f"expected one progress line per trial: {progress}"
    assert progress[-1].startswith(f"[{cfg.budget.trials}/{cfg.budget.trials}]") and "front" in progress[-1], progress[-1]
    assert any("FAILED" in l for l in progress), "failures are not shown in progress"


def test_checkpoint_reloads_and_reproduces_accuracy(finished_study, digits):
    cfg, study, _ = finished_study
    t = max((t for t in study.best_trials), key=lambda t: t.values[0])
    from automl._artifact import load_artifact

    model = load_artifact(cfg.study_dir / t.user_attrs["checkpoint"], runtime="onnxruntime")  # the measured file
    with torch.no_grad():
        acc = (model(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
    assert acc == pytest.approx(t.values[0], abs=1e-6), f"reloaded accuracy {acc} != recorded {t.values[0]}"


def test_show_and_list(finished_study):
    cfg, _, _ = finished_study
    runner = CliRunner()
    shown = runner.invoke(app, ["show", str(cfg.study_dir)])
    assert shown.exit_code == 0, shown.output
    assert "Pareto front" in shown.output and "failed trial" in shown.output, shown.output
    listed = runner.invoke(app, ["list", "--runs", str(cfg.study_dir.parent)])
    assert listed.exit_code == 0 and "e2e" in listed.output, listed.output
    missing = runner.invoke(app, ["show", "no-such-study", "--runs", str(cfg.study_dir.parent)])
    assert missing.exit_code == 2 and "not found" in missing.output, missing.output


def test_resume_adds_to_the_budget_without_duplicates(finished_study):
    cfg, _, _ = finished_study
    before = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).get_trials()
    study = run_search(cfg, trials=cfg.budget.trials + 2, log=lambda _: None)
    after = study.get_trials()
    assert len(after) == len(before) + 2, f"{len(before)} -> {len(after)} trials, expected +2"
    assert [t.params for t in after[: len(before)]] == [t.params for t in before], "resume changed earlier trials"
    flaky_raise = [t for t in after if t.params.get("flaky.mode") == "raise" and t.params.get("method") == "flaky"]
    assert len(flaky_raise) >= 1 and after[0].number == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optuna_dashboard_serves_the_study(finished_study):
    cfg, _, _ = finished_study
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("optuna-dashboard")), cfg.storage_url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # The event is the server answering (it prints "Listening" before it binds, so its output
        # cannot tell); the deadline is only a safety net against a hang and fails saying so.
        deadline = time.monotonic() + 600
        body = None
        while body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=60) as r:
                    body = json.loads(r.read())
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"optuna-dashboard exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("optuna-dashboard did not answer within the 600 s safety net")
                time.sleep(0.2)
        names = [s["study_name"] for s in body["study_summaries"]]
        assert cfg.name in names, f"dashboard lists {names}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_default_study_front_is_optunas_best_trials_and_resume_keeps_its_numbers(tmp_path):
    """The default study (studies/digits.yaml, fewer trials): ``automl show`` prints exactly
    ``optuna.load_study(...).best_trials`` with their values, and resuming the finished study
    changes no number."""
    root = Path(__file__).resolve().parents[2]
    runner = CliRunner()
    out = tmp_path / "runs"
    launched = subprocess.run(
        [str(Path(sys.executable).with_name("automl")), "launch", str(root / "studies" / "digits.yaml"), "--trials", "8", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=1500,
    )
    assert launched.returncode == 0, f"default study failed: {launched.stderr[-3000:]}"
    cfg = parse_config({**yaml.safe_load((out / "digits" / "config.yaml").read_text())})
    study = optuna.load_study(study_name="digits", storage=cfg.storage_url)
    assert study.metric_names == ["accuracy", "size_bytes", "latency_ms"], f"metric names for optuna-dashboard: {study.metric_names}"
    best = {t.number: t.values for t in study.best_trials}
    shown = runner.invoke(app, ["show", str(out / "digits"), "--json"])
    assert shown.exit_code == 0, shown.output
    plans = json.loads(shown.output)
    # One row per plan: its repeats (same numbers, same plan) are listed in its "trials".
    listed = sorted(n for r in plans for n in r["trials"])
    assert listed == sorted(best), f"automl show lists trials {listed} != best_trials {sorted(best)}"
    rows = {r["trial"]: [r["accuracy"], r["size_bytes"], r["latency_ms"]] for r in plans}
    assert all(rows[n] == best[n] for n in rows), f"automl show {rows} != best_trials {best}"

    before = {t.number: (t.values, dict(t.user_attrs)) for t in study.get_trials()}
    resumed = runner.invoke(app, ["resume", str(out / "digits")])
    assert resumed.exit_code == 0, resumed.output
    after = {t.number: (t.values, dict(t.user_attrs)) for t in optuna.load_study(study_name="digits", storage=cfg.storage_url).get_trials()}
    assert after == before, "resuming a finished study must not change any trial's numbers"


def test_the_base_is_initialised_from_the_configs_seed_whatever_ran_before(digits):
    """One config gives one base: its initial weights follow ``seed``, not the generator's state."""
    from automl._study import _build_base

    def weights(seed: int) -> list[torch.Tensor]:
        cfg = parse_config({"name": "seeded", "dataset": {"name": "digits"}, "base": {"model": "digits_cnn"}, "seed": seed})
        torch.rand(int(torch.randint(1, 100, ()).item()))  # the generator in some other state each time
        return list(_build_base(cfg, digits).state_dict().values())

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "the same seed must give the same initial base"
    assert not all(torch.equal(a, b) for a, b in zip(first, other)), "another seed must give another initial base"
