"""Crash recovery and trial-fault handling: nothing finished is lost, nothing is counted twice.

The Optuna storage is the single source of truth of a study. Ray Tune's experiment folder of a
launcher that died is *superseded*, not restored: every ``launch``/``resume`` starts a fresh Tune run
(``ray/search_<time>/``) for the trials still missing, because the facts Tune would restore (which
trials finished, their results) are already in Optuna, and a restored Tune run would re-ask the
searcher for trials it already told Optuna about.

What happens to a trial left RUNNING by a launcher that was killed (SIGKILL, power cut, lost node):

1. It is *stale* when its launcher is known dead (same host, process gone) or its heartbeat (user
   attr ``heartbeat``, refreshed every :data:`HEARTBEAT_S` seconds by the launcher that owns it) is
   older than :data:`GRACE_S`. A RUNNING trial of a live launcher on the same PostgreSQL study is never
   touched. A launcher killed between Optuna's ``ask`` and writing its ``launcher`` attr leaves a
   trial with no owner: every launcher registers itself on the study first (study user attr
   ``launcher.<id>``, :func:`register_launcher`), so such a trial is stale at once when it is older
   than this launcher and every other registered launcher is on this host and dead; otherwise it
   waits out :data:`GRACE_S` from its start.
2. It is recorded FAIL (:func:`automl._records.write_trial`) with ``fail_reason`` "interrupted ..."
   and ``interrupted = True``; the storage refuses every write to a trial another process already
   finished, so exactly one launcher wins.
3. The winner re-queues the same parameters (``study.enqueue_trial``, user attr ``requeue_of``), so
   the point the sampler chose is still evaluated; the next ``ask`` pops it.
4. Interrupted trials do not count toward the budget (:func:`finished_count`), so a study killed any
   number of times still ends with ``budget.trials`` finished trials.

A checkpoint folder is written *before* the trial's result reaches Optuna (see
``automl._study``'s checkpoint sink), so a COMPLETE trial always has its checkpoint; a checkpoint of a
trial that was then interrupted is an orphan and is removed here (:func:`remove_orphan_checkpoints`).

A finished trial whose record the storage did not take within ``storage_retry_s`` (the database
down longer than that, :mod:`automl._storage`) is appended to the study folder's journal
(:data:`JOURNAL`, one JSON line per record) and the launcher stops. The next launcher replays the
journal first (:func:`replay_journal`), before it closes interrupted trials, so the trial is recorded
as it finished and is not re-queued. A record is identified by its trial's number: replaying an
entry whose trial holds it already writes nothing, so a journal replayed twice records nothing twice.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
from optuna.trial import TrialState

from automl._records import CHECKPOINT, DERIVED_FROM, FAIL_REASON, FINALIZED_FROM, INTERRUPTED, write_trial

__all__ = [
    "GRACE_S",
    "HEARTBEAT_S",
    "JOURNAL",
    "JOURNAL_OF",
    "LAUNCHER",
    "Heartbeat",
    "TrialTimeLimit",
    "close_interrupted",
    "finished_count",
    "guarded",
    "journal_record",
    "register_launcher",
    "remove_orphan_checkpoints",
    "replay_journal",
]

#: The study folder's journal of finished trials the storage did not take (JSON lines).
JOURNAL = "journal.jsonl"
#: A journaled trial recorded as a new trial because another launcher had closed its own as
#: interrupted meanwhile: the number of that trial (so a second replay finds it recorded).
JOURNAL_OF = "journal_of"

#: Seconds between two heartbeats of a launcher's running trials.
HEARTBEAT_S = 10.0
#: A RUNNING trial whose heartbeat is older than this belongs to a launcher that is gone.
GRACE_S = 60.0

#: Who owns the trials this process starts: recorded on each trial (user attr ``launcher``).
LAUNCHER: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
#: Study user attrs naming the launchers that ever ran on the study: ``launcher.<id>`` -> LAUNCHER + start.
REGISTRY_PREFIX = "launcher."
#: When this process started launching (set by :func:`register_launcher`); trials it asks for are newer.
_STARTED: list[float] = []


def register_launcher(study: optuna.Study) -> None:
    """Record this launcher on the study before it asks for any trial (see the module docstring)."""
    if not _STARTED:
        _STARTED.append(_now())
    study.set_user_attr(f"{REGISTRY_PREFIX}{LAUNCHER['id']}", {**LAUNCHER, "started": _STARTED[0]})


def _others_all_dead(study_attrs: dict[str, Any], me: dict[str, Any]) -> bool:
    """Every launcher registered on the study other than ``me`` ran on this host and is gone."""
    for key, owner in study_attrs.items():
        if not key.startswith(REGISTRY_PREFIX) or not isinstance(owner, dict) or owner.get("id") == me["id"]:
            continue
        if owner.get("host") != me["host"] or not isinstance(owner.get("pid"), int) or _pid_alive(owner["pid"]):
            return False
    return True


def _now() -> float:
    return time.time()


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` runs on this host (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def is_stale(
    trial: optuna.trial.FrozenTrial,
    *,
    now: float | None = None,
    me: dict[str, Any] = LAUNCHER,
    study_attrs: dict[str, Any] | None = None,
) -> bool:
    """Whether a RUNNING trial's launcher is gone (see the module docstring).

    Args:
        study_attrs: the study's user attrs (the launcher registry), to judge a trial with no owner.
    """
    now = _now() if now is None else now
    owner = trial.user_attrs.get("launcher") or {}
    start = trial.datetime_start.timestamp() if trial.datetime_start is not None else 0.0
    if not owner and study_attrs is not None and _STARTED and start < _STARTED[0] and _others_all_dead(study_attrs, me):
        # Asked for before this launcher started, by a launcher that is now dead on this host.
        return True
    if owner.get("id") == me["id"]:
        return False
    if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and owner["pid"] != me["pid"]:
        # Same machine: the process table answers at once, no need to wait for the heartbeat.
        if not _pid_alive(owner["pid"]):
            return True
    beat = trial.user_attrs.get("heartbeat")
    if beat is None:
        # Killed between ``ask`` and the first heartbeat (a few milliseconds): judge by start time.
        # Optuna stores naive local datetimes (datetime.now()): .timestamp() reads them as local.
        return now - start > GRACE_S
    return now - float(beat) > GRACE_S


def close_interrupted(study: optuna.Study, *, log: Callable[[str], None] = print, requeue: bool = True) -> list[int]:
    """Close the stale RUNNING trials of ``study`` as FAIL and re-queue their parameters.

    Returns:
        The numbers of the trials this call closed.
    """
    closed: list[int] = []
    attrs = study.user_attrs
    reason = "interrupted: the launcher running this trial stopped; its parameters were re-queued"
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t, study_attrs=attrs):
            continue
        try:
            write_trial(study, t, state=TrialState.FAIL, attrs={INTERRUPTED: True, FAIL_REASON: reason})
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another launcher closed it first
        closed.append(t.number)
        if requeue and t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"requeue_of": t.number}, skip_if_exists=False)
    if closed:
        log(f"recovered: trials {closed} were left running by a stopped launcher; closed as FAIL (interrupted) and re-queued")
    return closed


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward the budget: COMPLETE, PRUNED, and FAIL that were not merely interrupted.

    Derived trials (``derived_from``: settings of an already trained model) and finalized ones
    (``finalized_from``: the long fine-tune of a chosen trial, ``automl finalize``) never count. Trials
    stopped before training (PRUNED: a cost bound broken) and duplicates of a finished plan
    (``duplicate_of``) count as one each, though they cost only a dry run, so a study always ends.
    """
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if DERIVED_FROM in t.user_attrs or FINALIZED_FROM in t.user_attrs:
            continue  # extra operating points of a trial's model (e.g. exit thresholds), finalize: not search runs
        if t.state == TrialState.COMPLETE or not t.user_attrs.get(INTERRUPTED):
            n += 1
    return n


