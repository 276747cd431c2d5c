"""One trial: apply a plan's chain of methods to the base, fine-tune, measure, save.

Nothing here knows about Ray or Optuna's storage: the same function runs under Ray Tune, under a
plain ``study.optimize`` loop (benchmarks) and in tests.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

import searchspace
from searchspace import ApplyContext, CompressionMethod, Plan
from automl._data import Splits
from automl._measure import LatencySettings, Metrics, count_macs, measure
from automl._train import TrainOptions, TrialFailed, fit

#: Validation samples a :class:`Calibrated` model fits its settings on (the first this many).
CALIBRATION_SAMPLES = 5000

__all__ = ["Calibrated", "TrialOutcome", "TrialSettings", "Variant", "load_checkpoint", "run_trial", "save_checkpoint"]


@runtime_checkable
class Calibrated(Protocol):
    """A trained model with inference-time settings fitted on the validation split (e.g. exit
    thresholds), each of which is an operating point worth measuring without retraining.

    ``calibrate(x_val, y_val)`` fits them and returns the settings, the trial's own first; each is
    ``{"params": {optuna name: value} overriding the trial's parameters, "state": {...} JSON-able
    record of what was set}``. ``use_setting(setting)`` puts the model in one of them, in place.
    """

    def calibrate(self, x_val: torch.Tensor, y_val: torch.Tensor) -> list[dict[str, Any]]: ...

    def use_setting(self, setting: Mapping[str, Any]) -> None: ...


@dataclass
class Variant:
    """Another operating point of a trial's trained model: parameter overrides, state, metrics."""

    params: dict[str, Any]
    state: dict[str, Any]
    metrics: Metrics

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
        lat = cfg.latency
        return cls(
            epochs=cfg.budget.epochs,
            lr=cfg.budget.lr,
            batch_size=cfg.budget.batch_size,
            latency=LatencySettings(
                batch_size=lat.batch_size, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats,
                isolate=lat.isolate, max_spread=lat.max_spread, max_attempts=lat.max_attempts,
            ),
            seed=cfg.seed,
            recipe=cfg.budget.recipe(),
        )


@dataclass
class TrialOutcome:
    plan: Plan
    metrics: Metrics
    model: nn.Module
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: Extra operating points of the same trained model (see :class:`Calibrated`).
    variants: list[Variant] = field(default_factory=list)


def run_trial(
    plan: Plan,
    base: nn.Module,
    data: Splits,
    settings: TrialSettings,
    *,
    methods: Mapping[str, CompressionMethod] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[Any], None] | None = None,
) -> TrialOutcome:
    """Apply ``plan`` to a copy of ``base``, fine-tune after each training stage, and measure.

    Args:
        methods: configured method instances by name (defaults: registered classes, full ranges).
        progress: receives each training epoch's :class:`~automl._progress.EpochStats`.

    Raises:
        TrialFailed: a stage cannot apply, or training diverged.
    """
    start = time.perf_counter()
    base = base.eval()
    example = data.example().to(device)
    teacher = copy.deepcopy(base).to(device) if plan.finetune.get("distill") else None
    notes: dict[str, Any] = {}
    model: nn.Module = base
    float_macs: int | None = None

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

    for i, (name, params) in enumerate(plan.chain):
        method = (methods or {}).get(name) or searchspace.get_method(name)()
        reason = method.supports(model)
        if reason is not None:
            raise TrialFailed(f"{name} cannot apply: {reason}")
        if not method.finetune and float_macs is None:
            # Post-training stages (int8) change the arithmetic, not the graph: MACs are those of
            # the float model they start from (a quantised graph may not trace at all).
            float_macs = count_macs(copy.deepcopy(model).cpu().eval(), example.cpu())
        ctx = ApplyContext(example_input=example, calibration=calibration, fit=train, base=base, notes=notes)
        model = method.apply(model, params, context=ctx)
        if method.finetune:
            model = train(model.to(device), seed_offset=i + 1)
            float_macs = None
    if model is base:
        model = copy.deepcopy(base)
    model.eval()
    cpu_model = model.to("cpu")
    variants: list[Variant] = []
    if isinstance(cpu_model, Calibrated):
        # Settings fitted on the validation split after training; every extra one is measured as
        # its own point, then the trial's own setting is restored and measured last.
        options = cpu_model.calibrate(*data.tensors("val", limit=CALIBRATION_SAMPLES))
        for option in options[1:]:
            cpu_model.use_setting(option)
            variants.append(Variant(dict(option["params"]), dict(option["state"]), measure(cpu_model, data, settings.latency, macs=float_macs)))
        cpu_model.use_setting(options[0])
        notes["calibrated"] = options[0]["state"]
    metrics = measure(cpu_model, data, settings.latency, macs=float_macs)
    if not math.isfinite(metrics.accuracy):
        raise TrialFailed("accuracy is not finite")
    return TrialOutcome(plan=plan, metrics=metrics, model=cpu_model, notes=notes, seconds=time.perf_counter() - start, variants=variants)


def _to_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(model)
    except Exception:  # noqa: BLE001 - fall back to tracing for models script cannot compile
        with torch.no_grad():
            return torch.jit.trace(model, example, check_trace=False)


def _weights_only_state(model: nn.Module) -> dict[str, Any]:
    """The state dict with quantised packed parameters (TorchScript objects) replaced by their
    tensors, so the file loads with ``torch.load(weights_only=True)``."""
    state = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):
            value = value.__getstate__()
        state[key] = value
    return state


def save_checkpoint(outcome: TrialOutcome, directory: str | Path, *, example: torch.Tensor) -> Path:
    """Write what export needs: TorchScript model, weights-only state dict, and ``trial.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = outcome.model.eval()
    _to_torchscript(model, example).save(str(d / "model.ts"))
    torch.save(_weights_only_state(model), d / "weights.pt")
    record = {
        "plan": outcome.plan.to_dict(),
        "label": outcome.plan.label,
        "metrics": outcome.metrics.as_dict(),
        "notes": outcome.notes,
        "seconds": outcome.seconds,
        "input_shape": list(example.shape[1:]),
        "variants": [v.as_dict() for v in outcome.variants],
    }
    (d / "trial.json").write_text(json.dumps(record, indent=2, default=str))
    return d


def load_checkpoint(directory: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a trial's TorchScript model and record; raises ``FileNotFoundError``/``ValueError``."""
    d = Path(directory)
    record_path, model_path = d / "trial.json", d / "model.ts"
    if not record_path.is_file() or not model_path.is_file():
        raise FileNotFoundError(f"checkpoint folder must hold model.ts and trial.json, got {d}")
    try:
        record = json.loads(record_path.read_text())
        model = torch.jit.load(str(model_path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupted checkpoint
        raise ValueError(f"checkpoint {d} is corrupted: {type(exc).__name__}: {exc}") from exc
    return model, record

