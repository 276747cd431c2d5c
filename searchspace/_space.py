"""The one conditional search space: a chain of methods (one per stage) plus fine-tuning options.

The structure stage always has a pick (``none`` is the base as is); the prune and quantize stages may
be ``"off"``. The Optuna parameter that picks a stage's method is named after the chain so far
(``method``, ``tucker:prune``, ``tucker+prune:quantize``), so each branch has its own fixed set of
choices and only valid chains are ever sampled. A method's own settings are named
``"<method>.<key>"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import optuna

from searchspace._base import CompressionMethod, Stage
from searchspace._domains import Categorical, Domain, Float

__all__ = ["FINETUNE_HYPERPARAMETERS", "Plan", "SearchSpace"]

OFF = "off"

#: Fine-tuning settings searched for every method: knowledge distillation from the trained base
#: (Hinton et al., 2015) on/off, its temperature and the weight of the soft-target loss.
FINETUNE_HYPERPARAMETERS: Mapping[str, Domain] = {
    "distill": Categorical([False, True]),
    "distill.temperature": Float(1.0, 8.0),
    "distill.weight": Float(0.1, 0.9),
}


@dataclass(frozen=True)
class Plan:
    """What one trial does: the methods in order with their settings, and how to fine-tune."""

    chain: tuple[tuple[str, dict[str, Any]], ...]
    finetune: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The chain as ``tucker+prune+int8``."""
        return "+".join(name for name, _ in self.chain)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chain": [{"method": n, "params": dict(p)} for n, p in self.chain],
            "finetune": dict(self.finetune),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        return cls(
            chain=tuple((s["method"], dict(s["params"])) for s in d["chain"]),
            finetune=dict(d.get("finetune", {})),
        )


class SearchSpace:
    """A define-by-run space usable with ``study.optimize`` and Ray Tune's ``OptunaSearch``.

    Args:
        methods: the method instances the search may pick (already narrowed by the config).
        finetune: narrowed fine-tuning domains (defaults: :data:`FINETUNE_HYPERPARAMETERS`).
    """

    def __init__(
        self,
        methods: Mapping[str, CompressionMethod],
        *,
        finetune: Mapping[str, Domain] | None = None,
    ) -> None:
        if not any(m.stage == Stage.STRUCTURE for m in methods.values()):
            raise ValueError(
                "at least one structure-stage method (e.g. 'none') must be enabled, "
                f"but got {sorted(methods)}"
            )
        self.methods = dict(methods)
        self.finetune = dict(FINETUNE_HYPERPARAMETERS)
        self.finetune.update(finetune or {})

    def sample(self, trial: optuna.Trial) -> Plan:
        """Sample a plan. Only calls ``trial.suggest_*``."""
        chain: list[tuple[str, dict[str, Any]]] = []
        for stage in Stage:
            names = tuple(n for n, _ in chain)
            options = sorted(
                n for n, m in self.methods.items() if m.stage == stage and m.accepts(names)
            )
            if not options:
                continue
            choices = options if stage == Stage.STRUCTURE else [OFF, *options]
            key = f"{'+'.join(names)}:{stage.param}" if names else stage.param
            pick = Categorical(choices).suggest(trial, key)
            if pick != OFF:
                chain.append((pick, self.methods[pick].space(trial)))
        return Plan(chain=tuple(chain), finetune=self._sample_finetune(trial))

    def _sample_finetune(self, trial: optuna.Trial) -> dict[str, Any]:
        out: dict[str, Any] = {"distill": self.finetune["distill"].suggest(trial, "distill")}
        if out["distill"]:
            for key in ("distill.temperature", "distill.weight"):
                out[key] = self.finetune[key].suggest(trial, key)
        return out

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        """Define-by-run entry point for ``OptunaSearch``: returns the plan as constants."""
        return {"plan": self.sample(trial).to_dict()}