def remove_orphan_checkpoints(study: optuna.Study, study_dir: Path) -> list[str]:
    """Delete checkpoint folders of trials that did not COMPLETE (and half-written ``.partial`` ones);
    a folder a COMPLETE trial points at (``checkpoint``) is kept whatever its name."""
    folder = study_dir / "checkpoints"
    if not folder.is_dir():
        return []
    trials = study.get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    kept = {str(t.user_attrs.get(CHECKPOINT)).split("/")[1] for t in trials if t.state == TrialState.COMPLETE and str(t.user_attrs.get(CHECKPOINT)).count("/") >= 1}
    removed = []
    for d in folder.iterdir():
        name = d.name
        orphan = name.endswith(".partial")
        if not orphan and name.startswith("trial_"):
            try:
                number = int(name.removeprefix("trial_"))
            except ValueError:
                continue
            orphan = states.get(number) in (TrialState.FAIL,) and name not in kept
        if orphan:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(name)
    return removed


def journal_record(study_dir: Path, entry: dict[str, Any]) -> Path:
    """Append one finished trial's record (``number`` plus :func:`write_trial`'s keywords, ``state``
    by name) to the study's journal, flushed to disk before this returns."""
    path = Path(study_dir) / JOURNAL
    line = json.dumps(entry, default=str, allow_nan=True)
    with path.open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def replay_journal(
    study: optuna.Study,
    study_dir: Path,
    *,
    variants: Callable[[optuna.trial.FrozenTrial, list[Any]], Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[int]:
    """Record the journal's trials in the storage, each once, then remove the journal.

    An entry's trial still RUNNING is finished with the entry's record; one finished with this
    record already (its write reached the database after all) is left as it is; one another
    launcher closed as interrupted meanwhile gets its record as a new trial (same parameters,
    :data:`JOURNAL_OF` = its number), unless a trial holds that already; an interrupted record is
    re-queued unless its re-queue exists. A line cut short (a kill
    while writing it) is skipped: its trial stays RUNNING and is closed and re-queued as any
    interrupted trial. ``variants(parent, variants)`` records a parent's extra operating points
    where none is recorded yet.

    Returns:
        The numbers of the trials this call recorded.
    """
    path = Path(study_dir) / JOURNAL
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            log(f"recovered: skipped a journal line cut short in {path}")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    done: list[int] = []
    for entry in entries:
        number = int(entry["number"])
        trial = trials.get(number)
        if trial is None:
            continue
        record = {
            "state": TrialState[entry["state"]], "objectives": entry.get("objectives") or (), "metrics": entry.get("metrics"),
            "constraints": entry.get("constraints"), "checkpoint": entry.get("checkpoint"), "attrs": entry.get("attrs"),
        }
        if trial.state == TrialState.RUNNING:
            parent = write_trial(study, trial, **record)
        elif trial.state.is_finished() and trial.user_attrs.get(INTERRUPTED) and record["attrs"] and not record["attrs"].get(INTERRUPTED):
            again = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(JOURNAL_OF) == number]
            parent = again[0] if again else write_trial(
                study, None, **{**record, "attrs": {**record["attrs"], JOURNAL_OF: number}}, params=trial.params, distributions=trial.distributions
            )
        else:
            parent = trial  # the record reached the storage before the connection broke
        if (record["attrs"] or {}).get(INTERRUPTED) and trial.params and not any(t.user_attrs.get("requeue_of") == number for t in study.get_trials(deepcopy=False)):
            # An interrupted trial (its node died, a disk filled) journaled before it was re-queued.
            study.enqueue_trial(dict(trial.params), user_attrs={"requeue_of": number}, skip_if_exists=False)
        if entry.get("variants") and variants is not None and parent.state == TrialState.COMPLETE:
            if not any(t.user_attrs.get(DERIVED_FROM) == parent.number for t in study.get_trials(deepcopy=False)):
                variants(parent, entry["variants"])
        done.append(number)
    path.unlink()
    if done:
        log(f"recovered: trials {done} finished while the database was unreachable; recorded from the journal {path.name}")
    return done


class Heartbeat:
    """Refreshes the ``heartbeat`` user attr of this launcher's RUNNING trials every ``interval`` s.

    Optuna's own heartbeat (``RDBStorage(heartbeat_interval=...)``) is tied to ``study.optimize``;
    trials here are driven through ask/tell by Ray Tune's searcher, so the launcher beats for them.
    """

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        trial_ids: Callable[[], Iterable[int]],
        interval: float = HEARTBEAT_S,
        *,
        sweep: Callable[[], Any] | None = None,
    ) -> None:
        self._storage = storage
        self._trial_ids = trial_ids
        self._sweep = sweep
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="automl-heartbeat", daemon=True)

    def beat(self) -> None:
        now = _now()
        for tid in list(self._trial_ids()):
            try:
                self._storage.set_trial_user_attr(tid, "heartbeat", now)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # finished between listing and writing
            except Exception:  # noqa: BLE001 - a missed beat is retried next interval
                pass

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat()
            if self._sweep is not None:
                # Trials of a launcher on another host that died after this one started become
                # stale while this one runs: close them now, not at the next resume.
                try:
                    self._sweep()
                except Exception:  # noqa: BLE001 - retried next interval
                    pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- trial faults ----------------------------------------------------------------------------


