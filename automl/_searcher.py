"""The Ray Tune side of a search: the searcher that asks Optuna for plans and records every trial,
and the progress callback.

:class:`StudySearcher` links each Ray trial to an Optuna trial and decides only *what* each trial
is; the plain functions it calls do the rest: :func:`screen_trial` dry-runs a sampled plan and
records it at once when it must not train (a cost bound broken, or the plan trained already),
:func:`record_variants` records the extra operating points of a trained model, and every record is
written by :func:`automl._records.write_trial`.

This module imports Ray at the top: the run loop (:mod:`automl._search`) imports it only when a
search starts, so reading a study never loads Ray.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune import Callback, Stopper
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from searchspace import Plan
from automl._checkpoint import variant_folder
from automl._config import StudyConfig
from automl._constraints import Constraints
from automl._metrics import MEASURED_KEYS
from automl._prescreen import plan_key
from automl._progress import EpochProgress, drain
from automl._records import (
    CHECKPOINT,
    DERIVED_FROM,
    DRY_RUN,
    EPOCH,
    FAIL_REASON,
    INFEASIBLE,
    INTERRUPTED,
    METHOD,
    PLAN_KEY,
    PRUNED_BY,
    VAL_ACCURACY,
    trained_plans,
    trial_checkpoint,
    write_duplicate,
    write_trial,
)
from automl._recovery import LAUNCHER, finished_count, journal_record
from automl._storage import StorageUnavailable
from automl._study import open_storage
from automl._tune import COSTS, DISK_FULL, PARTIAL, VARIANTS

__all__ = ["DiskFull", "HaltStopper", "Screened", "StudyCallback", "StudySearcher", "make_callback", "record_variants", "screen_trial"]

#: Seconds between two budget checks while the budget is covered by running trials.
WAIT_S = 1.0
#: Ray's words for a task or actor lost with its node (the trial did nothing wrong). Not "the node
#: running low on memory" of Ray's out-of-memory killer: that trial's own memory is the cause.
NODE_DIED = ("node has died", "nodediederror", "node was terminated", "raylet died")

#: Result keys recorded as user attributes of a trained trial, beside its measured numbers.
_RUN_KEYS = ("seconds", "attempts", "notes", "node")


class DiskFull(Exception):
    """A write found no room in ``folder``; the search stops (trial ``number``, if one, is re-queued)."""

    def __init__(self, folder: str, number: int | None) -> None:
        trial = f" (trial {number} failed writing there and was re-queued)" if number is not None else ""
        super().__init__(f"no space left on device in {folder}{trial}")
        self.folder, self.number = folder, number


class HaltStopper(Stopper):
    """Ends the Ray Tune run as soon as the searcher halts on a full disk (:attr:`StudySearcher.halt`);
    Tune stops the running trials as it does at ``budget.time_limit_s``, without telling the
    searcher. A database that did not come back stops nothing here: no new trial starts, and the
    running ones finish into the journal, so no finished work is thrown away. Tune pickles it with
    the run config; the pickled copy is never run."""

    def __init__(self, searcher: Any) -> None:
        self.searcher = searcher

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.searcher is not None and isinstance(self.searcher.halt, DiskFull)

    def __getstate__(self) -> dict[str, Any]:
        return {"searcher": None}


@dataclass(frozen=True)
class Screened:
    """What the screen found about a sampled trial."""

    #: The trial's own record attributes from its dry run (``dry_run``, ``plan_key``, ``method``,
    #: ``converted_nothing``); empty when the dry run failed (the trial then fails with the reason).
    attrs: dict[str, Any] = field(default_factory=dict)
    #: Constraint values from the costs known before training (accuracy's bound: 0, not known).
    constraints: dict[str, float] = field(default_factory=dict)
    #: The dry-run costs by metric, for a scheduler to rank the trial on from its first epoch.
    costs: dict[str, Any] = field(default_factory=dict)
    #: Set when the trial was recorded now and must not train: its progress line.
    status: str | None = None


def screen_trial(study: optuna.Study, trial: optuna.Trial, plan: Plan, screen: Any, *, objectives: Sequence[str]) -> Screened:
    """Dry-run ``trial``'s sampled ``plan`` with ``screen`` (:class:`automl._prescreen.Screen`);
    record the trial now if it must not train.

    A plan whose known costs break a bound of ``constraints:`` is recorded PRUNED with its
    constraint values (TPE and NSGA-II learn the infeasible region from them); a plan that a
    finished trial trained already (:func:`automl._records.trained_plans`) is recorded as that
    trial's repeat (:func:`automl._records.write_duplicate`). Otherwise nothing is written yet.
    """
    finished = trained_plans(study)
    verdict = screen.check(plan, {k: t.number for k, t in finished.items()})
    if verdict.costs is None:
        return Screened()
    costs = verdict.costs
    label = costs.plan.label
    # Recorded as the plan it really is (its Optuna params stay the sampled ones).
    attrs: dict[str, Any] = {DRY_RUN: costs.record(), PLAN_KEY: plan_key(costs.plan), METHOD: label}
    if costs.noop:
        attrs["converted_nothing"] = list(costs.noop)
    if verdict.broken:
        write_trial(study, trial, state=TrialState.PRUNED, constraints=verdict.constraints, attrs={**attrs, INFEASIBLE: verdict.broken})
        return Screened(attrs, verdict.constraints, status=f"{label} PRUNED before training: {verdict.broken}")
    if verdict.duplicate_of is not None:
        first = finished[attrs[PLAN_KEY]]
        write_duplicate(study, trial, first, objectives=objectives, attrs=attrs)
        if first.state == TrialState.PRUNED:
            status = f"{label} is trial {first.number}'s plan, which {first.user_attrs.get(PRUNED_BY)} stopped: recorded PRUNED, not trained again"
        else:
            status = f"{label} is trial {first.number}'s plan: recorded with its numbers, not trained again"
        return Screened(attrs, dict(first.constraints), status=status)
    return Screened(attrs, verdict.constraints, {k: v for k, v in costs.values().items() if v is not None})


def record_variants(
    study: optuna.Study,
    parent: FrozenTrial,
    variants: Sequence[Mapping[str, Any]],
    *,
    space: Callable[[Any], Any],
    objectives: Sequence[str],
    bounds: Constraints = Constraints(),
) -> list[FrozenTrial]:
    """Record each extra operating point of ``parent``'s model as its own COMPLETE trial.

    Its parameters are the parent's with the variant's overrides, replayed through the search
    ``space`` so that exactly the active parameters (and their distributions) are stored; it
    points at its own checkpoint (a sub-folder of the parent's, with its own settings, files and
    numbers) and records its state (e.g. thresholds). A variant without a finite value for every
    objective, or whose overrides leave the space, is skipped.
    """
    out = []
    checkpoint = parent.user_attrs.get(CHECKPOINT)
    for index, variant in enumerate(variants):
        metrics = {k: v for k, v in variant["metrics"].items() if k in MEASURED_KEYS and v is not None}
        if any(metrics.get(m) is None or not math.isfinite(float(metrics[m])) for m in objectives):
            continue
        replay = optuna.trial.FixedTrial({**parent.params, **variant["params"]})
        try:
            space(replay)
        except Exception:  # noqa: BLE001 - an override outside the space is skipped, not fatal
            continue
        out.append(
            write_trial(
                study, None, state=TrialState.COMPLETE, objectives=objectives, metrics=metrics,
                constraints=None if bounds.empty else bounds.violations(metrics),
                checkpoint=f"{checkpoint}/{variant_folder(index)}" if checkpoint else None,
                attrs={DERIVED_FROM: parent.number, METHOD: parent.user_attrs.get(METHOD), "state": variant["state"]},
                params=replay.params, distributions=replay.distributions,
            )
        )
    return out


class StudySearcher(OptunaSearch):
    """OptunaSearch that keeps the budget, screens each sampled plan before it launches and
    records every trial it ends with :func:`automl._records.write_trial`.

    Args:
        budget: finished trials the study must hold (several launchers may share it).
        screen: the dry run before launch (:class:`automl._prescreen.Screen` or
            :class:`automl._search.NodeScreen`); its ``constraints`` are the study's bounds.
    """

    def __init__(self, *args: Any, budget: int | None = None, screen: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._budget = budget
        self._screen = screen
        self._bounds: Constraints = screen.constraints if screen is not None else Constraints()
        self._errored: dict[str, Any] = {}
        self._wait_until = 0.0
        #: Why the search must stop now (:class:`DiskFull`, :class:`~automl._storage.StorageUnavailable`):
        #: no new trial starts, the run loop's stopper ends the Tune run, the launcher says why.
        self.halt: Exception | None = None
        #: The study folder's journal: where a finished trial's record goes when the storage
        #: does not take it within ``storage_retry_s`` (None: the error stands).
        self.journal: Path | None = None
        #: Ray trial id -> what the screen found (part of the trial's record when it ends).
        self._screened: dict[str, Screened] = {}
        #: Told of each trial recorded before launch (``screened(number, status)``), if set.
        self.progress: Any = None
        #: The scheduler that may stop trials early (its ``stopped`` ids and ``name``), if any.
        self.scheduler: Any = None

    def save(self, checkpoint_path: str) -> None:
        # Tune checkpoints its searcher now and then (never restored: Optuna is the record);
        # the screen holds the dataset and the base model, and the progress callback a console.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_screen", "progress", "scheduler", "halt")}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def running_trial_ids(self) -> list[int]:
        """Optuna ids of the trials this launcher runs now (for the heartbeat)."""
        return [ot._trial_id for tid, ot in list(self._ot_trials.items()) if tid not in self._completed_trials]

    def suggest(self, trial_id: str) -> dict | None:
        # Plans screened out before training are recorded at once and the sampler is asked
        # again; each counts toward the budget, so the loop ends.
        while True:
            config = self._suggest_one(trial_id)
            if config is None or config is Searcher.FINISHED or self._screen is None:
                return config
            ot = self._ot_trials[trial_id]
            screened = screen_trial(self._ot_study, ot, Plan.from_dict(config["plan"]), self._screen, objectives=self.metric)
            if screened.status is None:
                self._screened[trial_id] = screened
                config[COSTS] = screened.costs
                return config
            del self._ot_trials[trial_id]
            if self.progress is not None:
                self.progress.screened(ot.number, screened.status)

    def _suggest_one(self, trial_id: str) -> dict | None:
        if self.halt is not None:
            return Searcher.FINISHED
        if self._budget is not None and self._ot_study is not None:
            # Several launchers may share one study (PostgreSQL): stop once the budget is
            # covered by finished trials plus those running anywhere. While trials of this
            # launcher still run, wait rather than stop: one whose node dies is re-queued and
            # must still run here (Ray Tune asks again; the check is made at most every
            # WAIT_S seconds).
            if time.monotonic() < self._wait_until:
                return None
            finished = finished_count(self._ot_study)
            running = len(self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if finished >= self._budget or (finished + running >= self._budget and not self.running_trial_ids()):
                return Searcher.FINISHED
            if finished + running >= self._budget:
                self._wait_until = time.monotonic() + WAIT_S
                return None
        config = super().suggest(trial_id)
        if config is None:
            return None
        ot = self._ot_trials[trial_id]
        # Owner and first heartbeat right after ask: a resuming launcher can tell a trial of a
        # dead launcher (closed and re-queued) from one of a live launcher (left alone).
        ot.set_user_attr("launcher", LAUNCHER)
        ot.set_user_attr("heartbeat", time.time())
        ot.set_user_attr("ray_trial_id", trial_id)
        ot.set_user_attr(METHOD, Plan.from_dict(config["plan"]).label)
        config["optuna_trial_number"] = ot.number
        return config

    def _record(self, trial_id: str, *, state: TrialState, attrs: Mapping[str, Any], variants: list[Any] | None = None, **record: Any) -> None:
        """End Ray trial ``trial_id``: its record, with what its screen found.

        When the storage does not answer within ``storage_retry_s`` the record (and the trial's
        extra operating points, ``variants``) goes to the study's journal and the search halts
        (:attr:`halt`); once halted for that reason, every later record goes to the journal at once.
        The next launcher replays it.
        """
        screened = self._screened.pop(trial_id, Screened())
        ot = self._ot_trials[trial_id]
        full = {**attrs, **screened.attrs}
        try:
            if isinstance(self.halt, StorageUnavailable):
                raise self.halt
            out = write_trial(self._ot_study, ot, state=state, objectives=self.metric, attrs=full, **record)
        except StorageUnavailable as exc:
            if self.journal is None:
                raise
            self._completed_trials.add(trial_id)
            entry = {"number": ot.number, "state": state.name, "objectives": list(self.metric), "attrs": full, **record}
            if variants:
                entry["variants"] = variants
            journal_record(self.journal, entry)
            if self.halt is None:
                self.halt = exc
                running = len(self.running_trial_ids())
                if self.progress is not None:
                    self.progress.log(f"storage: {exc}; trial {ot.number} is kept in the journal, no new trial starts, the {running} running finish into it")
            return
        self._completed_trials.add(trial_id)
        if variants:
            record_variants(self._ot_study, out, variants, space=self._space, objectives=self.metric, bounds=self._bounds)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot = self._ot_trials.get(trial_id)
        if ot is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        if error:
            # The callback's on_trial_error (called right after this) knows the Ray error text.
            self._errored[trial_id] = ot
            return None
        if result and result.get(PARTIAL):
            return self._close_partial(trial_id, result)
        if result and result.get(DISK_FULL):
            return self._stop_disk_full(trial_id, result)
        reason = None
        if not result or result.get(FAIL_REASON):
            reason = (result or {}).get(FAIL_REASON) or "the trial reported no result"
        else:
            values = [result.get(m) for m in self.metric]
            if any(v is None or not math.isfinite(float(v)) for v in values):
                reason = f"objective values are not finite: {dict(zip(self.metric, values))}"
        if reason is not None:
            attempts = {"attempts": result["attempts"]} if result and result.get("attempts") is not None else {}
            self._record(trial_id, state=TrialState.FAIL, attrs={FAIL_REASON: reason, **attempts})
            return None
        run = {k: result[k] for k in _RUN_KEYS if result.get(k) is not None}
        if isinstance(run.get("notes"), str):
            run["notes"] = json.loads(run["notes"])  # a string in the result: Ray flattens nested dicts
        self._record(
            trial_id, state=TrialState.COMPLETE,
            metrics={k: result[k] for k in MEASURED_KEYS if result.get(k) is not None},
            # All bounds on the trained numbers (min_accuracy too): what the sampler learns from
            # and what keeps a trial off Optuna's best_trials (the front).
            constraints=None if self._bounds.empty else self._bounds.violations(result),
            checkpoint=trial_checkpoint(ot.number),
            attrs={METHOD: result.get("method"), **run},
            variants=json.loads(result[VARIANTS]) if result.get(VARIANTS) else None,
        )
        return None

    def _stop_disk_full(self, trial_id: str, result: dict) -> None:
        """A trial whose write found no room: FAIL with the reason, interrupted (not the user's
        failure, not counted) and re-queued, then the study stops (:class:`DiskFull`): the next
        trials would meet the same full folder."""
        ot = self._ot_trials[trial_id]
        reason = f"{result.get(FAIL_REASON) or 'no space left on device'}; its parameters were re-queued"
        self._record(trial_id, state=TrialState.FAIL, attrs={FAIL_REASON: reason, INTERRUPTED: True})
        if ot.params and not isinstance(self.halt, StorageUnavailable):  # else the journal's replay re-queues it
            self._ot_study.enqueue_trial(dict(ot.params), user_attrs={"requeue_of": ot.number})
        self.halt = self.halt or DiskFull(str(result[DISK_FULL]), ot.number)

    def _close_partial(self, trial_id: str, result: dict) -> None:
        """A trial that ended on an intermediate result: stopped by the scheduler (PRUNED, with
        its last validation accuracy and epoch; no measured model, so never on the front) or by
        the study's time budget (FAIL, as any trial that did not finish)."""
        attrs = {k: result[k] for k in (VAL_ACCURACY, EPOCH) if result.get(k) is not None}
        scheduler = self.scheduler
        if scheduler is not None and trial_id in scheduler.stopped:
            # Its constraint values are those of its costs before training (accuracy not known).
            screened = self._screened.get(trial_id, Screened())
            self._record(trial_id, state=TrialState.PRUNED, constraints=screened.constraints, attrs={**attrs, PRUNED_BY: scheduler.name})
        else:
            reason = f"stopped before it finished (the study's time limit), after {result.get(EPOCH)} training epochs"
            self._record(trial_id, state=TrialState.FAIL, attrs={**attrs, FAIL_REASON: reason})

    def close_errored(self, trial_id: str, reason: str, *, node_lost: bool = False) -> None:
        """Record a trial whose Ray worker died (OOM kill, segfault...) as FAIL with Ray's reason.

        A trial whose *node* died (a reclaimed spot instance, a stopped raylet) did nothing wrong:
        it is recorded FAIL ``interrupted`` (not the user's failure, not counted toward the
        budget) and its parameters are re-queued, once, as after a killed launcher; the search
        goes on until the budget is met (see :meth:`_suggest_one`).
        """
        ot = self._errored.pop(trial_id, None)
        if ot is None or trial_id in self._completed_trials:
            return
        if not node_lost:
            self._record(trial_id, state=TrialState.FAIL, attrs={FAIL_REASON: reason})
            return
        why = f"interrupted: the node running this trial died; its parameters were re-queued ({reason})"[:2000]
        self._record(trial_id, state=TrialState.FAIL, attrs={FAIL_REASON: why, INTERRUPTED: True})
        if ot.params and not isinstance(self.halt, StorageUnavailable):  # else the journal's replay re-queues it
            self._ot_study.enqueue_trial(dict(ot.params), user_attrs={"requeue_of": ot.number})

    def close_running(self, reason: str) -> list[int]:
        """Ctrl-C or the search's time limit: close this launcher's running trials as interrupted
        and re-queue their params (a trial that already finished is left as it is)."""
        closed = []
        for tid, ot in list(self._ot_trials.items()):
            if tid in self._completed_trials:
                continue
            try:
                self._record(tid, state=TrialState.FAIL, attrs={INTERRUPTED: True, FAIL_REASON: reason})
            except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue
            closed.append(ot.number)
            if ot.params:
                self._ot_study.enqueue_trial(dict(ot.params), user_attrs={"requeue_of": ot.number})
        return closed


