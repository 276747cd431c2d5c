"""Finalize: the long fine-tune of a chosen trial's model, stored in the study as a trial of its own.

Compression pipelines in the literature (ThiNet, AMC, NetAdapt, Tucker by Kim et al.) end with a
long fine-tune of the chosen model; a search trial gets a few epochs. :func:`finalize_trial`
rebuilds the trial's model from its checkpoint (:func:`automl.load_model`, plan + weights),
continues its fine-tuning with the study's recipe for ``epochs`` more (distilled from the base when
the trial's plan was; early stopping, the kept epoch chosen on validation accuracy, never test,
the model as searched being epoch 0, kept where no epoch beats it),
re-fits inference-time settings (exit thresholds) on validation data, and measures the result with
the one :func:`automl._measure.measure`. It trains where trials train: a Ray task with the trial
resources when the study asks for GPUs (as the base does, :mod:`automl._study`), else in-process.

The result is a new COMPLETE trial, recorded as every trial is
(:func:`automl._records.write_trial`): the parent's parameters, its own checkpoint folder
(``checkpoints/finalized_PPPPP``, ``_2``... for later runs), the user attribute ``finalized_from``
= parent number, and ``finalize`` (epochs, lr, validation curve, kept epoch).
Like derived trials it is not a search run: it never counts toward the budget
(:func:`automl._recovery.finished_count`).

Post-training stages (int8) are not fine-tuned: finalize fine-tunes the float model they started
from (the checkpoint's ``float/``), then replays them with their own ``apply`` on the study's
training batches, as the trial did, and measures the result.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from torch import nn

import searchspace
from searchspace import Plan
from automl._checkpoint import FLOAT_FOLDER, CheckpointError, load_checkpoint, save_checkpoint
from automl._config import StudyConfig
from automl._measure import measure
from automl._rebuild import checkpoint_profile, load_model
from automl._records import CHECKPOINT, FINALIZED_FROM, METHOD, write_trial
from automl._threads import ThreadPlan, set_threads, training_threads
from automl._train import TrainOptions, TrialFailed, fit
from automl._trial import CALIBRATION_SAMPLES, Calibrated, TrialOutcome, apply_chain

__all__ = ["FinalizeError", "finalize_recipe", "finalize_trial", "finalized_version"]

#: Epochs without a better validation accuracy before finalize stops.
PATIENCE = 5


class FinalizeError(RuntimeError):
    """Finalize cannot run for this input (the message is one line for the user)."""


def finalized_version(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial | None:
    """The latest COMPLETE finalized trial of trial ``number``, or None."""
    done = [
        t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get(FINALIZED_FROM) == number
    ]
    return max(done, key=lambda t: t.number) if done else None


def finalize_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The study's training recipe for finalize: the same, but a one-cycle schedule becomes cosine.

    Finalize continues a model the search already fine-tuned. One-cycle warms the rate up over its
    first 30 % of steps, and early stopping (patience 5) judged those epochs: on the MNIST-1D study
    every run stopped inside the warm-up, with validation accuracy falling as the rate rose, so the
    low-rate phase where a long fine-tune gains never ran. Cosine decays from ``--lr`` from the first
    step. ``cosine`` and ``constant`` are kept as the study set them.
    """
    out = dict(recipe)
    if out.get("schedule") == "onecycle":
        out["schedule"] = "cosine"
    return out


