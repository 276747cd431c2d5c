"""The Ray Tune glue: the trainable, the Optuna searcher that links Optuna and Ray trials, and the
progress callback. Study preparation is :mod:`automl._study`; the run loop :mod:`automl._search`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from searchspace import Plan
from automl._checkpoint import save_checkpoint, variant_folder
from automl._cluster import assigned_device, pack_folder
from automl._config import StudyConfig
from automl._latency import busy, gated_batches, idle
from automl._metrics import METRIC_KEYS
from automl._prescreen import plan_key
from automl._progress import LONG_TRIAL_S, EpochProgress, drain, sender
from automl._recovery import LAUNCHER, finished_count, guarded
from automl._study import Payload, open_storage
from automl._trial import run_trial

__all__ = ["DERIVED_FROM", "DRY_RUN", "DUPLICATE_OF", "EPOCH", "INFEASIBLE", "PARTIAL", "PLAN_KEY", "PRUNED_BY", "VAL_ACCURACY", "EXTRA_ATTRS", "FAIL_REASON", "VARIANTS", "make_callback", "searcher_class", "trial_function"]

#: User attribute (and result key) holding why a trial failed.
FAIL_REASON = "fail_reason"
#: Result key of a trial's extra operating points (see ``automl._trial.Calibrated``).
VARIANTS = "variants"
#: User attribute of a trial recorded from another trial's model: the parent's number.
DERIVED_FROM = "derived_from"
#: User attribute of a trial recorded from an earlier finished trial of the same plan: its number.
DUPLICATE_OF = "duplicate_of"
#: User attribute: the canonical key of the plan a trial really is (automl._prescreen.plan_key).
PLAN_KEY = "plan_key"
#: User attribute: the costs of the trial's untrained final structure (automl._prescreen.dry_run).
DRY_RUN = "dry_run"
#: User attribute of a trial stopped before training: the cost bounds it broke.
INFEASIBLE = "infeasible"
#: Result key (Ray Tune's time attribute for the scheduler): training epochs of the trial so far.
EPOCH = "epoch"
#: Result key and user attribute: validation accuracy after the last reported epoch (never test).
VAL_ACCURACY = "val_accuracy"
#: Result key marking an intermediate result (one training epoch), not the trial's measured outcome.
PARTIAL = "partial"
#: User attribute of a trial a scheduler stopped: its name (the trial is PRUNED, never on the front).
PRUNED_BY = "pruned_by"
#: Config key the searcher adds to a trial's Ray config: its dry-run costs (automl._prescreen).
COSTS = "costs"
#: Result keys stored as user attributes of the Optuna trial (besides its objective values).
EXTRA_ATTRS = (*METRIC_KEYS, "runtime", "exit_fractions", "exit_accuracy", "exit_macs", "seconds", "attempts", "notes", "node", "latency_target")


def trial_function(config: dict[str, Any], payload: Payload) -> dict[str, Any]:
    """Run one trial from a Ray Tune config; returns the result dict (never raises for trial faults)."""
    import importlib

    from ray import tune

    for module in payload.plugins:  # user methods register themselves on import
        importlib.import_module(module)
    threads = max(1, int(payload.cpus))
    torch.set_num_threads(threads)
    device, where = assigned_device(payload.gpus)
    plan = Plan.from_dict(config["plan"])
    progress = sender(payload.progress, f"trial {config.get('optuna_trial_number', '?')}", after_s=LONG_TRIAL_S)
    if payload.report_epochs:
        progress = _EpochReporter(progress, plan.label, config.get(COSTS) or {})
    # The whole trial holds the node's latency lock shared, yielding at every batch, so nothing it
    # computes runs while a model is timed on the node (automl._latency: isolation).
    isolate = payload.settings.latency.isolate
    data = gated_batches(payload.data) if isolate else payload.data
    with tempfile.TemporaryDirectory() as work:

        def attempt() -> Any:
            with busy(isolate):
                return run_trial(
                    plan, payload.base, data, payload.settings, folder=Path(work) / "artifact", methods=payload.methods, device=device, progress=progress
                )

        outcome, reason, attempts = guarded(attempt, time_limit_s=payload.time_limit_s, retries=payload.retries)
        if outcome is None:
            # Every metric present (NaN): Tune rejects a result without the searched metrics and
            # would end the whole study; the searcher records the trial as FAIL by its fail_reason.
            result = {**{m: math.nan for m in METRIC_KEYS}, FAIL_REASON: reason, "method": plan.label, "attempts": attempts, PARTIAL: False}
            tune.report(result)
            return result
        return _report_outcome(config, payload, plan, outcome, attempts, where, Path(work) / "checkpoint")


class _EpochReporter:
    """Reports each finished training epoch to Ray Tune as an intermediate result (for a scheduler).

    The epoch count a scheduler sees (``result[EPOCH]``) is the number of training epochs this
    trial has finished so far, over all of its training: a chain fine-tunes after each stage that
    trains (``budget.epochs`` each) and a method may train inside its ``apply`` (e.g. slimming's
    gate epochs); every such epoch counts once, in the order they run, so the count is monotone
    over the whole trial (a retried attempt continues it rather than starting again at 1: Tune's
    schedulers assume time never goes back). Its rungs therefore compare trials after the same
    amount of training, whichever stage it was spent in.

    The result carries the validation accuracy (on the first ``PROGRESS_VAL_SAMPLES`` validation
    samples, as the progress line shows; never the test split), the trial's dry-run costs (final
    before training; upper bounds for models whose costs follow training, see
    :mod:`automl._prescreen`) under the metric names, ``accuracy`` as NaN (Tune requires every
    searched metric in every result; the test accuracy is measured only at the end), and
    ``PARTIAL``. The final result and the checkpoint are reported by :func:`_report_outcome` as
    before. Ray Tune ends a trial its scheduler stops inside ``tune.report`` (``SystemExit`` in the
    training thread).
    """

    def __init__(self, forward: Callable[[Any], None] | None, label: str, costs: dict[str, Any]) -> None:
        self.forward = forward
        self.label = label
        self.costs = {k: (math.nan if v is None else v) for k, v in costs.items()}
        self.epoch = 0

    def __call__(self, stats: Any) -> None:
        from ray import tune

        if self.forward is not None:
            self.forward(stats)
        result = self.next_result(stats)
        if result is not None:
            # Out of the node hold while Tune takes the result: the driver that consumes it may
            # itself wait at the node's turnstile (a dry run) behind a measurement waiting for us.
            with idle():
                tune.report(result)

    def next_result(self, stats: Any) -> dict[str, Any] | None:
        """Count one finished epoch; the intermediate result to report (None without a validation split)."""
        self.epoch += 1
        if stats.val_accuracy is None:
            return None
        result: dict[str, Any] = {m: math.nan for m in METRIC_KEYS}
        result.update(self.costs)
        result.update({"accuracy": math.nan, VAL_ACCURACY: float(stats.val_accuracy), EPOCH: self.epoch, PARTIAL: True, "method": self.label})
        return result


def _report_outcome(config: dict[str, Any], payload: Payload, plan: Plan, outcome: Any, attempts: int, where: dict[str, Any], folder: Path) -> dict[str, Any]:
    from ray import tune

    result = {
        **outcome.metrics.as_dict(),
        "method": plan.label,
        "seconds": outcome.seconds,
        "attempts": attempts,
        # Where it trained (device, GPU ids, a CPU fallback where a GPU was asked for).
        "notes": json.dumps({**outcome.notes, **where}, default=str),
        "node": _node_id(),
        PARTIAL: False,
    }
    if outcome.variants:
        # A JSON string: Ray flattens nested results; the searcher turns each into an Optuna trial.
        result[VARIANTS] = json.dumps([v.as_dict() for v in outcome.variants], default=str)
    number = config.get("optuna_trial_number")
    if payload.sink is not None and number is not None:
        # The checkpoint reaches the launcher's study folder before the result reaches Optuna, so a
        # COMPLETE trial always has its checkpoint, whichever node ran it (automl._cluster).
        import ray

        save_checkpoint(outcome, folder, base=payload.base_ref)
        ray.get(payload.sink.write.remote(int(number), pack_folder(folder)))
    tune.report(result)
    return result


def _node_id() -> str | None:
    """The Ray node that ran the trial (user attr ``node``: which machine of a cluster measured it)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests, benchmarks) there is no node
        return None


