"""The run loop: prepare the study, run Ray Tune until the budget is spent, check latency drift."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import optuna

from automl._cluster import full_folder, start_sink, trial_slots
from automl._config import StudyConfig
from automl._plugins import import_plugins
from automl._prescreen import Screen
from automl._records import CHECKPOINT, EPOCH, VAL_ACCURACY
from automl._recovery import JOURNAL, Heartbeat, close_interrupted, finished_count, register_launcher, remove_orphan_checkpoints, replay_journal
from automl._storage import StorageUnavailable
from automl._study import Payload, StudyError, StudyHalted, init_ray, make_sampler, open_storage, prepare_study
from automl._threads import ThreadPlan, set_threads, training_threads
from automl._tune import trial_function

__all__ = ["NodeScreen", "check_drift", "make_scheduler", "run_search"]

#: A front trial whose latency re-timed alone differs from its trial value by more than this moved.
DRIFT_WARN = 0.10


def run_search(
    cfg: StudyConfig,
    *,
    trials: int | None = None,
    log: Callable[[str], None] = print,
) -> optuna.Study:
    """Run (or continue) the study until it holds ``budget.trials`` finished trials.

    Finished (COMPLETE or FAIL) trials already in the storage count toward the budget, so
    ``resume`` calls this again with the same config. Trials left RUNNING by a launcher that died are
    closed as FAIL "interrupted" and their parameters re-queued; they do not count toward the budget
    (see :mod:`automl._recovery`). Ctrl-C closes this launcher's running trials the same way and
    raises ``KeyboardInterrupt``.
    """
    # A local single-user Ray needs no auth token and no dashboard; Tune's own table is replaced by
    # our one-line progress (StudyCallback).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C raises KeyboardInterrupt here at once (Tune would otherwise save a Tune state we never
    # restore: Optuna is the record); run_search closes and re-queues the running trials.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    import ray
    from ray import tune

    if cfg.latency.node:
        # Before anything is trained or written: the base, the dry runs and every trial are timed there.
        from automl._target import TargetError, require_node

        init_ray(cfg)
        try:
            require_node(cfg.latency.node)
        except TargetError as exc:
            raise StudyError(str(exc)) from exc

    from automl._searcher import DiskFull, HaltStopper, StudySearcher, make_callback, record_variants

    study_dir, payload, space = prepare_study(cfg, log=log)
    storage = open_storage(cfg.storage_url, retry_s=cfg.storage_retry_s, log=log)
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    register_launcher(study)
    objectives = [o.metric for o in cfg.objectives]
    # Before closing interrupted trials: a journaled trial finished, it must not be re-queued.
    replay_journal(
        study, study_dir, log=log,
        variants=lambda parent, points: record_variants(study, parent, points, space=space, objectives=objectives, bounds=cfg.constraints),
    )
    close_interrupted(study, log=log)
    removed = remove_orphan_checkpoints(study, study_dir)
    if removed:
        log(f"recovered: removed checkpoints of trials that did not complete: {removed}")
    finished = finished_count(study)
    for point in cfg.enqueue:  # skip_if_exists: a resumed study does not evaluate them twice
        study.enqueue_trial(dict(point), skip_if_exists=True)
    budget = trials if trials is not None else cfg.budget.trials
    remaining = budget - finished
    if remaining <= 0:
        # Nothing runs, so nothing is measured: a finished study keeps its numbers.
        log(f"study {cfg.name!r} already holds {finished} finished trials (budget {budget})")
        return study

    init_ray(cfg)
    resources = ray.cluster_resources()
    for line in ThreadPlan.from_config(cfg).warnings(resources.get("CPU", 0)):
        log(line)
    slots = trial_slots(cfg, resources)
    if cfg.resources.gpus > 0 and slots == 0:
        raise StudyError(f"resources.gpus: {cfg.resources.gpus} per trial requested, but the Ray cluster has {resources.get('GPU', 0)} GPUs")
    concurrent = max(1, min(slots, remaining))
    metrics = [o.metric for o in cfg.objectives]
    searcher = StudySearcher(
        space=space,
        metric=metrics,
        mode=["max" if o.resolved_direction == "maximize" else "min" for o in cfg.objectives],
        sampler=make_sampler(cfg, offset=len(study.get_trials(deepcopy=False))),
        study_name=cfg.name,
        storage=storage,
        budget=budget,
        screen=NodeScreen(
            Screen(base=payload.base, data=payload.data, settings=payload.settings, methods=payload.methods, constraints=cfg.constraints, profile=payload.profile),
            plugins=payload.plugins,
            threads=payload.cpus,
        ),
    )
    scheduler = make_scheduler(cfg)
    searcher.scheduler = scheduler
    searcher.journal = study_dir
    payload.report_epochs = scheduler is not None
    payload.sink = start_sink(study_dir)
    from ray.util.queue import Queue

    # Long trials' per-epoch progress reaches the launcher through this queue (automl._progress).
    payload.progress = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    trainable = tune.with_resources(
        tune.with_parameters(trial_function, payload=payload),
        {"cpu": cfg.resources.cpus, "gpu": cfg.resources.gpus},
    )
    log(f"search: {remaining} trials, {concurrent} at a time, methods {sorted(space.methods)}, storage {cfg.storage_url}")
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            # As many as the searcher gives: it stops at the budget, and a trial whose node died
            # is re-queued and takes one more sample.
            num_samples=-1,
            max_concurrent_trials=concurrent,
            time_budget_s=cfg.budget.time_limit_s,
            reuse_actors=True,
            trial_dirname_creator=lambda t: f"trial_{t.config.get('optuna_trial_number', t.trial_id)}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=f"search_{int(time.time())}",
            storage_path=str((study_dir / "ray").resolve()),
            callbacks=[make_callback(cfg, remaining, log, searcher, payload.progress)],
            verbose=0,
            stop=HaltStopper(searcher),
            # A trial whose worker died is started again (same config, same Optuna trial) this often.
            failure_config=tune.FailureConfig(max_failures=cfg.budget.retries),
        ),
    )
    try:
        sweep = lambda: close_interrupted(optuna.load_study(study_name=cfg.name, storage=storage), log=log)  # noqa: E731
        with Heartbeat(storage, searcher.running_trial_ids, sweep=sweep):
            _fit_interruptibly(tuner)
    except KeyboardInterrupt:
        closed = searcher.close_running("interrupted: stopped with Ctrl-C; its parameters were re-queued")
        if closed:
            log(f"interrupted: trials {closed} closed as FAIL (interrupted) and re-queued")
        raise
    except Exception as exc:
        if _ray_oom(exc):
            # Ray's out-of-memory killer stopped a trial's actor task in a way Ray Tune does not
            # survive: the running trials are closed and re-queued, as after Ctrl-C.
            closed = searcher.close_running("interrupted: Ray's out-of-memory killer stopped the search; its parameters were re-queued")
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise StudyHalted(
                f"the search stopped: {first}; trials {closed} were closed and re-queued; with memory free on the node, "
                f"continue with `automl resume {study_dir}`"
            ) from exc
        folder = full_folder(exc)  # Ray Tune's own files (results, experiment state) found no room
        if folder is None:
            raise
        searcher.halt = DiskFull(folder, None)
    _halt(searcher, study_dir, log)
    # Tune ends at budget.time_limit_s by stopping the running trials without telling the searcher:
    # close them as interrupted (not counted) and re-queue them, as after Ctrl-C, so none stays
    # RUNNING and `automl resume` runs them.
    closed = searcher.close_running("interrupted: the search's time limit (budget.time_limit_s) stopped it; its parameters were re-queued")
    if closed:
        log(f"time limit: trials {closed} were still running, closed as FAIL (interrupted) and re-queued")
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    if cfg.latency.drift_check and "latency_ms" in [o.metric for o in cfg.objectives]:
        check_drift(study, study_dir, payload, log=log)
    return study


def _ray_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is (or was raised from, or reports) Ray's out-of-memory killer ending a task."""
    import ray

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ray.exceptions.OutOfMemoryError) or "killed due to the node running low on memory" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _halt(searcher: Any, study_dir: Path, log: Callable[[str], None]) -> None:
    """Raise :class:`StudyHalted` with one line when the searcher halted the search (a full disk,
    a database that did not come back within ``storage_retry_s``); the running trials are closed
    as interrupted and re-queued where the database answers."""
    from automl._searcher import DiskFull

    halt = searcher.halt
    if halt is None:
        return
    if isinstance(halt, DiskFull):
        closed = searcher.close_running("interrupted: the study stopped, a disk is full; its parameters were re-queued")
        if closed:
            log(f"disk full: trials {closed} were still running, closed as FAIL (interrupted) and re-queued")
        raise StudyHalted(f"disk full: {halt}; free space there, then continue with `automl resume {study_dir}`")
    journal = study_dir / JOURNAL
    kept = f"; the finished trials it did not take are kept in {journal}" if journal.is_file() else ""
    raise StudyHalted(f"{halt}{kept}; once the database is back, continue with `automl resume {study_dir}`")