def _continue(model: nn.Module, teacher: nn.Module | None, data: Any, options: TrainOptions, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` with early stopping; returned on the CPU with its validation history."""
    history: dict[str, Any] = {}
    options = dataclasses.replace(options, teacher=teacher)
    model = fit(model, data, options, device=device, history=history).cpu().eval()
    if "kept_epoch" not in history:  # nothing to train (no trainable parameter): the model as it was
        history.update(val_accuracy=[], kept_epoch=0)
    return model, history


def _calibrate(model: nn.Module, data: Any, params: dict[str, Any], history: dict[str, Any]) -> None:
    """Fine-tuning moved the confidences: fit the settings (exit thresholds) again, the parent's
    own (its parameter overrides when the parent is itself an extra operating point)."""
    if isinstance(model, Calibrated):
        options = model.calibrate(*data.tensors("val", limit=CALIBRATION_SAMPLES))
        chosen = next((o for o in options if dict(o["params"]) == params), options[0])
        model.use_setting(chosen)
        history["calibrated"] = chosen["state"]


def _task(model: nn.Module, teacher: nn.Module | None, data: Any, options: TrainOptions, gpus: float, cpus: float) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Ray task: the fine-tune on the task's device (a GPU where the trial resources ask for one)."""
    from automl._cluster import assigned_device

    set_threads(training_threads(cpus))
    device, where = assigned_device(gpus)
    model, history = _continue(model, teacher, data, options, device)
    return model, history, where


def finalize_trial(
    cfg: StudyConfig,
    study: optuna.Study,
    number: int,
    *,
    epochs: int,
    lr: float | None = None,
    log: Callable[[str], None] = print,
) -> optuna.trial.FrozenTrial:
    """Finalize trial ``number`` of ``study`` (see the module doc); returns the new trial.

    Raises:
        FinalizeError: no such trial, not COMPLETE, epochs < 1, no (rebuildable) checkpoint, or
            a plan that fine-tunes after a post-training stage.
    """
    from automl._data import dataset_from_config
    from automl._study import prepare_base

    ThreadPlan.from_config(cfg).apply()
    if epochs < 1:
        raise FinalizeError(f"--epochs must be >= 1, got {epochs}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise FinalizeError(f"--lr must be a positive number, got {lr}")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    parent = trials.get(number)
    if parent is None:
        raise FinalizeError(f"--trial {number}: study {study.study_name!r} has no trial {number}")
    if parent.state != optuna.trial.TrialState.COMPLETE:
        raise FinalizeError(f"--trial {number}: that trial is {parent.state.name}, only COMPLETE trials can be finalized")
    study_dir = cfg.study_dir
    rel = parent.user_attrs.get(CHECKPOINT)
    if not rel:
        raise FinalizeError(f"--trial {number}: it has no checkpoint recorded (user attr 'checkpoint' is missing)")
    try:
        ckpt = load_checkpoint(study_dir / str(rel))
    except CheckpointError as exc:
        raise FinalizeError(f"--trial {number}: {exc}") from exc
    plan = Plan.from_dict(ckpt.record["plan"])
    methods = cfg.method_instances()
    post = [i for i, (n, _) in enumerate(plan.chain) if not (methods.get(n) or searchspace.get_method(n)()).finetune]
    split = post[0] if post else len(plan.chain)
    tail = Plan(chain=plan.chain[split:], finetune=dict(plan.finetune))
    if any((methods.get(n) or searchspace.get_method(n)()).finetune for n, _ in tail.chain):
        raise FinalizeError(f"--trial {number}: its plan {plan.label} fine-tunes after a post-training stage; finalize cannot replay that")
    source = ckpt.folder
    if tail.chain:
        # Post-training stages are not fine-tuned: the float model they started from is.
        source = ckpt.folder / FLOAT_FOLDER
        if not source.is_dir():
            raise FinalizeError(f"--trial {number}: its plan ends in {tail.label}, but its checkpoint has no {FLOAT_FOLDER}/ model to fine-tune (written before finalize kept it)")

    data = dataset_from_config(cfg.dataset, download=False)
    try:
        model = load_model(source, data=data, methods=methods)
    except CheckpointError as exc:
        raise FinalizeError(f"--trial {number}: {exc}") from exc
    teacher = None
    if plan.finetune.get("distill"):
        teacher, _ = prepare_base(cfg, data, study_dir, log=log)  # cached: loads base/weights.pt
    options = TrainOptions(
        epochs=epochs,
        lr=lr if lr is not None else cfg.budget.lr,
        batch_size=cfg.budget.batch_size,
        temperature=plan.finetune.get("distill.temperature", 4.0),
        distill_weight=plan.finetune.get("distill.weight", 0.5),
        seed=cfg.seed + 1000 + number,
        patience=PATIENCE,
        keep_start=True,  # the model as the search left it is epoch 0: kept if no epoch beats it
        **finalize_recipe(cfg.budget.recipe()),
    )
    params_override = dict(ckpt.record.get("params_override") or {})
    log(f"finalize: trial {number} ({plan.label}), up to {epochs} epochs at lr {options.lr:g}{', distilled from the base' if teacher is not None else ''}, patience {PATIENCE}")
    start = time.perf_counter()
    try:
        if cfg.resources.gpus > 0:
            import ray

            from automl._study import init_ray

            init_ray(cfg)
            task = ray.remote(num_cpus=cfg.resources.cpus, num_gpus=cfg.resources.gpus)(_task)
            model, history, where = ray.get(task.remote(model, teacher, data, options, cfg.resources.gpus, cfg.resources.cpus))
        else:
            model, history = _continue(model, teacher, data, options, "cpu")
            where = {"device": "cpu"}
    except TrialFailed as exc:
        raise FinalizeError(f"--trial {number}: fine-tuning failed: {exc}") from exc
    float_model, float_macs = None, None
    notes_tail: dict[str, Any] = {}
    if tail.chain:
        # The post-training stages replayed by their own apply, calibrated on training batches as in a trial.
        float_model = model
        try:
            model, float_macs = apply_chain(
                tail, float_model, example=data.example(), methods=methods, notes=notes_tail, train=lambda m, **_: m,
                calibration=lambda: iter(data.batches("train", cfg.budget.batch_size, shuffle=True, seed=cfg.seed)),
                profile=checkpoint_profile(ckpt.record),
            )
        except (TrialFailed, ValueError, RuntimeError) as exc:
            raise FinalizeError(f"--trial {number}: replaying {tail.label} after the fine-tune failed: {exc}") from exc
        model = model.cpu().eval()
    _calibrate(model, data, params_override, history)
    kept = history["kept_epoch"]
    kept_val = history["val_accuracy"][kept - 1] if kept else history.get("start_val_accuracy", float("nan"))
    log(
        f"finalize: kept epoch {kept} of {len(history['val_accuracy'])} (validation accuracy {kept_val:.4f}"
        f"{'; epoch 0 is the model as searched: no epoch beat it' if kept == 0 else ''}) on {where['device']}"
    )

    with tempfile.TemporaryDirectory() as work:
        metrics, _ = measure(model, data, cfg.latency.settings(), folder=Path(work) / "artifact", macs=float_macs)
        notes = {**ckpt.record.get("notes", {}), **notes_tail, **where}
        if "calibrated" in history:
            notes["calibrated"] = history["calibrated"]
        outcome = TrialOutcome(
            plan=plan, metrics=metrics, model=model, folder=Path(work) / "artifact", input_shape=tuple(data.input_shape), notes=notes,
            seconds=time.perf_counter() - start, float_model=float_model, float_stages=split if float_model is not None else 0,
            profile=checkpoint_profile(ckpt.record),
        )
        name = f"finalized_{number:05d}"
        k = 1
        while (study_dir / "checkpoints" / name).exists():
            k += 1
            name = f"finalized_{number:05d}_{k}"
        save_checkpoint(outcome, study_dir / "checkpoints" / name, base=ckpt.record["base"])

    finalize_info = {
        "epochs": epochs, "lr": options.lr, "schedule": options.schedule, "patience": PATIENCE, "kept_epoch": history["kept_epoch"], "val_accuracy": history["val_accuracy"],
        "start_val_accuracy": history.get("start_val_accuracy"), "distilled": teacher is not None,
    }
    return write_trial(
        study, None, state=optuna.trial.TrialState.COMPLETE, objectives=[o.metric for o in cfg.objectives], metrics=metrics,
        # The config's bounds, as every trial records them (what keeps an infeasible model off the front).
        constraints=None if cfg.constraints.empty else cfg.constraints.violations(metrics.as_dict()),
        checkpoint=f"checkpoints/{name}",
        attrs={FINALIZED_FROM: number, METHOD: parent.user_attrs.get(METHOD, plan.label), "finalize": finalize_info, "seconds": outcome.seconds, "notes": notes},
        params=dict(parent.params), distributions=dict(parent.distributions),
    )
