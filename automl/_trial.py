"""One trial: apply a plan's chain of methods to the base, fine-tune, measure, save.

Nothing here knows about Ray or Optuna's storage: the same function runs under Ray Tune, under a
plain ``study.optimize`` loop (benchmarks) and in tests.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

import searchspace
from searchspace import ApplyContext, Calibrated, CompressionMethod, Plan, SensitivityProfile
from automl._artifact import ArtifactError
from automl._checkpoint import variant_folder, weights_only_state
from automl._data import Splits
from automl._latency import LatencySettings, yield_point
from automl._measure import Metrics, count_macs, measure
from automl._train import TrainOptions, TrialFailed, fit

#: Validation samples a :class:`searchspace.Calibrated` model fits its settings on (the first this many).
CALIBRATION_SAMPLES = 5000

__all__ = ["TrialOutcome", "TrialSettings", "Variant", "apply_chain", "run_trial"]


@dataclass
class Variant:
    """Another operating point of a trial's trained model: parameter overrides, state, metrics,
    and its own artifact files (``folder``) and weights, measured and checkpointed as its own."""

    params: dict[str, Any]
    state: dict[str, Any]
    metrics: Metrics
    folder: Path
    weights: dict[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "state": self.state, "metrics": self.metrics.as_dict()}


@dataclass(frozen=True)
class TrialSettings:
    """The parts of a study config a trial needs (kept small: it travels to every worker)."""

    epochs: int
    lr: float
    batch_size: int
    latency: LatencySettings
    seed: int = 0
    calibration_batches: int = 8
    #: Optimiser, schedule and loss options of fine-tuning (``TrainOptions`` keywords).
    recipe: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any) -> TrialSettings:
        return cls(
            epochs=cfg.budget.epochs,
            lr=cfg.budget.lr,
            batch_size=cfg.budget.batch_size,
            latency=cfg.latency.settings(),
            seed=cfg.seed,
            recipe=cfg.budget.recipe(),
        )


@dataclass
class TrialOutcome:
    plan: Plan
    metrics: Metrics
    model: nn.Module
    #: Where the measured artifact files are (the checkpoint copies them).
    folder: Path
    input_shape: tuple[int, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: Extra operating points of the same trained model (see :class:`searchspace.Calibrated`).
    variants: list[Variant] = field(default_factory=list)
    #: The float model the first post-training stage (int8) started from, and how many stages of
    #: the chain made it: what finalize fine-tunes before it replays the post-training stages.
    float_model: nn.Module | None = None
    float_stages: int = 0
    #: The base's sensitivity profile the chain's methods read (None: the study has none); the
    #: checkpoint keeps it so that the plan replays to the same structure.
    profile: SensitivityProfile | None = None


def run_trial(
    plan: Plan,
    base: nn.Module,
    data: Splits,
    settings: TrialSettings,
    *,
    folder: str | Path,
    methods: Mapping[str, CompressionMethod] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[Any], None] | None = None,
    profile: SensitivityProfile | None = None,
) -> TrialOutcome:
    """Apply ``plan`` to a copy of ``base``, fine-tune after each training stage, and measure.

    Args:
        folder: where the measured artifact files are written (one sub-folder per extra setting).
        methods: configured method instances by name (defaults: registered classes, full ranges).
        progress: receives each training epoch's :class:`~automl._progress.EpochStats`.
        profile: the study's sensitivity profile of the base (``ApplyContext.profile``).

    Raises:
        TrialFailed: a stage cannot apply, training diverged, or the model cannot become the
            runtime's artifact (the reason says which).
    """
    folder = Path(folder)
    start = time.perf_counter()
    base = base.eval()
    example = data.example().to(device)
    teacher = copy.deepcopy(base).to(device) if plan.finetune.get("distill") else None
    # What this process trains with (the study's thread plan, automl._threads), for the record.
    notes: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "nice": os.nice(0)}

    def train(module: nn.Module, *, epochs: int | None = None, extra_loss: Any = None, seed_offset: int = 0) -> nn.Module:
        opts = TrainOptions(
            epochs=settings.epochs if epochs is None else epochs,
            lr=settings.lr,
            batch_size=settings.batch_size,
            teacher=teacher,
            temperature=plan.finetune.get("distill.temperature", 4.0),
            distill_weight=plan.finetune.get("distill.weight", 0.5),
            seed=settings.seed + seed_offset,
            **settings.recipe,
        )
        return fit(module, data, opts, device=device, extra_loss=extra_loss, progress=progress)

    def calibration():
        return ((x.to(device), y.to(device)) for x, y in data.batches("train", settings.batch_size, shuffle=True, seed=settings.seed))

    kept: dict[str, Any] = {}
    model, float_macs = apply_chain(plan, base, example=example, calibration=calibration, train=train, methods=methods, notes=notes, device=device, keep=kept, profile=profile)
    if model is base:
        model = copy.deepcopy(base)
    model.eval()
    cpu_model = model.to("cpu")
    variants: list[Variant] = []
    try:
        if isinstance(cpu_model, Calibrated):
            # Settings fitted on the validation split after training; every extra one is measured
            # as its own point, then the trial's own setting is restored and measured last.
            # The settings differ only in buffers the artifact keeps as named initializers, so the
            # first setting's files are captured and exported and the others reuse them (``like``).
            options = cpu_model.calibrate(*data.tensors("val", limit=CALIBRATION_SAMPLES))
            for k, option in enumerate(options[1:]):
                cpu_model.use_setting(option)
                where = folder / variant_folder(k)
                metrics, _ = measure(cpu_model, data, settings.latency, folder=where, macs=float_macs, like=variants[0].folder if variants else None)
                variants.append(Variant(dict(option["params"]), dict(option["state"]), metrics, where, copy.deepcopy(weights_only_state(cpu_model))))
            cpu_model.use_setting(options[0])
            notes["calibrated"] = options[0]["state"]
        metrics, _ = measure(cpu_model, data, settings.latency, folder=folder, macs=float_macs, like=variants[0].folder if variants else None)
    except ArtifactError as exc:
        raise TrialFailed(str(exc)) from exc
    if not math.isfinite(metrics.accuracy):
        raise TrialFailed("accuracy is not finite")
    return TrialOutcome(
        plan=plan, metrics=metrics, model=cpu_model, folder=folder, input_shape=tuple(example.shape[1:]),
        notes=notes, seconds=time.perf_counter() - start, variants=variants,
        float_model=kept.get("float"), float_stages=kept.get("stages", 0), profile=profile,
    )


def apply_chain(
    plan: Plan,
    base: nn.Module,
    *,
    example: torch.Tensor,
    calibration: Any,
    train: Any,
    methods: Mapping[str, CompressionMethod] | None = None,
    notes: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    start: nn.Module | None = None,
    dry_run: bool = False,
    keep: dict[str, Any] | None = None,
    profile: SensitivityProfile | None = None,
) -> tuple[nn.Module, int | None]:
    """Apply ``plan``'s methods to ``base`` in order, calling ``train(module, seed_offset=i)`` after
    each stage that fine-tunes; returns the final model (``base`` itself for an empty chain) and the
    MACs of the float model a post-training stage started from (None if there is none).

    ``start`` is the model the first stage gets (default ``base``, which stays the teacher).
    The trial runs it with its fine-tuning; the dry run (:mod:`automl._prescreen`) with a ``train``
    that returns the module untouched, which gives the same structure without training.
    ``keep`` (a dict) receives a CPU copy of the float model the first post-training stage gets
    (``"float"``) and the number of stages before it (``"stages"``). ``profile`` reaches every
    method as ``ApplyContext.profile``.

    Raises:
        TrialFailed: a stage cannot apply to the model it gets.
    """
    notes = {} if notes is None else notes
    model: nn.Module = base if start is None else start
    float_macs: int | None = None
    for i, (name, params) in enumerate(plan.chain):
        yield_point()  # a measurement waiting on the node goes first (automl._latency: isolation)
        method = (methods or {}).get(name) or searchspace.get_method(name)()
        reason = method.supports(model)
        if reason is not None:
            raise TrialFailed(f"{name} cannot apply: {reason}")
        if not method.finetune and float_macs is None:
            # Post-training stages (int8) change the arithmetic, not the graph: MACs are those of
            # the float model they start from (a quantised graph may not trace at all).
            float_macs = count_macs(copy.deepcopy(model).cpu().eval(), example.cpu())
        if not method.finetune and keep is not None and "float" not in keep:
            keep.update(float=copy.deepcopy(model).cpu().eval(), stages=i)
        ctx = ApplyContext(example_input=example, calibration=calibration, fit=train, base=base, notes=notes, dry_run=dry_run, profile=profile)
        model = method.apply(model, params, context=ctx)
        if method.finetune:
            model = train(model.to(device), seed_offset=i + 1)
            float_macs = None
    return model, float_macs