def _error_text(trial: Any) -> str:
    """One line from Ray's record of a trial whose worker failed (e.g. killed when out of memory)."""
    text = ""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    try:
        if path and Path(path).is_file() and not str(path).endswith(".pkl"):
            lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
            # The exception's own line ("ray.exceptions.OutOfMemoryError: ...") before any other
            # line that merely says "error" (Ray's memory report ends with "bytes errored: 0").
            raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", ln)]
            text = raised[-1] if raised else next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    except OSError:
        pass
    return f"the Ray worker running this trial failed: {text or 'no error text (killed, e.g. by the OS when out of memory)'}"[:2000]


def _node_lost(trial: Any, reason: str) -> bool:
    """Whether a trial errored because its node died, as Ray's error says (:data:`NODE_DIED`,
    anywhere in its error file: the cause sits a few lines below the error's first line)."""
    text = reason
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            text += Path(path).read_text(errors="replace")
    except OSError:
        pass
    return any(m in text.lower() for m in NODE_DIED)


class StudyCallback(Callback):
    """Prints one progress line per finished trial; records why a Ray worker failed.

    Tune pickles its callbacks with the Tuner, and the pickled copy is never run: ``__getstate__``
    leaves out what cannot be pickled (the log function's console, storages, the searcher).
    """

    def __init__(self, *, total: int, url: str, name: str, log: Callable[[str], None], searcher: Any = None, queue: Any = None) -> None:
        self.done = 0
        self.failed = 0
        self.total = total
        self.url = url
        self.name = name
        self._storage: Any = None
        self.log = log
        self.searcher = searcher
        self.queue = queue
        self.drained = 0.0
        self.epochs = EpochProgress(log)

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        if self._storage is None:
            self._storage = open_storage(self.url)
        return self._storage

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_storage": None, "log": print, "searcher": None, "epochs": None}

    def _progress(self, trial: Any, status: str) -> None:
        self._line(trial.config.get("optuna_trial_number", "?"), status)

    def screened(self, number: int, status: str) -> None:
        """A trial the searcher recorded before launching it (infeasible, or a repeat)."""
        self.done += 1
        self._line(number, status)

    def _line(self, number: Any, status: str) -> None:
        try:
            study = optuna.load_study(study_name=self.name, storage=self.storage)
            front: Any = len(study.best_trials) if any(t.state == TrialState.COMPLETE for t in study.trials) else 0
        except Exception:  # noqa: BLE001 - the database is away (the searcher waits for it); the line still shows
            self._storage = None
            front = "?"
        self.log(f"[{self.done}/{self.total}] trial {number} {status} | failed {self.failed} | front {front}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        result = trial.last_result or {}
        if result.get(PARTIAL):
            self._progress(trial, f"{result.get('method')} stopped after {result.get(EPOCH)} training epochs (validation accuracy {result.get(VAL_ACCURACY, math.nan):.4f})")
            return
        if result.get(DISK_FULL):
            self._progress(trial, f"interrupted (re-queued): {result.get(FAIL_REASON, '')[:160]}")
            return
        if result.get(FAIL_REASON):
            self.failed += 1
            self._progress(trial, f"FAILED: {result[FAIL_REASON][:160]}")
            return
        acc = result.get("accuracy")
        self._progress(trial, f"{result.get('method')} acc={acc:.4f} size={result.get('size_bytes')}B lat={result.get('latency_ms', 0):.3f}ms" if acc is not None else "done")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # Long trials' epochs, at most once a second (a Tune step is much shorter).
        if self.queue is not None and time.monotonic() - self.drained >= 1.0:
            self.drained = time.monotonic()
            drain(self.queue, self.epochs)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.queue is not None:
            drain(self.queue, self.epochs)
        self.epochs.close()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        reason = _error_text(trial)
        lost = _node_lost(trial, reason)
        if self.searcher is not None:
            self.searcher.close_errored(trial.trial_id, reason, node_lost=lost)
        if lost:
            self.done -= 1  # its re-queued parameters run again and count then
            self._progress(trial, "interrupted: its node died; re-queued")
            return
        self.failed += 1
        self._progress(trial, f"FAILED: {reason[:160]}")


def make_callback(cfg: StudyConfig, total: int, log: Callable[[str], None], searcher: StudySearcher | None = None, queue: Any = None) -> StudyCallback:
    """The study's progress callback; the searcher reports the trials it records before launch to it."""
    cb = StudyCallback(total=total, url=cfg.storage_url, name=cfg.name, log=log, searcher=searcher, queue=queue)
    if searcher is not None:
        searcher.progress = cb
    return cb
