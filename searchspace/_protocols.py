"""What a compressed model may offer the code that measures, calibrates and ships it.

A method's ``apply`` returns a plain ``nn.Module``. Where that module needs more than a forward
pass from the rest of the system, it says so by implementing one of these protocols; the
orchestration code (``automl``) checks ``isinstance(model, Protocol)`` and never asks which
method made the model:

- :class:`ArtifactQuantization`: a recipe for quantisation that happens when the model becomes its
  runtime's artifact (``int8``), left on the float model as its ``artifact_quantization`` attribute;
- :class:`Calibrated`: inference-time settings fitted on the validation split after training, each
  an operating point measured without retraining (early-exit thresholds);
- :class:`DynamicInference`: work that depends on the input (early exits), so the model is timed
  per sample and its MACs are an expectation over the exits taken.

One protocol is implemented by a method rather than by its model:

- :class:`Profiled`: a method that compresses layer by layer and can allocate its amount across
  layers from the base's sensitivity profile (:mod:`searchspace._profile`). The study measures the
  profile through it once (``automl._sensitivity``) and passes the profile to every ``apply``
  through ``ApplyContext.profile``.

A module (or one of its submodules) may also declare ``onnx_initializers``: a tuple of buffer names
that must stay named, editable initializers in the ONNX file (the exit thresholds), so that another
operating point of the same trained model is written by changing those buffers only.

Each implementation's method signatures must equal the protocol's (the registry-driven conformance
test in ``tests/searchspace/test_protocols.py`` checks every registered method's models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from searchspace._base import ApplyContext

__all__ = ["METHOD_PROTOCOLS", "PROTOCOLS", "ArtifactQuantization", "Calibrated", "DynamicInference", "Profiled", "artifact_quantization"]


@runtime_checkable
class ArtifactQuantization(Protocol):
    """Quantisation that happens when a model becomes its runtime's artifact, by that runtime's tools.

    A method whose :attr:`CompressionMethod.quantizes_artifact` is True returns from ``apply`` the
    float model with one of these as its ``artifact_quantization`` attribute (the recipe: mode and
    calibration inputs). The artifact builder (``automl._artifact``) then quantises what it ships
    with the runtime that runs it: the exported float ONNX file by ONNX Runtime's quantiser, the
    module for the PyTorch runtimes, so the measured model is the shipped one.
    """

    def describe(self) -> dict[str, Any]:
        """What the recipe is (mode, calibration size), recorded with the artifact."""
        ...

    def quantize_onnx(self, float_onnx: Path, out: Path) -> dict[str, Any]:
        """Write the quantised form of the float ONNX file ``float_onnx`` to ``out``; return notes."""
        ...

    def quantize_torch(self, model: nn.Module, notes: dict[str, Any] | None = None) -> nn.Module:
        """The quantised module for the PyTorch runtimes (a new module; ``model`` stays float).

        Args:
            model: the float model the recipe was left on.
            notes: where to record what was quantised and what stayed float (keys prefixed with
                the method's name); the artifact builder stores them with the artifact. None:
                the caller does not keep them.
        """
        ...


def artifact_quantization(model: nn.Module) -> ArtifactQuantization | None:
    """The recipe a quantising method left on ``model`` (see :class:`ArtifactQuantization`), if any."""
    recipe = getattr(model, "artifact_quantization", None)
    return recipe if isinstance(recipe, ArtifactQuantization) else None


@runtime_checkable
class Calibrated(Protocol):
    """A trained model with inference-time settings fitted on the validation split (e.g. exit
    thresholds), each of which is an operating point worth measuring without retraining.

    The trial calls :meth:`calibrate` after training, measures every setting it returns as its own
    operating point (``automl._trial.Variant``), and records each with its parameter overrides.
    """

    def calibrate(self, x_val: torch.Tensor, y_val: torch.Tensor) -> list[dict[str, Any]]:
        """Fit the settings on validation data; return them, the trial's own first.

        Each is ``{"params": {optuna name: value} overriding the trial's parameters, "state":
        {...} JSON-able record of what was set}``. The model is left in the first one.
        """
        ...

    def use_setting(self, setting: Mapping[str, Any]) -> None:
        """Put the model in one setting :meth:`calibrate` returned, in place."""
        ...


@runtime_checkable
class DynamicInference(Protocol):
    """A model whose work depends on its input, e.g. early exits (``searchspace.methods.exits``).

    Such a model is compiled with ``torch.jit.script`` (its control flow depends on the data, so
    tracing would freeze one path), timed per sample, and its MACs are the expectation over the
    exits the test samples take.
    """

    def exit_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The exit each sample of ``x`` leaves at, under the model's current settings."""
        ...

    def exit_paths(self) -> list[nn.Module]:
        """Per exit, a module that runs exactly what a sample leaving there runs (for counting MACs
        with the same counter as every other model)."""
        ...

    def export_parts(self) -> list[str]:
        """Qualified names of the submodules the routing runs (the last of :meth:`exit_paths` runs
        them all), each called with one tensor. Export captures each one alone first, to functional
        ATen, so a ``torch.cond`` branch holds no in-place write and no function that tracing
        patches (``torch.fx.wrap``, as Swin's attention)."""
        ...


@runtime_checkable
class Profiled(Protocol):
    """A method that compresses layer by layer, measured one layer at a time for the profile.

    The profile (``automl._sensitivity``) asks :meth:`needs_profile` whether the method's ranges can
    sample a setting that reads it, then for each of :meth:`profile_layers` and each of
    :meth:`profile_levels` measures the model :meth:`compress_layer` returns (validation accuracy
    without fine-tuning, params and MACs saved), and stores :meth:`profile_extra` beside the table.
    ``apply`` then reads ``context.profile``; an allocation read from it must depend on the profile
    and the parameters only (see :mod:`searchspace._profile`).
    """

    def needs_profile(self) -> bool:
        """Whether the method's (narrowed) ranges can sample a setting that reads the profile."""
        ...

    def profile_levels(self) -> tuple[float, ...]:
        """The levels each layer is measured at (the method's own unit: a pruning ratio, a rank fraction)."""
        ...

    def profile_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        """Qualified names of the layers of ``model`` the method can compress one at a time."""
        ...

    def compress_layer(self, model: nn.Module, layer: str, level: float, *, context: ApplyContext) -> nn.Module | None:
        """A copy of ``model`` with only ``layer`` compressed at ``level`` (``model`` stays as it
        is), or None where the layer would not change at that level (nothing to measure)."""
        ...

    def profile_extra(self, model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
        """JSON-able statistics of ``model`` the allocation reads besides the table (may be empty)."""
        ...


#: Every protocol a compressed model may implement (the conformance test walks this tuple).
PROTOCOLS: tuple[type, ...] = (ArtifactQuantization, Calibrated, DynamicInference)
#: Every protocol a method may implement (the conformance test walks this tuple too).
METHOD_PROTOCOLS: tuple[type, ...] = (Profiled,)