# --- Ray Tune glue ------------------------------------------------------------------------


def searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class StudySearcher(OptunaSearch):
        """OptunaSearch that links Optuna and Ray trials and records why a trial failed."""

        def __init__(self, *args: Any, extra_metrics: tuple[str, ...] = (), budget: int | None = None, screen: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._extra = extra_metrics
            self._budget = budget
            self._errored: dict[str, Any] = {}
            #: automl._prescreen.Screen: dry run, cost bounds and duplicates before a trial launches.
            self._screen = screen
            #: Told of each trial recorded before launch (``screened(number, status)``), if set.
            self.progress: Any = None
            #: The scheduler that may stop trials early (its ``stopped`` ids and ``name``), if any.
            self.scheduler: Any = None

        def save(self, checkpoint_path: str) -> None:
            # Tune checkpoints its searcher now and then (never restored: Optuna is the record);
            # the screen holds the dataset and the base model, and the progress callback a console.
            import pickle

            state = {k: v for k, v in self.__dict__.items() if k not in ("_screen", "progress", "scheduler")}
            with open(checkpoint_path, "wb") as f:
                pickle.dump(state, f)

        def running_trial_ids(self) -> list[int]:
            """Optuna ids of the trials this launcher runs now (for the heartbeat)."""
            return [ot._trial_id for tid, ot in list(self._ot_trials.items()) if tid not in self._completed_trials]

        def suggest(self, trial_id: str) -> dict | None:
            # Plans screened out before training (a cost bound broken, or already trained) are
            # recorded at once and the sampler is asked again; each counts toward the budget, so
            # the loop ends.
            while True:
                config = self._suggest_one(trial_id)
                if config is None or config is Searcher.FINISHED or self._screen is None:
                    return config
                if not self._screened_out(trial_id, config):
                    return config

        def _suggest_one(self, trial_id: str) -> dict | None:
            if self._budget is not None and self._ot_study is not None:
                # Several launchers may share one study (PostgreSQL): stop once the budget is
                # covered by finished trials plus those running anywhere.
                running = len(self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
                if finished_count(self._ot_study) + running >= self._budget:
                    return Searcher.FINISHED
            config = super().suggest(trial_id)
            if config is None:
                return None
            ot = self._ot_trials[trial_id]
            number = ot.number
            # Owner and first heartbeat right after ask: a resuming launcher can tell a trial of a
            # dead launcher (closed and re-queued) from one of a live launcher (left alone).
            ot.set_user_attr("launcher", LAUNCHER)
            ot.set_user_attr("heartbeat", time.time())
            ot.set_user_attr("ray_trial_id", trial_id)
            ot.set_user_attr("checkpoint", f"checkpoints/trial_{number:05d}")
            ot.set_user_attr("method", Plan.from_dict(config["plan"]).label)
            config["optuna_trial_number"] = number
            return config

        def _finished_plans(self) -> dict[str, Any]:
            """Plan key -> the first trial that trained that plan to its end (COMPLETE) or until a
            scheduler stopped it (PRUNED by MO-ASHA); not a copy, not derived. Training is seeded,
            so the same plan would reach the same validation accuracy at the same epoch again."""
            out: dict[str, Any] = {}
            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            for t in self._ot_study.get_trials(deepcopy=False, states=states):
                key = t.user_attrs.get(PLAN_KEY)
                stopped = t.state == optuna.trial.TrialState.PRUNED
                if not key or DUPLICATE_OF in t.user_attrs or DERIVED_FROM in t.user_attrs or (stopped and PRUNED_BY not in t.user_attrs):
                    continue
                if key not in out or (out[key].state == optuna.trial.TrialState.PRUNED and not stopped):
                    out[key] = t  # a trained-to-the-end trial of the plan wins over a stopped one
            return out

        def _screened_out(self, trial_id: str, config: dict) -> bool:
            """Dry-run the trial's plan; record it now (True) if it must not train, else annotate it."""
            ot = self._ot_trials[trial_id]
            plan = Plan.from_dict(config["plan"])
            finished = self._finished_plans()
            verdict = self._screen.check(plan, {k: t.number for k, t in finished.items()})
            if verdict.costs is None:
                return False  # the trial itself fails with the reason
            costs = verdict.costs
            ot.set_user_attr(DRY_RUN, {**costs.metrics(), "final": costs.final, "seconds": costs.seconds})
            ot.set_user_attr(PLAN_KEY, plan_key(costs.plan))
            if costs.noop:
                # Recorded as the plan it really is (its Optuna params stay the sampled ones).
                ot.set_user_attr("converted_nothing", list(costs.noop))
                ot.set_user_attr("method", costs.plan.label)
            if verdict.broken:
                for name, value in verdict.constraints.items():
                    ot.set_constraint(name, value)
                ot.set_user_attr(INFEASIBLE, verdict.broken)
                for k in costs.known:
                    ot.set_user_attr(k, costs.metrics()[k])
                # PRUNED: stopped before training, no objective values; TPE and NSGA-II read its
                # constraint values and learn the infeasible region from it.
                self._ot_study.tell(ot, state=optuna.trial.TrialState.PRUNED)
                status = f"{costs.plan.label} PRUNED before training: {verdict.broken}"
            elif verdict.duplicate_of is not None:
                first = finished[plan_key(costs.plan)]
                for k, v in first.user_attrs.items():
                    if k not in ("launcher", "heartbeat", "ray_trial_id", "method", PLAN_KEY, DRY_RUN):
                        ot.set_user_attr(k, v)
                for name, value in first.constraints.items():
                    ot.set_constraint(name, value)
                ot.set_user_attr(DUPLICATE_OF, first.number)
                if first.state == optuna.trial.TrialState.PRUNED:
                    self._ot_study.tell(ot, state=optuna.trial.TrialState.PRUNED)
                    status = f"{costs.plan.label} is trial {first.number}'s plan, which {first.user_attrs.get(PRUNED_BY)} stopped: recorded PRUNED, not trained again"
                else:
                    self._ot_study.tell(ot, list(first.values))
                    status = f"{costs.plan.label} is trial {first.number}'s plan: recorded with its numbers, not trained again"
            else:
                # The trial trains: a scheduler ranks it by these costs from its first epoch on.
                config[COSTS] = {k: v for k, v in costs.metrics().items() if v is not None}
                return False
            del self._ot_trials[trial_id]
            if self.progress is not None:
                self.progress.screened(ot.number, status)
            return True

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot = self._ot_trials.get(trial_id)
            if ot is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result, error)
            reason = None
            if error:
                # The callback's on_trial_error (called right after this) knows the Ray error text.
                self._errored[trial_id] = ot
                return None
            elif result and result.get(PARTIAL):
                self._close_partial(trial_id, ot, result)
                return None
            elif not result or result.get(FAIL_REASON):
                reason = (result or {}).get(FAIL_REASON) or "the trial reported no result"
            else:
                values = [result.get(m) for m in self.metric]
                if any(v is None or not math.isfinite(float(v)) for v in values):
                    reason = f"objective values are not finite: {dict(zip(self.metric, values))}"
            if reason is not None:
                ot.set_user_attr(FAIL_REASON, reason)
                if result and result.get("attempts") is not None:
                    ot.set_user_attr("attempts", result["attempts"])
                self._ot_study.tell(ot, None, state=optuna.trial.TrialState.FAIL)
                self._completed_trials.add(trial_id)
                return None
            for key in self._extra:
                if result.get(key) is not None:
                    ot.set_user_attr(key, result[key])
            if self._screen is not None and not self._screen.constraints.empty:
                # All bounds on the trained numbers (min_accuracy too): what the sampler learns from
                # and what keeps a trial off Optuna's best_trials (the front).
                for name, value in self._screen.constraints.violations(result).items():
                    ot.set_constraint(name, value)
            parent = (ot.number, dict(ot.params), dict(ot.user_attrs))
            out = super().on_trial_complete(trial_id, result, error)
            if result.get(VARIANTS):
                self._add_variants(*parent, json.loads(result[VARIANTS]))
            return out

        def _close_partial(self, trial_id: str, ot: Any, result: dict) -> None:
            """A trial that ended on an intermediate result: stopped by the scheduler (PRUNED, with
            its last validation accuracy, epoch and dry-run costs as user attributes; no objective
            values, so never on the front) or by the study's time budget (FAIL, as any trial that
            did not finish)."""
            scheduler = self.scheduler
            attrs = {VAL_ACCURACY: result.get(VAL_ACCURACY), EPOCH: result.get(EPOCH)}
            for key in METRIC_KEYS:
                v = result.get(key)
                if key != "accuracy" and v is not None and math.isfinite(float(v)):
                    attrs[key] = v
            for k, v in attrs.items():
                if v is not None:
                    ot.set_user_attr(k, v)
            if scheduler is not None and trial_id in scheduler.stopped:
                ot.set_user_attr(PRUNED_BY, scheduler.name)
                if self._screen is not None and not self._screen.constraints.empty:
                    # Its costs are known; accuracy is not (0 = not known, as before training).
                    costs = tuple(k for k in attrs if k in METRIC_KEYS)
                    for name, value in self._screen.constraints.violations(attrs, only=costs).items():
                        ot.set_constraint(name, value)
                self._ot_study.tell(ot, None, state=optuna.trial.TrialState.PRUNED)
            else:
                ot.set_user_attr(FAIL_REASON, f"stopped before it finished (the study's time limit), after {result.get(EPOCH)} training epochs")
                self._ot_study.tell(ot, None, state=optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)

        def _add_variants(self, number: int, params: dict[str, Any], attrs: dict[str, Any], variants: list[dict[str, Any]]) -> None:
            """Record each extra operating point of a trial's model as its own COMPLETE trial.

            Its parameters are the parent's with the variant's overrides, replayed through the search
            space so that exactly the active parameters (and their distributions) are stored; it
            points at its own checkpoint (a sub-folder of the parent's, with its own settings, files
            and numbers) and records its state (e.g. thresholds).
            """
            for index, variant in enumerate(variants):
                metrics = variant["metrics"]
                values = [metrics.get(m) for m in self.metric]
                if any(v is None or not math.isfinite(float(v)) for v in values):
                    continue
                replay = optuna.trial.FixedTrial({**params, **variant["params"]})
                try:
                    self._space(replay)
                except Exception:  # noqa: BLE001 - an override outside the space is skipped, not fatal
                    continue
                user_attrs = {k: metrics[k] for k in self._extra if metrics.get(k) is not None}
                user_attrs.update(
                    {
                        DERIVED_FROM: number,
                        "checkpoint": f"{attrs.get('checkpoint')}/{variant_folder(index)}" if attrs.get("checkpoint") else None,
                        "method": attrs.get("method"),
                        "state": variant["state"],
                    }
                )
                constraints = None
                if self._screen is not None and not self._screen.constraints.empty:
                    constraints = self._screen.constraints.violations(metrics)
                self._ot_study.add_trial(
                    optuna.trial.create_trial(
                        params=replay.params,
                        distributions=replay.distributions,
                        values=[float(v) for v in values],
                        user_attrs=user_attrs,
                        constraints=constraints,
                    )
                )

        def close_errored(self, trial_id: str, reason: str) -> None:
            """Record a trial whose Ray worker died (OOM kill, segfault...) as FAIL with Ray's reason."""
            ot = self._errored.pop(trial_id, None)
            if ot is None or trial_id in self._completed_trials:
                return
            ot.set_user_attr(FAIL_REASON, reason)
            self._ot_study.tell(ot, None, state=optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)

        def close_running(self, reason: str) -> list[int]:
            """Ctrl-C or the search's time limit: close this launcher's running trials as interrupted
            and re-queue their params (a trial that already finished is left as it is)."""
            closed = []
            for tid, ot in list(self._ot_trials.items()):
                if tid in self._completed_trials:
                    continue
                try:
                    ot.set_user_attr("interrupted", True)
                    ot.set_user_attr(FAIL_REASON, reason)
                    self._ot_study.tell(ot, None, state=optuna.trial.TrialState.FAIL)
                except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):
                    continue
                self._completed_trials.add(tid)
                closed.append(ot.number)
                if ot.params:
                    self._ot_study.enqueue_trial(dict(ot.params), user_attrs={"requeue_of": ot.number})
            return closed

    from ray.tune.search import Searcher

    return StudySearcher


