"""The embedded SQLite storage under concurrent writers: "database is locked" never reaches users."""

from __future__ import annotations

import multiprocessing as mp

import optuna

from automl._study import open_storage


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
