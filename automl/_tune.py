"""The trainable: one trial run in a Ray worker, and the results it reports to Ray Tune.

The searcher that asks Optuna for plans and records every trial is :mod:`automl._searcher`; study
preparation is :mod:`automl._study`; the run loop :mod:`automl._search`. This module imports Ray
only inside the functions a worker runs, so the run loop can import it without starting Ray.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

from searchspace import Plan
from automl._checkpoint import save_checkpoint
from automl._cluster import assigned_device, full_folder, pack_folder
from automl._latency import busy, gated_batches, idle
from automl._metrics import METRIC_KEYS
from automl._progress import LONG_TRIAL_S, sender
from automl._records import EPOCH, FAIL_REASON, VAL_ACCURACY
from automl._recovery import guarded
from automl._study import Payload
from automl._threads import set_threads, training_threads
from automl._trial import run_trial

__all__ = ["COSTS", "DISK_FULL", "EPOCH", "FAIL_REASON", "PARTIAL", "VAL_ACCURACY", "VARIANTS", "trial_function"]

#: Result key of a trial's extra operating points (see ``automl._trial.Calibrated``).
VARIANTS = "variants"
#: Result key marking an intermediate result (one training epoch), not the trial's measured outcome.
PARTIAL = "partial"
#: Config key the searcher adds to a trial's Ray config: its dry-run costs (automl._prescreen).
COSTS = "costs"
#: Result key of a trial that failed because a write found no room: the folder that is full. The
#: searcher then stops the study (the trial is re-queued for ``resume``) instead of going on.
DISK_FULL = "disk_full"
# Result keys shared with the record: FAIL_REASON (why the trial failed), EPOCH (Ray Tune's time
# attribute for the scheduler: training epochs so far), VAL_ACCURACY (after the last epoch, never test).


def trial_function(config: dict[str, Any], payload: Payload) -> dict[str, Any]:
    """Run one trial from a Ray Tune config; returns the result dict (never raises for trial faults)."""
    from ray import tune

    from automl._plugins import import_plugins

    import_plugins(payload.plugins)
    set_threads(training_threads(payload.cpus))
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

        full: list[str] = []

        def attempt() -> Any:
            try:
                with busy(isolate):
                    return run_trial(
                        plan, payload.base, data, payload.settings, folder=Path(work) / "artifact", methods=payload.methods, device=device, progress=progress,
                        profile=payload.profile,
                    )
            except OSError as exc:
                if full_folder(exc) is not None:
                    full.append(tempfile.gettempdir())  # the artifact files go to this node's temp folder
                raise

        outcome, reason, attempts = guarded(attempt, time_limit_s=payload.time_limit_s, retries=payload.retries)
        if outcome is None:
            return _report_failure(plan, reason or "", attempts, full[-1] if full else None)
        try:
            return _report_outcome(config, payload, plan, outcome, attempts, where, Path(work) / "checkpoint")
        except _CheckpointNotWritten as exc:
            return _report_failure(plan, exc.reason, attempts, exc.folder)


class _CheckpointNotWritten(Exception):
    """A trained trial's checkpoint found no room (in the node's temp folder or the study folder)."""

    def __init__(self, reason: str, folder: str) -> None:
        super().__init__(reason)
        self.reason, self.folder = reason, folder


def _report_failure(plan: Plan, reason: str, attempts: int, full: str | None) -> dict[str, Any]:
    """Report a trial that failed with ``reason``; ``full``: the folder a write found full."""
    from ray import tune

    # Every metric present (NaN): Tune rejects a result without the searched metrics and
    # would end the whole study; the searcher records the trial as FAIL by its fail_reason.
    result = {**{m: math.nan for m in METRIC_KEYS}, FAIL_REASON: reason, "method": plan.label, "attempts": attempts, PARTIAL: False}
    if full is not None:
        result[DISK_FULL] = full
    tune.report(result)
    return result


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
    :mod:`automl._prescreen`) under the metric names, for the scheduler to rank on (the trial's
    record keeps them under ``dry_run`` only), ``accuracy`` as NaN (Tune requires every searched
    metric in every result; the test accuracy is measured only at the end), and ``PARTIAL``. The
    final result and the checkpoint are reported by :func:`_report_outcome`. Ray Tune ends a trial its scheduler stops inside ``tune.report`` (``SystemExit`` in the
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

        try:
            save_checkpoint(outcome, folder, base=payload.base_ref)
            ray.get(payload.sink.write.remote(int(number), pack_folder(folder)))
        except Exception as exc:
            full = full_folder(exc)
            if full is None:
                raise
            # The sink names the study's checkpoints folder; a local write failed in this node's temp folder.
            where_full = full if isinstance(exc, ray.exceptions.RayError) else tempfile.gettempdir()
            raise _CheckpointNotWritten(f"OSError: no space left on device: the checkpoint could not be written to {where_full}", where_full) from exc
    tune.report(result)
    return result


def _node_id() -> str | None:
    """The Ray node that ran the trial (user attr ``node``: which machine of a cluster measured it)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests, benchmarks) there is no node
        return None