class TrialTimeLimit(Exception):
    """Raised inside a trial's thread when it exceeds ``budget.trial_time_limit_s``."""


def _raise_in_thread(ident: int, exc_type: type[BaseException]) -> None:
    # CPython's documented hook for asynchronous exceptions: the exception is raised in the target
    # thread at its next bytecode boundary (a running torch op finishes first, a training step does
    # not). Ray runs function trainables in a non-main thread, so signal.alarm cannot be used.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc_type))


def guarded(fn: Callable[[], Any], *, time_limit_s: float | None = None, retries: int = 0) -> tuple[Any, str | None, int]:
    """Run ``fn`` with a time limit and retries; never raises for a trial fault.

    A raised exception (including ``MemoryError`` and CUDA out-of-memory) is retried up to
    ``retries`` times; a time-limit overrun is not retried (it would overrun again).

    Returns:
        ``(value, None, attempts)`` on success, ``(None, reason, attempts)`` on failure, where
        ``reason`` is one line ``"<ExceptionType>: <message>"``.
    """
    attempts = 0
    reason: str | None = None
    while attempts <= retries:
        attempts += 1
        lock = threading.Lock()
        state = {"done": False, "fired": False}
        ident = threading.get_ident()

        def fire() -> None:
            with lock:
                if not state["done"]:
                    state["fired"] = True
                    _raise_in_thread(ident, TrialTimeLimit)

        timer = threading.Timer(time_limit_s, fire) if time_limit_s else None
        start = time.perf_counter()
        # The outer try also catches a limit that fires while the inner handler runs: the async
        # exception can land at any bytecode until ``done`` is set under the lock.
        try:
            try:
                if timer is not None:
                    timer.daemon = True
                    timer.start()
                value = fn()
                with lock:
                    state["done"] = True
                if timer is not None:
                    timer.cancel()
                return value, None, attempts
            except TrialTimeLimit:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing trial is recorded, the study goes on
                with lock:
                    state["done"] = True
                if timer is not None:
                    timer.cancel()
                reason = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")[:2000]
            except BaseException:
                # A trial stopped from outside (Ray Tune's scheduler ends the training thread with
                # SystemExit at its next report) must not leave the timer to fire into a thread
                # that may by then run another trial.
                with lock:
                    state["done"] = True
                if timer is not None:
                    timer.cancel()
                raise
        except TrialTimeLimit:
            if timer is not None:
                timer.cancel()
            return None, f"TrialTimeLimit: the trial ran {time.perf_counter() - start:.1f}s, over budget.trial_time_limit_s={time_limit_s}", attempts
    return None, reason, attempts


def finite(values: Iterable[Any]) -> bool:
    return all(v is not None and math.isfinite(float(v)) for v in values)
