"""A finished trial's record in the study: one writer, one shape.

Every path that finishes a trial writes it with :func:`write_trial`: a trained trial, a repeat of a
plan trained already (``duplicate_of``), a plan stopped before training because a cost bound breaks
(``infeasible``), a trial a scheduler stopped (``pruned_by``), an extra operating point of a trained
model (``derived_from``), a finalized model (``finalized_from``), a trial that failed and one that
was interrupted. Whatever its kind and whatever the study's objectives, a record holds:

- every field of :class:`~automl._metrics.Metrics` (:data:`~automl._metrics.MEASURED_KEYS`) as a user
  attribute of its own name: the number measured on *this trial's* model, or None where no model
  was measured (PRUNED and FAIL trials). The study's objectives are, in addition, the trial's
  Optuna values, which samplers, ``study.best_trials`` and optuna-dashboard read; a reader of the
  numbers reads the attributes alone (:func:`measured`);
- ``checkpoint``: the model's folder, relative to the study folder (None: no model was kept);
- Optuna constraint values for the study's bounds (``<= 0`` feasible), where it has bounds;
- the facts of its kind (``fail_reason``, ``duplicate_of``, ``dry_run``...).

Costs measured before training (the dry run of :mod:`automl._prescreen`) never sit under a
metric's name: they are the ``dry_run`` attribute, a mapping, on every trial that was screened.

This module imports no Ray and no torch: the searcher, finalize, crash recovery and the tests all
write through it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import optuna
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial, TrialState

from automl._metrics import MEASURED_KEYS, Metrics

__all__ = [
    "CHECKPOINT",
    "DERIVED_FROM",
    "DRY_RUN",
    "DUPLICATE_OF",
    "EPOCH",
    "FAIL_REASON",
    "FINALIZED_FROM",
    "INFEASIBLE",
    "INTERRUPTED",
    "METHOD",
    "PLAN_KEY",
    "PRUNED_BY",
    "RUN_ATTRS",
    "VAL_ACCURACY",
    "measured",
    "trained_plans",
    "trial_checkpoint",
    "write_duplicate",
    "write_trial",
]

#: The model's folder, relative to the study folder (None: no model was kept).
CHECKPOINT = "checkpoint"
#: The label of the plan the trial really is (``tucker+int8``).
METHOD = "method"
#: Why a trial failed (FAIL).
FAIL_REASON = "fail_reason"
#: True on a trial whose launcher stopped before it finished (FAIL; its parameters are re-queued).
INTERRUPTED = "interrupted"
#: A trial recorded from another trial's model (an extra operating point): the parent's number.
DERIVED_FROM = "derived_from"
#: A trial recorded from an earlier finished trial of the same plan: that trial's number.
DUPLICATE_OF = "duplicate_of"
#: A finalized trial (``automl finalize``): the number of the trial it continues.
FINALIZED_FROM = "finalized_from"
#: The canonical key of the plan a trial really is (:func:`automl._prescreen.plan_key`).
PLAN_KEY = "plan_key"
#: The costs of the trial's untrained final structure, a mapping (:func:`automl._prescreen.dry_run`).
DRY_RUN = "dry_run"
#: A trial stopped before training (PRUNED): the cost bounds it broke, as text.
INFEASIBLE = "infeasible"
#: A trial a scheduler stopped (PRUNED, never on the front): the scheduler's name.
PRUNED_BY = "pruned_by"
#: Training epochs a trial finished (all its stages together); set when it stopped early.
EPOCH = "epoch"
#: Validation accuracy after the last reported epoch (never test); set when a trial stopped early.
VAL_ACCURACY = "val_accuracy"
#: What a trial's run was, beside its numbers (a repeat of its plan is recorded with them too).
RUN_ATTRS: tuple[str, ...] = ("seconds", "attempts", "notes", "node", EPOCH, VAL_ACCURACY, PRUNED_BY)

_RESERVED = frozenset((*MEASURED_KEYS, CHECKPOINT))


def trial_checkpoint(number: int) -> str:
    """The checkpoint folder of search trial ``number``, relative to the study folder."""
    return f"checkpoints/trial_{number:05d}"


def write_trial(
    study: optuna.Study,
    trial: optuna.Trial | FrozenTrial | None,
    *,
    state: TrialState,
    objectives: Sequence[str] = (),
    metrics: Metrics | Mapping[str, Any] | None = None,
    constraints: Mapping[str, float] | None = None,
    checkpoint: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    distributions: Mapping[str, Any] | None = None,
) -> FrozenTrial:
    """Write one finished trial in the shape the module docstring describes; returns it as stored.

    The attributes and constraint values are written first and the state last, so a trial another
    process finished meanwhile (a second launcher closing the same interrupted trial) is left as
    that process wrote it: the storage refuses the writes. Writing the same record again (a write
    retried after a dropped connection, a journal replayed twice) returns the stored trial: a
    record is identified by its trial and stored once.

    Args:
        trial: the RUNNING trial to finish (``optuna.Trial`` from ``ask`` or a ``FrozenTrial``), or
            None to add a new finished trial with ``params`` and ``distributions``.
        state: ``COMPLETE``, ``PRUNED`` or ``FAIL``.
        objectives: the study's objective metric names, in the order of its directions.
        metrics: the numbers measured on this trial's model; a COMPLETE trial only, and it must
            hold a finite value for every objective.
        constraints: Optuna constraint values by bound name (finite).
        checkpoint: the model's folder relative to the study folder.
        attrs: the other user attributes (never a metric's name nor ``checkpoint``).

    Raises:
        ValueError: the record breaks one of the rules above.
        optuna.exceptions.UpdateFinishedTrialError: the trial was finished by another process.
    """
    if state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        raise ValueError(f"a finished trial's state is COMPLETE, PRUNED or FAIL, got {state.name}")
    numbers = metrics.as_dict() if isinstance(metrics, Metrics) else dict(metrics or {})
    if state != TrialState.COMPLETE and numbers:
        raise ValueError(f"a {state.name} trial has no measured model, got metrics {sorted(numbers)} (costs before training belong in {DRY_RUN!r})")
    unknown = sorted(set(numbers) - set(MEASURED_KEYS))
    if unknown:
        raise ValueError(f"metrics must be fields of Metrics ({', '.join(MEASURED_KEYS)}), got {unknown}")
    clash = sorted(_RESERVED & set(attrs or {}))
    if clash:
        raise ValueError(f"attrs may not hold {clash}: metrics are written from `metrics`, the checkpoint from `checkpoint`")
    values = None
    if state == TrialState.COMPLETE:
        values = [numbers.get(o) for o in objectives]
        if not objectives or any(v is None or not math.isfinite(float(v)) for v in values):
            raise ValueError(f"a COMPLETE trial needs a finite value for every objective {list(objectives)}, got {values}")
        values = [float(v) for v in values]
    bounds = {name: float(v) for name, v in (constraints or {}).items()}
    if any(not math.isfinite(v) for v in bounds.values()):
        raise ValueError(f"constraint values must be finite, got {bounds}")
    user_attrs = {k: numbers.get(k) for k in MEASURED_KEYS}
    user_attrs[CHECKPOINT] = checkpoint
    user_attrs.update(attrs or {})

    storage = study._storage
    if trial is None:
        frozen = optuna.trial.create_trial(
            state=state, values=values, params=dict(params or {}), distributions=dict(distributions or {}), user_attrs=user_attrs, constraints=bounds or None
        )
        if values is not None and len(values) != len(study.directions):
            raise ValueError(f"the study has {len(study.directions)} objectives, the record {len(values)} values")
        # Study.add_trial does exactly this but does not say which trial it added.
        trial_id = storage.create_new_trial(study._study_id, template_trial=frozen)
        return storage.get_trial(trial_id)
    try:
        for key, value in user_attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, value)
        for name, value in bounds.items():
            # What Trial.set_constraint stores; a FrozenTrial's own set_constraint would not reach the storage.
            storage.set_trial_system_attr(trial._trial_id, f"{_CONSTRAINTS_KEY}:{name}", value)
        return study.tell(trial if isinstance(trial, optuna.Trial) else trial.number, values, state=state)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        # Finished already: by this very record when a write committed but its answer was lost
        # to a dropped connection (the storage retried it), or when a journal entry is replayed
        # twice; then it is stored once and returned. Finished by anyone else, the error stands.
        stored = storage.get_trial(trial._trial_id)
        if not _same_record(stored, state, values, user_attrs):
            raise
        return stored


def _same_record(stored: FrozenTrial, state: TrialState, values: list[float] | None, user_attrs: Mapping[str, Any]) -> bool:
    """Whether a finished ``stored`` trial is the record ``state``/``values``/``user_attrs`` describe."""
    if stored.state != state or (stored.values or None) != (values or None):
        return False
    return all(stored.user_attrs.get(k) == user_attrs.get(k) for k in (CHECKPOINT, INTERRUPTED, FAIL_REASON, *MEASURED_KEYS))


def measured(trial: FrozenTrial) -> dict[str, Any]:
    """The numbers measured on a trial's model, by metric (None where none was measured)."""
    return {k: trial.user_attrs.get(k) for k in MEASURED_KEYS}


def write_duplicate(study: optuna.Study, trial: optuna.Trial | FrozenTrial, first: FrozenTrial, *, objectives: Sequence[str], attrs: Mapping[str, Any]) -> FrozenTrial:
    """Record ``trial`` as a repeat of ``first``, a finished trial of the same plan, without training it.

    Training is seeded, so the repeat would reach the same model: it takes ``first``'s state,
    numbers, constraint values, checkpoint and run (:data:`RUN_ATTRS`: a plan a scheduler stopped
    stays stopped); ``attrs`` are the repeat's own (its dry run, its plan).
    """
    complete = first.state == TrialState.COMPLETE
    run = {k: first.user_attrs[k] for k in RUN_ATTRS if k in first.user_attrs}
    return write_trial(
        study, trial, state=first.state, objectives=objectives,
        metrics={k: v for k, v in measured(first).items() if v is not None} if complete else None,
        constraints=first.constraints, checkpoint=first.user_attrs.get(CHECKPOINT),
        attrs={**run, **attrs, DUPLICATE_OF: first.number},
    )


def trained_plans(study: optuna.Study) -> dict[str, FrozenTrial]:
    """Plan key -> the first trial that trained that plan to its end (COMPLETE) or until a
    scheduler stopped it (PRUNED with ``pruned_by``); never a repeat, a variant or a finalized
    model. Training is seeded, so the same plan would reach the same model again."""
    out: dict[str, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        key = t.user_attrs.get(PLAN_KEY)
        stopped = t.state == TrialState.PRUNED
        if not key or DUPLICATE_OF in t.user_attrs or DERIVED_FROM in t.user_attrs or (stopped and PRUNED_BY not in t.user_attrs):
            continue
        if key not in out or (out[key].state == TrialState.PRUNED and not stopped):
            out[key] = t  # a trained-to-the-end trial of the plan wins over a stopped one
    return out
