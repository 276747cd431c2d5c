"""A trial's checkpoint folder: its plan and its weights, written by the trial and read by
:func:`automl.load_model` (the one rebuild that the drift check, finalize, export and user code use).

Layout of ``checkpoints/trial_NNNNN/``:

- ``trial.json``: the plan. ``format`` (:data:`FORMAT`), ``base`` (the base architecture: model
  name, options, input shape, classes), ``plan`` (the chain of methods with their parameters and
  the fine-tuning options), the calibrated state (``notes.calibrated``, e.g. an early-exit model's
  thresholds), method label, metrics, seconds, input shape, runtime, whether latency is timed
  per sample, and ``profile`` where the study measured the base's sensitivity profile (a plan
  whose methods allocate per layer from it replays only with it, :mod:`searchspace._profile`);
- ``weights.safetensors``: the eager state dict, nothing pickled. Entries safetensors cannot hold
  (quantised tensors, the packed int8 weights of quantised layers, dtypes, tuples) are stored as
  plain tensors and rebuilt from a JSON layout in the file's metadata (:func:`encode_state`);
- the measured artifact files (``model.pt2``, ``model.onnx`` and its external data if any, ``model.ts`` for the
  torchscript runtime, ``artifact.json``: every file the trial's measurement wrote, :mod:`automl._artifact`), which export ships byte for byte;
- ``float/``: where the chain has post-training stages (int8), the float model the first of them
  started from, a checkpoint of its own whose plan is the chain before them (not measured:
  ``metrics`` is empty); finalize fine-tunes it and replays the post-training stages;
- ``variant_K/``: each extra operating point of the same trained model (see
  :class:`searchspace.Calibrated`), a checkpoint of its own with its own settings, files and
  metrics; its Optuna trial's ``checkpoint`` attribute points here.

A checkpoint written before this format (``weights.pt``, no ``format``) is refused with a
:class:`CheckpointError` that says so: it holds no base reference to rebuild from.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from searchspace import DynamicInference
from searchspace._reason import first_line

__all__ = [
    "FLOAT_FOLDER",
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "decode_state",
    "encode_state",
    "load_checkpoint",
    "save_checkpoint",
    "variant_folder",
    "weights_only_state",
]

#: Version of the checkpoint layout (``trial.json``'s ``format``).
FORMAT = 2
RECORD = "trial.json"
#: Sub-folder holding the float model a chain's post-training stages started from.
FLOAT_FOLDER = "float"
WEIGHTS = "weights.safetensors"
#: Metadata key of ``weights.safetensors`` holding how non-tensor entries are rebuilt.
LAYOUT = "automl.layout"
#: Metadata key holding the state dict's per-module versions (``state_dict()._metadata``).
VERSIONS = "automl.versions"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, damaged or of an older format; the message names
    the file and why."""


def variant_folder(k: int) -> str:
    """Sub-folder (relative to the trial's checkpoint) of the trial's ``k``-th extra operating point."""
    return f"variant_{k}"


def weights_only_state(model: nn.Module) -> dict[str, Any]:
    """The state dict with quantised packed parameters (TorchScript objects) replaced by their
    state (tensors and strings), so :func:`encode_state` can store it without pickling.

    It keeps the state dict's per-module versions (``_metadata``): quantised layers read their
    entries by the version that wrote them.
    """
    full = model.state_dict()
    state: OrderedDict[str, Any] = OrderedDict()
    for key, value in full.items():
        if isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):
            value = {"script_object": value.__getstate__()}
        state[key] = value
    state._metadata = copy.deepcopy(getattr(full, "_metadata", OrderedDict()))  # type: ignore[attr-defined]
    return state


# --- state dict <-> plain tensors -----------------------------------------------------------


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON spec of ``value``; its tensors go to ``tensors`` under keys derived from ``path``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.is_quantized:
            spec: dict[str, Any] = {"qtensor": path, "dtype": str(t.dtype).removeprefix("torch."), "qscheme": str(t.qscheme()).removeprefix("torch.")}
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                spec.update(scale=float(t.q_scale()), zero_point=int(t.q_zero_point()))
            else:
                tensors[path + "/scales"] = t.q_per_channel_scales().contiguous().clone()
                tensors[path + "/zero_points"] = t.q_per_channel_zero_points().contiguous().clone()
                spec.update(axis=int(t.q_per_channel_axis()))
            tensors[path] = t.int_repr().contiguous().clone()
            return spec
        # safetensors refuses shared or non-contiguous storage: store independent copies.
        tensors[path] = t.contiguous().clone()
        return {"tensor": path}
    if isinstance(value, dict) and set(value) == {"script_object"}:
        return {"script_object": _encode(value["script_object"], path, tensors)}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"torch_dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"state entry {path!r} of type {type(value).__name__} cannot be stored without pickling")


