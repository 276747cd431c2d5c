"""The study storage: concurrent SQLite writers, the PostgreSQL URL as typed, database outages and the journal."""

from __future__ import annotations

import multiprocessing as mp
import time

import optuna
import pytest

from automl._study import open_storage
from tests.automl.test_cluster import pg_server, postgres  # noqa: F401 - the throwaway PostgreSQL server fixtures


def _hammer(url: str, n: int, errors) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.load_study(study_name="busy", storage=open_storage(url))
        for i in range(n):
            t = study.ask()
            t.set_user_attr("heartbeat", float(i))
            study.tell(t, t.suggest_float("x", 0, 1))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which asserts none happened
        errors.put(f"{type(exc).__name__}: {exc}")


def test_concurrent_sqlite_writers_do_not_fail(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="busy", storage=open_storage(url))
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(url, 10, errors)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, f"writers failed: {found[:3]}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"
    n = len(optuna.load_study(study_name="busy", storage=open_storage(url)).trials)
    assert n == 30, f"expected 30 trials from 3 writers x 10, got {n}"


def test_postgresql_url_as_the_user_typed_it(postgres, tmp_path):
    """The plain postgresql:// URL opens the study here, in plain Optuna and in optuna-dashboard's
    storage loader: no driver suffix, no rewrite (SQLAlchemy 2.1 maps it to psycopg 3)."""
    from optuna_dashboard._storage_url import get_storage  # what optuna-dashboard URL arguments go through

    assert postgres.startswith("postgresql://") and "+" not in postgres.split("://")[0], postgres
    study = optuna.create_study(study_name="typed", storage=open_storage(postgres), directions=["maximize"])
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    plain = optuna.load_study(study_name="typed", storage=postgres)
    assert [t.value for t in plain.trials] == [t.value for t in study.trials], "plain Optuna read other values"
    dashboard = get_storage(postgres)
    assert len(dashboard.get_all_trials(dashboard.get_study_id_from_name("typed"))) == 3, "the dashboard's storage saw no trials"


def test_storage_waits_for_a_restarted_database(pg_server):
    """A call made while PostgreSQL is down waits and completes once it is back, saying so once;
    with a window shorter than the outage it raises StorageUnavailable (one line) instead."""
    import threading

    from automl._storage import StorageUnavailable

    lines: list[str] = []
    storage = open_storage(pg_server.url, retry_s=120, log=lines.append)
    study = optuna.create_study(study_name="waits", storage=storage, directions=["maximize"])
    impatient = optuna.load_study(study_name="waits", storage=open_storage(pg_server.url, retry_s=1, log=lines.append))
    pg_server.stop()
    done: list[object] = []
    try:
        start = time.monotonic()
        with pytest.raises(StorageUnavailable, match=r"did not answer for 1s \(storage_retry_s\)"):
            impatient.ask()
        assert time.monotonic() - start < 30, "a 1 s window must give up within seconds"

        def finish() -> None:
            trial = study.ask()
            done.append(study.tell(trial, trial.suggest_float("x", 0, 1)))

        worker = threading.Thread(target=finish)
        worker.start()
        time.sleep(2.0)
        assert worker.is_alive() and not done, "the call must wait for the database, not fail"
    finally:
        pg_server.start()
    worker.join(timeout=120)
    assert done and done[0].state == optuna.trial.TrialState.COMPLETE, f"the trial was not told: {done}"
    assert len(optuna.load_study(study_name="waits", storage=pg_server.url).trials) == 1, "the trial must be stored once"
    waiting = [ln for ln in lines if "waiting for the database" in ln]
    assert len(waiting) <= 2 and any("answers again" in ln for ln in lines), f"one waiting line per storage and outage, and one when back: {lines}"
    assert all(str(pg_server.port) in ln for ln in waiting), f"the line names the database: {waiting}"


def test_journal_replay_records_each_finished_trial_once(tmp_path):
    """The journal's records land once: a RUNNING trial is finished with its record, one whose
    write had reached the database is left alone, one another launcher closed as interrupted gets
    its record as a new trial; replaying the same journal again adds nothing."""
    from optuna.trial import TrialState

    from automl._records import write_trial
    from automl._recovery import JOURNAL, JOURNAL_OF, journal_record, replay_journal

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"), study_name="j", directions=["maximize"])
    trials = []
    for _ in range(3):
        t = study.ask()
        t.suggest_float("x", 0, 1)
        trials.append(t)
    record = lambda acc, n: {"state": "COMPLETE", "objectives": ["accuracy"], "metrics": {"accuracy": acc}, "checkpoint": f"checkpoints/trial_{n:05d}", "attrs": {"method": "none"}}  # noqa: E731
    entries = [{"number": t.number, **record(0.5 + t.number / 10, t.number)} for t in trials]
    # Trial 1's write reached the database before its connection broke; trial 2 was closed by another launcher.
    one = entries[1]
    stored = write_trial(study, trials[1], state=TrialState.COMPLETE, objectives=one["objectives"], metrics=one["metrics"], checkpoint=one["checkpoint"], attrs=one["attrs"])
    again = write_trial(study, trials[1], state=TrialState.COMPLETE, objectives=one["objectives"], metrics=one["metrics"], checkpoint=one["checkpoint"], attrs=one["attrs"])
    assert again.number == stored.number and again.values == stored.values, "writing the same record twice returns the stored trial"
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        write_trial(study, trials[1], state=TrialState.COMPLETE, objectives=["accuracy"], metrics={"accuracy": 0.1}, checkpoint=one["checkpoint"], attrs=one["attrs"])
    write_trial(study, trials[2], state=TrialState.FAIL, attrs={"interrupted": True, "fail_reason": "interrupted: closed by another launcher"})
    for e in entries:
        journal_record(tmp_path, e)

    assert replay_journal(study, tmp_path, log=lambda _m: None) == [0, 1, 2]
    assert not (tmp_path / JOURNAL).exists(), "a replayed journal is removed"
    for e in entries:  # a second replay (say, a launcher killed before it removed the journal)
        journal_record(tmp_path, e)
    replay_journal(study, tmp_path, log=lambda _m: None)
    complete = {t.number: t for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(complete) == 3, f"three records, each once: {[(t.number, t.state.name, t.user_attrs) for t in study.trials]}"
    assert complete[0].values == [0.5] and complete[1].values == [0.6], f"{complete}"
    (copy,) = [t for t in complete.values() if t.user_attrs.get(JOURNAL_OF) == 2]
    assert copy.values == [0.7] and copy.params == trials[2].params and copy.user_attrs["checkpoint"] == "checkpoints/trial_00002"