class _ScreenWorker:
    """The body of :class:`NodeScreen`'s actor: a trial worker's setup, then the screen's checks."""

    def __init__(self, screen: Screen, plugins: tuple[str, ...], threads: float) -> None:
        import_plugins(plugins)  # user methods register themselves on import, as in a trial
        set_threads(training_threads(threads))
        self.screen = screen

    def check(self, plan: Any, finished: dict[str, int]) -> Any:
        return self.screen.check(plan, finished)


class NodeScreen:
    """A :class:`~automl._prescreen.Screen` whose dry runs run in a Ray actor on the launcher's node.

    The dry run builds and times each plan's artifact. Timed in the launcher process, beside Tune's
    event loop, the heartbeat thread and Ray's driver threads, its latency was noisy (the
    unchanged base read 0.015-0.094 ms there against 0.015-0.018 ms in its trials), and
    latency constraints and MO-ASHA then acted on wrong costs. The actor is a Ray worker process like
    the trials' (same thread count, same user plugins, the same node lock), so a dry run's latency is
    timed the way a trial times its own. It asks for no CPU: the lock, not Ray's resources, keeps it
    from running beside a timing, and a study whose trials fill the node still screens.
    """

    def __init__(self, screen: Screen, *, plugins: tuple[str, ...] = (), threads: float = 1) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.constraints = screen.constraints
        self._here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        # The screen goes to the object store once; a new actor (after the old one died) reads it there.
        self._args = (ray.put(screen), tuple(plugins), threads)
        self._actor = self._start()

    def _start(self) -> Any:
        import ray

        # Not Ray's own restarts (it warns on the console about restarting an actor whose
        # arguments live in the object store): check starts a new actor itself.
        return ray.remote(num_cpus=0)(_ScreenWorker).options(scheduling_strategy=self._here).remote(*self._args)

    def check(self, plan: Any, finished: dict[str, int]) -> Any:
        """:meth:`Screen.check` in the actor. A dead actor (killed, its worker lost) is replaced by
        a new one and asked again, once; if that fails too, the verdict has no costs (the trial
        then trains and is measured as always, and fails with the reason if it cannot)."""
        import ray

        from automl._prescreen import Verdict

        for attempt in (1, 2):
            try:
                return ray.get(self._actor.check.remote(plan, dict(finished)))
            except ray.exceptions.RayActorError as exc:
                if attempt == 2:
                    error = exc
                    break
                self._actor = self._start()
            except ray.exceptions.RayError as exc:
                error = exc
                break
        return Verdict(costs=None, constraints={}, error=f"the screen's worker failed: {type(error).__name__}: {str(error)[:200]}")