def _decode(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "qtensor" in spec:
        ints = tensors[spec["qtensor"]]  # int_repr's dtype (int8/uint8/int32) sets the quantised dtype
        if "scale" in spec:
            return torch._make_per_tensor_quantized_tensor(ints, spec["scale"], spec["zero_point"])
        path = spec["qtensor"]
        return torch._make_per_channel_quantized_tensor(ints, tensors[path + "/scales"], tensors[path + "/zero_points"], spec["axis"])
    if "script_object" in spec:
        return {"script_object": _decode(spec["script_object"], tensors)}
    if "tuple" in spec:
        return tuple(_decode(s, tensors) for s in spec["tuple"])
    if "list" in spec:
        return [_decode(s, tensors) for s in spec["list"]]
    if "torch_dtype" in spec:
        return getattr(torch, spec["torch_dtype"])
    return spec["value"]


def encode_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(plain tensors, safetensors metadata) of a state dict from :func:`weights_only_state`."""
    tensors: dict[str, torch.Tensor] = {}
    layout = {key: _encode(value, key, tensors) for key, value in state.items()}
    versions = dict(getattr(state, "_metadata", None) or {})
    return tensors, {LAYOUT: json.dumps(layout), VERSIONS: json.dumps(versions), "format": str(FORMAT)}


def decode_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, Any]:
    """The state dict :func:`encode_state` stored (packed int8 weights as ``{"script_object": state}``)."""
    if not metadata or LAYOUT not in metadata:
        raise ValueError(f"metadata key {LAYOUT!r} is missing")
    state = OrderedDict((key, _decode(spec, tensors)) for key, spec in json.loads(metadata[LAYOUT]).items())
    state._metadata = OrderedDict(json.loads(metadata.get(VERSIONS, "{}")))  # type: ignore[attr-defined]
    return state


def write_weights(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, metadata = encode_state(state)
    save_file(tensors, str(path), metadata=metadata)


def read_weights(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return decode_state(tensors, metadata)


# --- folders ------------------------------------------------------------------------------


def _write(folder: Path, state: dict[str, Any], artifact_dir: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if artifact_dir.is_dir():
        for f in artifact_dir.iterdir():
            if f.is_file():  # the measured files, whichever the runtime wrote (variants are sub-folders)
                shutil.copyfile(f, folder / f.name)
    write_weights(state, folder / WEIGHTS)
    (folder / RECORD).write_text(json.dumps(record, indent=2, default=str))


def save_checkpoint(outcome: Any, directory: str | Path, *, base: dict[str, Any]) -> Path:
    """Write a :class:`~automl._trial.TrialOutcome` (plan, weights, artifact files, variants).

    Args:
        base: the base architecture the plan starts from (``model``, ``options``,
            ``input_shape``, ``num_classes``: what :func:`automl.build_model` takes).
    """
    d = Path(directory)
    record = {
        "format": FORMAT,
        "base": dict(base),
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
    profile = getattr(outcome, "profile", None)
    if profile is not None:
        record["profile"] = profile.to_dict()
    _write(d, weights_only_state(outcome.model), outcome.folder, record)
    float_model = getattr(outcome, "float_model", None)
    if float_model is not None:
        prefix = {"chain": record["plan"]["chain"][: outcome.float_stages], "finetune": record["plan"]["finetune"]}
        label = "+".join(s["method"] for s in prefix["chain"]) or "base"
        _write(
            d / FLOAT_FOLDER,
            weights_only_state(float_model),
            d / FLOAT_FOLDER / "none",  # no artifact files: this model is not measured
            {**record, "plan": prefix, "label": label, "metrics": {}, "per_sample": isinstance(float_model, DynamicInference)},
        )
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
    #: The stored state dict (packed int8 weights as ``{"script_object": state}``).
    state_dict: dict[str, Any]

    @property
    def has_onnx(self) -> bool:
        return (self.folder / "model.onnx").is_file()


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and validate a checkpoint folder (plan, weights); rebuilding is :func:`automl.load_model`.

    Raises:
        CheckpointError: the folder or a file is missing, a file does not load, or the folder is
            of a format before :data:`FORMAT`.
    """
    folder = Path(directory).resolve()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is missing")
    if not (folder / WEIGHTS).is_file() and (folder / "weights.pt").is_file():
        raise CheckpointError(
            f"checkpoint {folder} predates the checkpoint format {FORMAT} (plan + weights.safetensors): "
            "it has a pickled weights.pt and no base reference; re-run the trial to get a rebuildable checkpoint"
        )
    missing = [n for n in (WEIGHTS, RECORD) if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    try:
        record = json.loads((folder / RECORD).read_text())
        if not isinstance(record, dict) or "metrics" not in record or "plan" not in record:
            raise ValueError("trial.json lacks 'plan' or 'metrics'")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is corrupted: trial.json: {exc}") from exc
    if record.get("format") != FORMAT or not isinstance(record.get("base"), dict):
        raise CheckpointError(f"checkpoint {folder} predates the checkpoint format {FORMAT}: trial.json has format {record.get('format')!r} and no base reference")
    try:
        state = read_weights(folder / WEIGHTS)
    except Exception as exc:  # noqa: BLE001 - any load failure means the file is damaged
        raise CheckpointError(f"checkpoint {folder} is corrupted: {WEIGHTS} does not load ({first_line(exc)})") from exc
    return Checkpoint(folder, record, state)
