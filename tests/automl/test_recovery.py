"""Crash recovery and trial faults: closing interrupted trials, budgets, time limits, retries.

The fast tests drive :mod:`automl._recovery` against a real SQLite Optuna storage; the slow one kills
a real launcher process (``automl launch``) with SIGKILL at random moments and resumes it.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from automl import _recovery
from automl._recovery import TrialTimeLimit, close_interrupted, finished_count, guarded, is_stale, remove_orphan_checkpoints

ROOT = Path(__file__).resolve().parents[2]


def _study(tmp_path: Path) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s", directions=["maximize"])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- closing interrupted trials --------------------------------------------------------------


def test_trial_of_dead_launcher_is_closed_and_requeued_once(tmp_path):
    study = _study(tmp_path)
    dead = study.ask()
    dead.suggest_float("x", 0, 1)
    dead.set_user_attr("launcher", {"host": _recovery.LAUNCHER["host"], "pid": _dead_pid(), "id": "gone"})
    dead.set_user_attr("heartbeat", time.time())
    alive = study.ask()
    alive.suggest_float("x", 0, 1)
    # A live launcher on this host (our parent process) with a fresh heartbeat: must be left alone.
    alive.set_user_attr("launcher", {"host": _recovery.LAUNCHER["host"], "pid": os.getppid(), "id": "other"})
    alive.set_user_attr("heartbeat", time.time())

    closed = close_interrupted(study, log=lambda m: None)
    assert closed == [dead.number], f"expected only the dead launcher's trial {dead.number} closed, got {closed}"
    again = close_interrupted(study, log=lambda m: None)
    assert again == [], f"a second pass must close nothing, closed {again}"

    trials = study.get_trials(deepcopy=False)
    t_dead = trials[dead.number]
    assert t_dead.state == TrialState.FAIL and t_dead.user_attrs.get("interrupted") is True, f"dead trial is {t_dead.state} {t_dead.user_attrs}"
    assert "interrupted" in t_dead.user_attrs.get("fail_reason", ""), f"reason missing: {t_dead.user_attrs}"
    assert trials[alive.number].state == TrialState.RUNNING, f"the live launcher's trial became {trials[alive.number].state}"
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == 1, f"expected one re-queued trial, got {len(waiting)}"
    fixed = waiting[0].system_attrs.get("fixed_params")
    assert fixed == t_dead.params and waiting[0].user_attrs.get("requeue_of") == dead.number, (
        f"re-queued {fixed} {waiting[0].user_attrs} differs from {t_dead.params}"
    )
    # The re-queued point is what the next ask evaluates.
    nxt = study.ask()
    assert nxt.suggest_float("x", 0, 1) == t_dead.params["x"], "ask did not pop the re-queued parameters"


def test_trial_without_owner_of_a_dead_launcher_is_closed_at_once(tmp_path, monkeypatch):
    """A launcher SIGKILLed between Optuna's ask and writing its owner attr leaves an owner-less
    RUNNING trial. The next launcher closes it at once when every other launcher registered on the
    study ran on this host and is dead, and leaves it alone while another registered launcher lives."""
    study = _study(tmp_path)
    study.set_user_attr("launcher.gone", {"host": _recovery.LAUNCHER["host"], "pid": _dead_pid(), "id": "gone"})
    orphan = study.ask()
    orphan.suggest_float("x", 0, 1)
    time.sleep(0.05)
    monkeypatch.setattr(_recovery, "_STARTED", [])
    _recovery.register_launcher(study)
    assert f"launcher.{_recovery.LAUNCHER['id']}" in study.user_attrs, "register_launcher must record this launcher on the study"

    study.set_user_attr("launcher.alive", {"host": _recovery.LAUNCHER["host"], "pid": os.getppid(), "id": "alive"})
    assert close_interrupted(study, log=lambda m: None) == [], "another live launcher may still own it: wait for the grace period"
    study.set_user_attr("launcher.alive", {"host": _recovery.LAUNCHER["host"], "pid": _dead_pid(), "id": "alive"})
    assert close_interrupted(study, log=lambda m: None) == [orphan.number], "every other launcher is dead: close it now"
    # A trial this launcher asks for itself, before its owner attr is written, is never taken for an orphan.
    mine = study.ask()
    mine.suggest_float("x", 0, 1)
    assert close_interrupted(study, log=lambda m: None) == [], "this launcher's own fresh trial must be left alone"


def test_stale_heartbeat_on_another_host(tmp_path):
    study = _study(tmp_path)
    t = study.ask()
    t.set_user_attr("launcher", {"host": "elsewhere", "pid": 1, "id": "x"})
    t.set_user_attr("heartbeat", time.time())
    frozen = study.get_trials(deepcopy=False)[0]
    assert not is_stale(frozen), "a fresh heartbeat from another host must not count as stale"
    assert is_stale(frozen, now=time.time() + _recovery.GRACE_S + 1), "a heartbeat older than GRACE_S must count as stale"


def test_budget_ignores_interrupted_and_orphan_checkpoints_go(tmp_path):
    study = _study(tmp_path)
    done = study.ask()
    study.tell(done, 1.0)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    interrupted = study.ask()
    interrupted.set_user_attr("interrupted", True)
    study.tell(interrupted, state=TrialState.FAIL)
    assert finished_count(study) == 2, f"COMPLETE + genuine FAIL = 2, got {finished_count(study)}"
    ck = tmp_path / "checkpoints"
    for n in (done.number, interrupted.number):
        (ck / f"trial_{n:05d}").mkdir(parents=True)
    (ck / "trial_00009.partial").mkdir()
    removed = sorted(remove_orphan_checkpoints(study, tmp_path))
    assert removed == sorted([f"trial_{interrupted.number:05d}", "trial_00009.partial"]), f"removed {removed}"
    assert (ck / f"trial_{done.number:05d}").is_dir(), "the COMPLETE trial's checkpoint was removed"


def test_heartbeat_beats_running_trials_and_sweeps(tmp_path):
    study = _study(tmp_path)
    t = study.ask()
    swept = []
    with _recovery.Heartbeat(study._storage, lambda: [t._trial_id], interval=0.05, sweep=lambda: swept.append(1)):
        deadline = time.monotonic() + 10
        while not swept and time.monotonic() < deadline:
            time.sleep(0.05)
    beat = study.get_trials(deepcopy=False)[0].user_attrs.get("heartbeat")
    assert beat is not None and time.time() - beat < 60, f"no fresh heartbeat recorded: {beat}"
    assert swept, "the sweep never ran"


# --- trial faults ------------------------------------------------------------------------------


def test_guarded_raise_records_reason():
    def boom():
        raise ValueError("bad rank")

    value, reason, attempts = guarded(boom, retries=2)
    assert value is None and reason == "ValueError: bad rank" and attempts == 3, f"got {(value, reason, attempts)}"


def test_guarded_nan_loss_is_a_recorded_failure(digits):
    import torch

    from automl._train import TrainOptions, fit

    class NaNNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)) * float("nan")

    value, reason, attempts = guarded(lambda: fit(NaNNet(), digits, TrainOptions(epochs=1)), retries=0)
    assert value is None and reason and "TrialFailed" in reason, f"got {(value, reason, attempts)}"


def test_guarded_retry_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise MemoryError("out of memory")
        return 7

    assert guarded(flaky, retries=1) == (7, None, 2), f"calls {len(calls)}"


def test_guarded_time_limit_interrupts_a_python_loop():
    def forever():
        while True:
            sum(range(1000))

    start = time.perf_counter()
    value, reason, attempts = guarded(forever, time_limit_s=0.3, retries=3)
    took = time.perf_counter() - start
    assert value is None and reason and reason.startswith("TrialTimeLimit"), f"reason {reason!r}"
    assert attempts == 1, f"a time-limit overrun must not be retried, attempts {attempts}"
    assert took < 5, f"the limit of 0.3 s took {took:.1f}s to act"


def test_guarded_time_limit_does_not_fire_after_success():
    value, reason, _ = guarded(lambda: 3, time_limit_s=0.05)
    time.sleep(0.2)  # a stray async exception would surface here
    assert (value, reason) == (3, None), f"got {(value, reason)}"
    assert issubclass(TrialTimeLimit, Exception)


# --- SIGKILL the launcher, resume, repeat ----------------------------------------------------


def _config(tmp_path: Path, trials: int) -> Path:
    cfg = {
        "name": "crashy",
        "dataset": {"name": "digits"},
        "base": {"model": "digits_cnn", "epochs": 2},
        "methods": {"none": {}, "tucker": {}},
        "budget": {"trials": trials, "epochs": 1},
        "resources": {"cpus": 1},
        "latency": {"warmup": 2, "repeats": 5, "drift_check": False},
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "crashy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str], tmp_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AUTOML_LATENCY_LOCK": str(tmp_path / "latency.lock")}
    # Own session: Ray processes started by this launcher's ray.init can be stopped by group id.
    return subprocess.Popen(
        [sys.executable, "-c", "from automl._cli import main; main()", *args],
        cwd=tmp_path, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _launch_to_end(cfg_path: Path, tmp_path: Path) -> tuple[int, str]:
    """Run ``automl launch`` to its end; return its exit code and everything it printed."""
    log = tmp_path / "launcher.log"
    proc = _run(["launch", str(cfg_path)], tmp_path, log)
    try:
        rc = proc.wait(timeout=600)
    finally:
        _kill_group(proc)
    return rc, log.read_text()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(log: Path, offset: int, needle: str, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Wait until ``needle`` appears in the log after ``offset`` (False if the launcher exited first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if needle in log.read_text()[offset:]:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} did not appear in {timeout}s; log tail:\n{log.read_text()[-2000:]}")


@pytest.mark.slow
def test_sigkill_launcher_five_times_then_finish(tmp_path):
    """SIGKILL at random moments of five phases: start-up, right after the search starts (trials
    running), and just after a trial finished (its result in flight between Tune, Optuna and the
    checkpoint folder)."""
    budget = 8
    cfg = _config(tmp_path, budget)
    study_dir = tmp_path / "runs" / "crashy"
    log = tmp_path / "launcher.log"
    log.touch()
    rng = random.Random(7)
    phases = ["startup", "search", "result", "search", "result"]
    kills = 0
    for i, phase in enumerate(phases):
        offset = len(log.read_text())
        proc = _run(["launch", str(cfg)] if i == 0 else ["resume", str(study_dir)], tmp_path, log)
        try:
            if phase == "startup":
                reached = _wait_for(log, offset, "base:", proc)
                delay = rng.uniform(0.0, 3.0)
            elif phase == "search":
                reached = _wait_for(log, offset, "search:", proc)
                delay = rng.uniform(0.5, 6.0)
            else:
                reached = _wait_for(log, offset, "] trial ", proc)
                delay = rng.uniform(0.0, 0.3)
            if reached:
                time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # the launcher itself, nothing else
                proc.wait()
                kills += 1
        finally:
            _kill_group(proc)  # then the local Ray it started (its own session, by group id)
    final = _run(["resume", str(study_dir)], tmp_path, log)
    try:
        rc = final.wait(timeout=600)
    finally:
        _kill_group(final)
    text = log.read_text()
    assert rc == 0, f"final resume exited {rc}; log tail:\n{text[-3000:]}"
    assert kills == 5, f"only {kills} of 5 kills happened (the study finished early); log tail:\n{text[-3000:]}"

    study = optuna.load_study(study_name="crashy", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete = by_state[TrialState.COMPLETE]
    genuine_fail = [t for t in by_state[TrialState.FAIL] if not t.user_attrs.get("interrupted")]
    left = [(t.number, t.datetime_start, dict(t.user_attrs)) for t in by_state[TrialState.RUNNING]]
    assert not left, f"trials left RUNNING: {left}; launchers {study.user_attrs}; log tail:\n{text[-3000:]}"
    assert not by_state[TrialState.WAITING], f"re-queued trials never run: {[t.number for t in by_state[TrialState.WAITING]]}"
    assert not genuine_fail, f"unexpected failures: {[(t.number, t.user_attrs.get('fail_reason')) for t in genuine_fail]}"
    assert len(complete) == budget, f"expected exactly {budget} COMPLETE trials, got {len(complete)}"

    # No duplicate: a re-queued trial only ever repeats an interrupted one, never a completed one.
    numbers = {t.number: t for t in trials}
    for t in complete:
        src = t.user_attrs.get("requeue_of")
        if src is not None:
            assert numbers[src].state == TrialState.FAIL and numbers[src].user_attrs.get("interrupted"), (
                f"trial {t.number} repeats trial {src} which is {numbers[src].state}, not an interrupted one"
            )
    # No loss: every COMPLETE trial has its checkpoint with the same accuracy; no other checkpoint.
    folders = sorted(p.name for p in (study_dir / "checkpoints").iterdir())
    # A repeat of a finished plan (duplicate_of) is not trained again: it points at the first's checkpoint.
    trained = [t for t in complete if "duplicate_of" not in t.user_attrs]
    assert folders == sorted(f"trial_{t.number:05d}" for t in trained), f"checkpoints {folders} vs trained complete {[t.number for t in trained]}"
    for t in complete:
        if "duplicate_of" in t.user_attrs:
            assert t.user_attrs["checkpoint"] == f"checkpoints/trial_{t.user_attrs['duplicate_of']:05d}", f"trial {t.number}: {t.user_attrs}"
    for t in complete:
        record = json.loads((study_dir / t.user_attrs["checkpoint"] / "trial.json").read_text())
        assert math.isclose(record["metrics"]["accuracy"], t.values[0]), f"trial {t.number}: checkpoint accuracy {record['metrics']['accuracy']} != {t.values[0]}"
    interrupted = [t.number for t in by_state[TrialState.FAIL]]
    assert interrupted, "no kill landed while a trial ran: the test did not exercise recovery"
    print(f"kills={kills} interrupted trials={interrupted} complete={[t.number for t in complete]}")


# --- Ctrl-C ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    cfg = _config(tmp_path, 6)
    log = tmp_path / "launcher.log"
    log.touch()
    proc = _run(["launch", str(cfg)], tmp_path, log)
    try:
        assert _wait_for(log, 0, "search:", proc), f"the search never started:\n{log.read_text()[-2000:]}"
        time.sleep(2.0)  # trials are running
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        _kill_group(proc)
    text = log.read_text()
    study_dir = tmp_path / "runs" / "crashy"
    assert rc == 130, f"Ctrl-C should exit 130, got {rc}:\n{text[-2000:]}"
    assert f"automl resume {study_dir}" in text, f"no resume hint in:\n{text[-2000:]}"
    assert "Traceback" not in text, f"traceback after Ctrl-C:\n{text[-3000:]}"
    study = optuna.load_study(study_name="crashy", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    assert not running, f"Ctrl-C left trials RUNNING: {running}"
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        assert t.user_attrs.get("interrupted"), f"trial {t.number} failed for another reason: {t.user_attrs.get('fail_reason')}"


@pytest.mark.slow
def test_time_limit_through_ray_records_fail_and_the_study_goes_on(tmp_path):
    cfg_path = _config(tmp_path, 2)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["budget"].update(trial_time_limit_s=0.2, retries=1, epochs=3)
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc, text = _launch_to_end(cfg_path, tmp_path)
    assert rc == 0, f"a study whose trials all fail must still finish (exit 0), got {rc}:\n{text[-2000:]}"
    study_dir = tmp_path / "runs" / "crashy"
    study = optuna.load_study(study_name="crashy", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2, f"budget 2, got {len(trials)} trials"
    for t in trials:
        reason = t.user_attrs.get("fail_reason", "")
        assert t.state == TrialState.FAIL and reason.startswith("TrialTimeLimit"), f"trial {t.number}: {t.state} {reason!r}"
        assert t.user_attrs.get("attempts") == 1, f"time limits are not retried: {t.user_attrs}"
    assert "TrialTimeLimit" in text, f"the failure reason is not shown to the user:\n{text[-2000:]}"


@pytest.mark.slow
def test_worker_killed_like_oom_is_retried_then_fail_with_rays_reason(tmp_path):
    cfg_path = _config(tmp_path, 1)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["base"] = {"model": "tests.automl.crash_model:build", "epochs": 1}
    cfg["methods"] = {"none": {}}
    cfg["budget"]["retries"] = 1
    cfg_path.write_text(yaml.safe_dump(cfg))
    rc, text = _launch_to_end(cfg_path, tmp_path)
    assert rc == 0, f"the study must go on after a dead worker (exit 0), got {rc}:\n{text[-3000:]}"
    study = optuna.load_study(study_name="crashy", storage=f"sqlite:///{tmp_path / 'runs' / 'crashy' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL], f"want one FAIL trial, got {[(t.number, t.state.name) for t in trials]}"
    reason = trials[0].user_attrs.get("fail_reason", "")
    assert reason.startswith("the Ray worker running this trial failed"), f"reason {reason!r}"
    print(f"reason: {reason}")
