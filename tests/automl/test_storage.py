"""The embedded SQLite storage under concurrent writers: "database is locked" never reaches users."""

from __future__ import annotations

import multiprocessing as mp

import optuna

from automl._study import open_storage
from tests.automl.test_cluster import postgres  # noqa: F401 - the throwaway PostgreSQL server fixture


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