def _error_text(trial: Any) -> str:
    """One line from Ray's record of a trial whose worker failed (e.g. killed when out of memory)."""
    text = ""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    try:
        if path and Path(path).is_file() and not str(path).endswith(".pkl"):
            lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
            text = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
    except OSError:
        pass
    return f"the Ray worker running this trial failed: {text or 'no error text (killed, e.g. by the OS when out of memory)'}"[:2000]


def make_callback(cfg: StudyConfig, total: int, log: Callable[[str], None], searcher: Any = None, queue: Any = None):
    from ray.tune import Callback

    class StudyCallback(Callback, _CallbackState):
        """Prints one progress line per finished trial; records why a Ray worker failed.

        Everything it uses is an attribute (not a closure variable) so that ``__getstate__`` can leave
        out what cannot be pickled (the log function's console, storages): Tune pickles its callbacks
        with the Tuner, and the pickled copy is never run.
        """

        def _progress(self, trial: Any, status: str) -> None:
            self._line(trial.config.get("optuna_trial_number", "?"), status)

        def screened(self, number: int, status: str) -> None:
            """A trial the searcher recorded before launching it (infeasible, or a repeat)."""
            self.done += 1
            self._line(number, status)

        def _line(self, number: Any, status: str) -> None:
            study = optuna.load_study(study_name=self.name, storage=self.storage)
            front = len(study.best_trials) if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else 0
            self.log(f"[{self.done}/{self.total}] trial {number} {status} | failed {self.failed} | front {front}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            result = trial.last_result or {}
            if result.get(PARTIAL):
                self._progress(trial, f"{result.get('method')} stopped after {result.get(EPOCH)} training epochs (validation accuracy {result.get(VAL_ACCURACY, math.nan):.4f})")
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
            self.failed += 1
            reason = _error_text(trial)
            if self.searcher is not None:
                self.searcher.close_errored(trial.trial_id, reason)
            self._progress(trial, f"FAILED: {reason[:160]}")

    cb = StudyCallback()
    cb.setup_state(total=total, url=cfg.storage_url, name=cfg.name, log=log, searcher=searcher, queue=queue)
    if searcher is not None:
        searcher.progress = cb  # screened trials never reach Tune: the searcher reports them
    return cb


class _CallbackState:
    """The callback's state, kept out of closures (cloudpickle pickles a local class's closures)."""

    def setup_state(self, *, total: int, url: str, name: str, log: Callable[[str], None], searcher: Any, queue: Any = None) -> None:
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


