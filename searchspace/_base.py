"""The interface every compression method implements."""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping

import optuna
import torch
from torch import nn

from searchspace._domains import Domain
from searchspace._profile import SensitivityProfile

__all__ = ["ApplyContext", "CompressionMethod", "Stage"]


class Stage(enum.IntEnum):
    """Where a method sits in a chain. A trial applies at most one method per stage, in this order.

    STRUCTURE methods re-parameterise layers (Tucker, WSNet, IGC...) and always have a pick, ``none``
    being the base as is. PRUNE and QUANTIZE methods are optional stages stacked after it.
    """

    STRUCTURE = 0
    PRUNE = 1
    QUANTIZE = 2

    @property
    def param(self) -> str:
        """The suffix of the Optuna parameter that picks the method of this stage."""
        return {Stage.STRUCTURE: "method", Stage.PRUNE: "prune", Stage.QUANTIZE: "quantize"}[self]


@dataclass
class ApplyContext:
    """What a method may use besides the model and its parameters.

    Attributes:
        example_input: one batch-1 input on the model's device, for tracing and shape inference.
        calibration: yields ``(inputs, targets)`` training batches (never validation or test data),
            for data-driven criteria (APoZ, ThiNet) and int8 calibration.
        fit: trains a module in place, ``fit(module, epochs=..., extra_loss=...)``; for methods that
            learn something before they cut (learned gates).
        base: the trained base model (read only), e.g. as a distillation teacher.
        notes: what the method did (converted layers, skipped layers and why); stored with the trial.
        dry_run: the chain is being built only for its structure (costs before training,
            :mod:`automl._prescreen`): ``fit`` trains nothing, and which channels or ranks are
            picked does not matter, only how many. A method may skip work that only picks them.
        profile: the base's sensitivity profile (:class:`~searchspace.SensitivityProfile`), for
            the methods that allocate per layer from it (:class:`~searchspace.Profiled`); None
            where the study computed none. The same profile reaches the trial, its dry run and
            the rebuild of its checkpoint, so an allocation read from it is the same in all three.
    """

    example_input: torch.Tensor
    calibration: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] = lambda: iter(())
    fit: Callable[..., Any] | None = None
    base: nn.Module | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    profile: SensitivityProfile | None = None

    def batches(self, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate over at most ``limit`` calibration batches."""
        for i, batch in enumerate(self.calibration()):
            if limit is not None and i >= limit:
                return
            yield batch


class CompressionMethod(abc.ABC):
    """A compression method from a paper, searchable by Optuna.

    Subclasses set :attr:`name`, :attr:`stage`, :attr:`hyperparameters` and :attr:`reference`, and
    implement :meth:`apply`. They are registered with :func:`searchspace.register_method`, which is
    all it takes for the search, the CLI and the registry-driven tests to pick them up.

    The contract every method honours (the rest of the system relies on it and never asks which
    method it holds):

    - **Search space.** :meth:`space` only calls ``trial.suggest_*`` under names prefixed with
      ``"<name>."`` and returns plain values, so it replays on ``optuna.trial.FixedTrial``.
    - **No edits in place.** :meth:`apply` returns a new module; the model it is given (the trained
      base, or the previous stage's output) is left untouched.
    - **Structure from parameters.** The returned module's structure (its layers and the shapes of
      its state dict) follows from the input model's structure and ``params`` alone, never from
      the trained values, the calibration data or what ``context.fit`` learns. Two things rest on
      it: the dry run that prices a plan before training (``context.dry_run``, where ``fit``
      trains nothing) and ``automl.load_model``, which rebuilds a checkpoint by replaying the
      chain without training and then loads the stored weights strictly.
    - **Notes.** What the method did goes to ``context.notes`` under keys prefixed with
      ``"<name>."``. The layers it converted go under :meth:`converted_key`: an empty record there
      (and an unchanged structure) marks the stage as a no-op, so the plan is recorded as what it
      really is and is not trained twice (:meth:`converted_nothing`).
    - **Capture by torch.export.** The module runs under ``torch.export.export`` (for
      ``model.pt2`` and the ONNX file) with a dynamic batch axis: data-dependent control flow
      goes through ``torch.cond`` while ``torch.compiler.is_exporting()``, buffers that must stay
      editable in the ONNX file are named in an ``onnx_initializers`` class attribute of the module.
      A module that cannot be captured is scripted instead, with the reason recorded.
    - **Protocols.** A model that needs more than a forward pass implements one of the protocols
      of :mod:`searchspace._protocols` with exactly its signatures:
      :class:`~searchspace.ArtifactQuantization` (quantised when it becomes the artifact; set
      :attr:`quantizes_artifact`), :class:`~searchspace.Calibrated` (settings fitted after
      training), :class:`~searchspace.DynamicInference` (work that depends on the input; such
      methods set :attr:`costs_after_training`).

    The registry-driven tests (``tests/searchspace/test_methods.py``, ``test_protocols.py``) check
    these points for every registered method on every built-in base model.

    Args:
        ranges: narrowed domains for some hyperparameters (validated by :meth:`narrowed`).
    """

    name: ClassVar[str]
    stage: ClassVar[Stage] = Stage.STRUCTURE
    #: Whether the trial fine-tunes the model after :meth:`apply` (False for post-training int8).
    finetune: ClassVar[bool] = True
    #: Whether the model's costs (MACs, latency) depend on training, so that a dry run of the chain
    #: without training (automl._prescreen) cannot give their final values. Parameters and size
    #: never do: they follow from the plan. True for early exits, whose thresholds are fitted on
    #: the validation split after training and decide how much of the net a sample runs. Pruning
    #: by a data or gate criterion is not such a case: the criterion picks WHICH channels go, the
    #: ratio HOW MANY, so the pruned structure is the same.
    costs_after_training: ClassVar[bool] = False
    #: The settings the search may tune; keys are un-prefixed, Optuna sees ``"<name>.<key>"``.
    hyperparameters: ClassVar[Mapping[str, Domain]] = {}
    #: Narrower domains used where the config does not name the setting (``allocation``:
    #: ``uniform``, ``keep_float``: 0), so a config searches a setting that changes what a method
    #: needs (a profile of the base) only when it names it; naming it opens the full domain.
    default_ranges: ClassVar[Mapping[str, Domain]] = {}
    #: The paper the method follows, cited in reports and cards.
    reference: ClassVar[str] = ""
    #: Whether channel pruning may follow this method. False where the method's layers index or
    #: reshape channels in ways Torch-Pruning's dependency graph cannot follow (channel
    #: permutations, computed kernels, exit heads sized at apply time).
    prunable_layers: ClassVar[bool] = True
    #: Whether the method's quantisation happens when the model becomes its runtime's artifact:
    #: ``apply`` returns the float model carrying an :class:`~searchspace.ArtifactQuantization`
    #: recipe, and the artifact builder quantises with the runtime's own tools (int8: ONNX
    #: Runtime's quantiser for ``onnxruntime``). Its size and accuracy are the quantised artifact's.
    quantizes_artifact: ClassVar[bool] = False
    #: The notes key (without the ``"<name>."`` prefix) under which :meth:`apply` records the layers
    #: it converted, as a list or dict that is empty when it converted none; see
    #: :meth:`converted_key`. A method that records no such key is never taken for a no-op.
    converted_note: ClassVar[str] = "converted"

    def __init__(self, *, ranges: Mapping[str, Domain] | None = None) -> None:
        self.ranges: dict[str, Domain] = {**self.hyperparameters, **self.default_ranges}
        self.ranges.update(ranges or {})

    @classmethod
    def narrowed(cls, overrides: Mapping[str, Any]) -> dict[str, Domain]:
        """Validate a config's narrowing of this method's hyperparameters.

        Raises:
            KeyError: an unknown hyperparameter name (message lists the allowed ones).
            ValueError: a value outside the method's domain.
        """
        out: dict[str, Domain] = {}
        for key, value in overrides.items():
            if key not in cls.hyperparameters:
                allowed = ", ".join(sorted(cls.hyperparameters)) or "none"
                raise KeyError(f"unknown hyperparameter {key!r} of method {cls.name!r}; allowed: {allowed}")
            try:
                out[key] = cls.hyperparameters[key].narrow(value)
            except ValueError as exc:
                raise ValueError(f"{cls.name}.{key}: {exc}") from None
        return out

    def suggest(self, trial: optuna.Trial, key: str) -> Any:
        """Sample hyperparameter ``key`` under its prefixed Optuna name."""
        return self.ranges[key].suggest(trial, f"{self.name}.{key}")

    def space(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample this method's settings. Only calls ``trial.suggest_*``; returns plain values.

        The default samples every hyperparameter independently; methods whose settings are
        conditional on each other override it.
        """
        return {key: self.suggest(trial, key) for key in self.ranges}

    def supports(self, model: nn.Module) -> str | None:
        """Return why the method cannot apply to ``model``, or None when it can."""
        return None

    @classmethod
    def converted_key(cls) -> str:
        """The notes key of the converted layers, ``"<name>.<converted_note>"``."""
        return f"{cls.name}.{cls.converted_note}"

    @classmethod
    def converted_nothing(cls, notes: Mapping[str, Any]) -> bool:
        """Whether ``notes`` (one stage's) record that the stage converted no layer.

        False where the key is absent: a method that does not record its converted layers is never
        taken for a no-op. The caller also checks that the structure did not change.
        """
        key = cls.converted_key()
        return key in notes and not notes[key]

    def accepts(self, chain: tuple[str, ...]) -> bool:
        """Whether this method may follow the methods already in ``chain`` (names, in order)."""
        return True

    @abc.abstractmethod
    def apply(
        self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext
    ) -> nn.Module:
        """Return a compressed copy of ``model``; never modify ``model`` itself.

        Args:
            model: the model to compress (the trained base, or the previous stage's output).
            params: the values :meth:`space` returned.
            context: example input, calibration data, and a place for notes.
        """