def make_scheduler(cfg: StudyConfig) -> Any:
    """The Ray Tune scheduler ``cfg.scheduler`` names (None = Tune's FIFO: no trial stops early).

    MO-ASHA ranks on the validation accuracy and the study's cost objectives (those other than
    accuracy, in their directions), read from each trial's per-epoch results; its last rung lies
    below the most epochs a trial can train (``StudyConfig.max_training_epochs``).
    """
    if cfg.scheduler.name == "fifo":
        return None
    from automl._moasha import MOASHAScheduler

    costs = [o for o in cfg.objectives if o.metric != "accuracy"]
    return MOASHAScheduler(
        metric=VAL_ACCURACY,
        costs=[o.metric for o in costs],
        cost_directions=[o.resolved_direction for o in costs],
        grace_epochs=cfg.scheduler.grace_epochs,
        reduction_factor=cfg.scheduler.reduction_factor,
        max_epochs=cfg.max_training_epochs,
        time_attr=EPOCH,
    )


def _fit_interruptibly(tuner: Any) -> None:
    """``tuner.fit()`` in a worker thread while the main thread waits in Python.

    Python runs a signal handler only between bytecodes of the main thread. Tune's loop waits for
    its trials inside Ray's C++ ``ray.wait``, where a Ctrl-C stayed pending until some trial
    finished (hours, for a long trial; never, for a trial that waits on something). Waiting here,
    in ``Thread.join`` with a timeout, the main thread gets ``KeyboardInterrupt`` at once; the
    caller closes and re-queues the running trials, and the command line ends the process without
    the interpreter's teardown, which would stop Ray under the still running thread
    (``automl._cli._exit_now``).
    """
    import threading

    failure: list[BaseException] = []

    def run() -> None:
        try:
            tuner.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as is
            failure.append(exc)

    worker = threading.Thread(target=run, name="ray-tune", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=0.2)
    if failure:
        raise failure[0]


