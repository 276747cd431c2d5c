"""Costs before training: a dry run of a plan's chain, and the decisions it allows before a trial trains.

The architecture of a trial's final model follows from its plan (pruning ratios, ranks, widths,
int8), not from its trained weights. :func:`dry_run` applies the chain with a ``fit`` that returns
the module's structure untouched (:func:`automl._trial.apply_chain`, the code the trial runs) and measures the
result with :func:`automl._measure.measure`, the one measurement: params, size, MACs and latency
(on the artifact). The untrained model's accuracy is meaningless and is never kept.

Where a method's costs depend on training (``CompressionMethod.costs_after_training``: early exits,
whose thresholds are fitted after training and decide the expected MACs and latency) the dry run's
MACs and latency are not final (nobody exits early before calibration, so they are upper bounds)
and neither is the artifact's size (the thresholds are in its graph); ``params`` and the state
dict's bytes are final for every method. A trial's recorded numbers are always
those of its trained model.

:class:`Screen` is what the searcher asks before it launches a trial: stop it if a known cost breaks
a bound of ``constraints:``, record it against an earlier finished trial if the plan it really is
(stages that converted no layer are recognised from their notes,
``CompressionMethod.converted_nothing``) was trained already.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

import searchspace
from searchspace import CompressionMethod, Plan, SensitivityProfile, Stage
from automl._constraints import Constraints
from automl._latency import busy, gated_batches
from automl._measure import measure
from automl._metrics import METRIC_KEYS, Metrics
from automl._trial import TrialSettings, apply_chain

__all__ = ["COST_KEYS", "COST_METRICS", "Costs", "Screen", "Verdict", "dry_run", "plan_key"]

#: The numbers a dry run records: every scalar metric but accuracy.
COST_KEYS: tuple[str, ...] = tuple(k for k in METRIC_KEYS if k != "accuracy")
#: The costs a bound of ``constraints:`` may name (and may stop a trial before training).
COST_METRICS: tuple[str, ...] = ("params", "size_bytes", "macs", "latency_ms")
#: Costs that follow from the plan for every method (final even when ``Costs.final`` is False).
#: Not ``size_bytes``: an early-exit artifact holds its fitted thresholds in its graph, and its
#: file size moves by a few hundred bytes with them (the state dict's bytes do not).
PLAN_COSTS: tuple[str, ...] = ("params", "state_dict_bytes")


@dataclass(frozen=True)
class Costs:
    """A plan's costs: the :class:`~automl._metrics.Metrics` of its untrained final structure."""

    #: Measured without a test pass: ``accuracy`` is NaN (an untrained model's means nothing).
    metrics: Metrics
    #: False where a method's MACs/latency depend on training (only PLAN_COSTS are final then).
    final: bool
    #: The plan it really is: a structure stage that converted no layer becomes ``none``.
    plan: Plan
    #: Stages that converted no layer (method names).
    noop: tuple[str, ...] = ()
    seconds: float = 0.0

    def values(self) -> dict[str, Any]:
        """The cost numbers by metric name (every scalar metric but accuracy)."""
        return {k: getattr(self.metrics, k) for k in COST_KEYS}

    def record(self) -> dict[str, Any]:
        """What a trial's ``dry_run`` attribute holds: the costs, where their latency was measured,
        whether they are final, the seconds."""
        return {**self.values(), "latency_target": self.metrics.latency_target, "final": self.final, "seconds": self.seconds}

    @property
    def known(self) -> tuple[str, ...]:
        """The costs whose dry-run value is the trained model's."""
        return COST_METRICS if self.final else PLAN_COSTS


def plan_key(plan: Plan) -> str:
    """A canonical text of a plan (chain, settings and fine-tuning options): equal plans, equal keys."""
    return json.dumps(plan.to_dict(), sort_keys=True, default=str)


def _structure(model: nn.Module) -> list[tuple[str, str, tuple[tuple[str, tuple[int, ...]], ...]]]:
    return [
        (name, type(m).__name__, tuple((k, tuple(v.shape)) for k, v in m.state_dict(keep_vars=False).items() if "." not in k and hasattr(v, "shape")))
        for name, m in model.named_modules()
    ]


