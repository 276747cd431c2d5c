"""A trial's checkpoint folder: written by the trial, read by the study, the drift check and export.

Layout of ``checkpoints/trial_NNNNN/`` (the same for the base model's ``base/`` folder):

- ``model.ts``: the TorchScript model; ``model.onnx`` when the study's runtime is ``onnxruntime``:
  the very files the trial measured (:mod:`automl._artifact`), which export ships byte for byte;
- ``weights.pt``: the eager state dict, loadable with ``torch.load(weights_only=True)`` (packed int8
  weights are stored as their tensors);
- ``trial.json``: plan, method label, metrics, notes (e.g. an early-exit model's thresholds),
  seconds, input shape, runtime, and whether latency is timed per sample;
- ``variant_K/``: each extra operating point of the same trained model (see
  :class:`automl._trial.Calibrated`), a checkpoint of its own with its own settings, files and
  metrics; its Optuna trial's ``checkpoint`` attribute points here.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl._artifact import DynamicInference

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint", "variant_folder", "weights_only_state"]

RECORD = "trial.json"
WEIGHTS = "weights.pt"
ARTIFACT_FILES = ("model.ts", "model.onnx", "model.pt2", "artifact.json")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or damaged; the message names the file and why."""


def variant_folder(k: int) -> str:
    """Sub-folder (relative to the trial's checkpoint) of the trial's ``k``-th extra operating point."""
    return f"variant_{k}"


def weights_only_state(model: nn.Module) -> dict[str, Any]:
    """The state dict with quantised packed parameters (TorchScript objects) replaced by their
    tensors, so the file loads with ``torch.load(weights_only=True)``."""
    state = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):
            value = value.__getstate__()
        state[key] = value
    return state


def _write(folder: Path, state: dict[str, Any], artifact_dir: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACT_FILES:
        if (artifact_dir / name).is_file():
            shutil.copyfile(artifact_dir / name, folder / name)
    torch.save(state, folder / WEIGHTS)
    (folder / RECORD).write_text(json.dumps(record, indent=2, default=str))


def save_checkpoint(outcome: Any, directory: str | Path) -> Path:
    """Write a :class:`~automl._trial.TrialOutcome` (model, artifact files, record, variants)."""
    d = Path(directory)
    record = {
        "plan": outcome.plan.to_dict(),
        "label": outcome.plan.label,
        "metrics": outcome.metrics.as_dict(),
        "notes": outcome.notes,
        "seconds": outcome.seconds,
        "input_shape": list(outcome.input_shape),
        "runtime": outcome.metrics.runtime,
        # Timed per sample (input-dependent work, e.g. early exits) rather than as one batch.
        "per_sample": isinstance(outcome.model, DynamicInference),
    }
    _write(d, weights_only_state(outcome.model), outcome.folder, record)
    for k, variant in enumerate(outcome.variants):
        # Its own weights (the parent's, but for its settings, e.g. a thresholds buffer), files, numbers.
        _write(
            d / variant_folder(k),
            variant.weights,
            variant.folder,
            {**record, "metrics": variant.metrics.as_dict(), "notes": {**outcome.notes, "calibrated": variant.state}, "params_override": variant.params},
        )
    return d


@dataclass
class Checkpoint:
    folder: Path
    record: dict[str, Any]
    state_dict: dict[str, Any]

    def torchscript(self) -> torch.jit.ScriptModule:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            return torch.jit.load(str(self.folder / "model.ts"), map_location="cpu").eval()

    @property
    def has_onnx(self) -> bool:
        return (self.folder / "model.onnx").is_file()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Load and validate a checkpoint folder (record, weights-only state dict, TorchScript file).

    Raises:
        CheckpointError: the folder or a file is missing, or a file does not load.
    """
    folder = Path(directory).resolve()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is missing")
    missing = [n for n in ("model.ts", WEIGHTS, RECORD) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    try:
        record = json.loads((folder / RECORD).read_text())
        if not isinstance(record, dict) or "metrics" not in record or "plan" not in record:
            raise ValueError("trial.json lacks 'plan' or 'metrics'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is corrupted: trial.json: {exc}") from exc
    try:
        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"expected a state dict, got {type(state).__name__}")
    except Exception as exc:  # noqa: BLE001 - any load failure means the file is damaged
        raise CheckpointError(f"checkpoint {folder} is corrupted: {WEIGHTS} does not load weights-only ({type(exc).__name__}: {_first_line(exc)})") from exc
    ckpt = Checkpoint(folder, record, state)
    try:
        ckpt.torchscript()
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {folder} is corrupted: model.ts does not load ({type(exc).__name__}: {_first_line(exc)})") from exc
    return ckpt