def check_drift(study: optuna.Study, study_dir: Path, payload: Payload, *, log: Callable[[str], None] = print) -> dict[int, float]:
    """Time each front trial's artifact again with nothing else running; record, never replace.

    Each front trial run by this launcher (its checkpoint is in ``study_dir``) is timed from its
    checkpoint's artifact (for the ``eager`` runtime, the module :func:`automl.load_model` rebuilds)
    with the trial's own settings and inputs (:func:`automl._measure.time_artifact`).
    The relative drift ``(re-timed - recorded) / recorded`` goes to the study attribute
    ``latency_drift`` (``{trial number: drift}``); the trial's value stays the study's number. One
    log line says how many moved by more than :data:`DRIFT_WARN`.

    Returns:
        ``{trial number: drift}`` of the trials timed now.
    """
    from automl._artifact import ArtifactError, eager_artifact, load_artifact
    from automl._checkpoint import CheckpointError, load_checkpoint
    from automl._measure import latency_inputs, time_artifact
    from automl._rebuild import load_model

    settings = payload.settings.latency
    drift = dict(study.user_attrs.get("latency_drift") or {})
    out: dict[int, float] = {}
    for t in study.best_trials:
        recorded = t.user_attrs.get("latency_ms")
        rel = t.user_attrs.get(CHECKPOINT)
        if recorded is None or not rel or not (study_dir / rel).is_dir():
            continue  # run by another launcher sharing the study: its checkpoint is in its folder
        folder = study_dir / rel
        try:
            ckpt = load_checkpoint(folder)
            if settings.runtime == "eager":
                # The eager runtime's artifact is the module itself: the one rebuild from the checkpoint.
                artifact = eager_artifact(load_model(folder, data=payload.data, methods=payload.methods), device=settings.device, threads=settings.threads)
            else:
                artifact = load_artifact(folder, runtime=settings.runtime, device=settings.device, threads=settings.threads)
        except (ArtifactError, CheckpointError) as exc:
            log(f"drift check: trial {t.number} skipped: {exc}")
            continue
        dynamic = bool(ckpt.record.get("per_sample"))
        inputs = latency_inputs(payload.data, settings, dynamic=dynamic)
        timing = time_artifact(artifact, inputs, settings, per_sample=dynamic)
        where = timing.where
        out[t.number] = drift[str(t.number)] = (timing.median_ms - float(recorded)) / float(recorded)
    if out:
        study.set_user_attr("latency_drift", drift)
        # Where the re-timing ran (automl._target.provenance), the same JSON text as a trial's record.
        study.set_user_attr("latency_drift_target", json.dumps(where, sort_keys=True, default=str))
        moved = sorted(n for n, d in out.items() if abs(d) > DRIFT_WARN)
        log(
            f"drift check: {len(out)} front trials re-timed alone; {len(moved)} moved by more than {DRIFT_WARN:.0%} "
            f"from their trial value{(' (trials ' + ', '.join(map(str, moved)) + ')') if moved else ''}; the trial values stand"
        )
    return out