def dry_run(
    plan: Plan,
    base: nn.Module,
    data: Any,
    settings: TrialSettings,
    *,
    folder: str | Path | None = None,
    methods: Mapping[str, CompressionMethod] | None = None,
    profile: SensitivityProfile | None = None,
) -> Costs:
    """Build ``plan``'s final structure without training and measure its costs (see the module doc).

    Raises:
        TrialFailed: a stage cannot apply. ArtifactError: the model cannot become the artifact.
    """
    start = time.perf_counter()
    base = base.eval()
    example = data.example()

    gen = torch.Generator().manual_seed(settings.seed)

    def untrained(module: nn.Module, **_: Any) -> nn.Module:
        # Stands in for training: the structure stays, every float tensor moves by a tiny distinct
        # amount, as training would move it. Without it, the fresh layers a method adds (biases of
        # zeros, BatchNorm of ones) hold equal tensors, which the ONNX exporter stores once, and
        # the dry run's artifact would be smaller than the trained one's.
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_floating_point():
                    t.add_(torch.rand(t.shape, generator=gen, dtype=t.dtype).to(t.device) * 1e-6)
        return module

    def calibration():
        return iter(data.batches("train", settings.batch_size, shuffle=True, seed=settings.seed))

    model: nn.Module = base
    chain: list[tuple[str, dict[str, Any]]] = []
    noop: list[str] = []
    float_macs: int | None = None
    final = True
    for i, (name, params) in enumerate(plan.chain):
        method = (methods or {}).get(name) or searchspace.get_method(name)()
        final = final and not method.costs_after_training
        notes: dict[str, Any] = {}
        before = _structure(model)
        model, stage_macs = apply_chain(
            Plan(chain=((name, params),), finetune=plan.finetune), base, start=model,
            example=example, calibration=calibration, train=untrained, methods=methods, notes=notes, dry_run=True, profile=profile,
        )
        float_macs = stage_macs if stage_macs is not None else (float_macs if not method.finetune else None)
        if name != "none" and method.converted_nothing(notes) and _structure(model) == before:
            noop.append(name)
            # Only a structure stage is replaced: `none` fine-tunes exactly as it would (same seed
            # offset, same epochs). A later stage that changed nothing still fine-tunes once more.
            if method.stage == Stage.STRUCTURE and i == 0:
                chain.append(("none", {}))
                continue
        chain.append((name, dict(params)))
    with tempfile.TemporaryDirectory() as tmp:
        # No test pass: the untrained model's accuracy is never kept.
        metrics, _ = measure(model, data, settings.latency, folder=Path(folder or tmp), macs=float_macs, accuracy=False)
    return Costs(
        metrics=metrics,
        final=final,
        plan=Plan(chain=tuple(chain), finetune=dict(plan.finetune)),
        noop=tuple(noop),
        seconds=time.perf_counter() - start,
    )


@dataclass
class Verdict:
    """What the searcher does with a sampled plan before launching it."""

    costs: Costs | None
    #: Optuna constraint values by bound from the known costs (``<= 0`` feasible; unknown ones 0).
    constraints: dict[str, float]
    #: Broken cost bounds, as text (empty: the plan may train).
    broken: str = ""
    #: Trial number of an earlier finished trial of the same plan (None: not trained yet).
    duplicate_of: int | None = None
    error: str | None = None


@dataclass
class Screen:
    """Everything the searcher needs to decide about a plan before it trains (lives in the driver)."""

    base: nn.Module
    data: Any
    settings: TrialSettings
    methods: Mapping[str, CompressionMethod]
    constraints: Constraints = Constraints()
    #: The study's sensitivity profile of the base, as the trials get it.
    profile: SensitivityProfile | None = None

    def check(self, plan: Plan, finished: Mapping[str, int]) -> Verdict:
        """Dry-run ``plan``; ``finished`` maps plan keys of finished trials to their numbers."""
        isolate = self.settings.latency.isolate
        data = gated_batches(self.data) if isolate else self.data
        try:
            with busy(isolate):  # the launcher's dry run is work on the node too: not beside a timing
                costs = dry_run(plan, self.base, data, self.settings, methods=self.methods, profile=self.profile)
        except Exception as exc:  # noqa: BLE001 - the trial itself will fail with the reason
            return Verdict(costs=None, constraints={}, error=f"{type(exc).__name__}: {str(exc)[:200]}")
        duplicate = finished.get(plan_key(costs.plan))
        values = self.constraints.violations(costs.values(), only=costs.known)
        broken = [f"{metric} {getattr(costs.metrics, metric)} > {bound:g}" for f, metric, is_max, bound in self.constraints.bounds() if is_max and values[f] > 0]
        return Verdict(costs=costs, constraints=values, broken="; ".join(broken), duplicate_of=duplicate)
