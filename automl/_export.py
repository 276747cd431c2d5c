"""Export one trial of a study as a deployable folder, verified before it is reported as done.

The folder holds:

- ``model.pt2``, ``model.onnx`` (with its external-data files, for a model too large for one
  ONNX file) and (only where the study's runtime is ``torchscript``, or for an
  int8 model, which has no ``.pt2``) ``model.ts``: byte for byte the files the trial measured (see
  :mod:`automl._artifact`); where the study's runtime is not ``onnxruntime`` the checkpoint has no
  ONNX file and one is made here from ``model.pt2`` (dynamo exporter), else from ``model.ts``
  (legacy exporter, see :mod:`automl._onnx`);
- ``model.ts`` also when asked (``automl export --torchscript``): scripted or traced here from the
  rebuilt module (int8 quantised as the PyTorch runtimes quantise it), verified like the rest;
- ``weights.safetensors`` and ``trial.json``: the checkpoint's weights and plan, byte for byte, so
  ``automl.load_model(folder)`` rebuilds the eager module from the export as from the checkpoint;
- ``card.json``: study, trial, method chain and parameters (an early-exit variant's own
  thresholds among them), recorded and re-measured numbers, environment; ``README.md``: how to
  load and run each shipped file.

Export works only from what a trial saved (plan, metrics, checkpoint), never from which method made
it, so every method family exports the moment it exists. It is all-or-nothing: files go to a hidden
``.partial`` folder next to the destination that is renamed into place only after every check
passes, and removed on any failure.

The *PyTorch artifact* the checks compare with is ``model.pt2`` where the checkpoint has one
(``torch.export.load(...).module()``), else ``model.ts``; the card names it (``pytorch_artifact``).
Checks (any failing one aborts the export):

1. the checkpoint exists, rebuilds (:func:`automl.load_model`) and its PyTorch artifact loads
   (:func:`load_trial_checkpoint`);
2. the test accuracy of the study runtime's artifact (ONNX Runtime on ``model.onnx``, ``model.ts``,
   or the rebuilt module for ``eager``) equals the trial's recorded accuracy (the same number of
   correct test samples), computed by the same function trials use
   (:func:`automl._measure.artifact_accuracy`; :func:`_verify_accuracy`);
3. ONNX Runtime's outputs are compared with the PyTorch artifact's on the whole test split: within
   ``1e-4`` for float models; for int8 models (``model.ts``), whose integer kernels round
   differently in the two runtimes, the same test accuracy and the same prediction on >= 99 % of
   the samples. The card records it. Where ONNX is an extra (the study timed another runtime) an
   ONNX file that fails is not shipped. int8 quantised by ONNX Runtime has no PyTorch artifact
   (unless ``--torchscript``): its ONNX file is the measured one, verified by check 2
   (:func:`_verify_onnx`);
4. the weights file reloads to tensors equal to the PyTorch artifact's state dict, and the eager
   module rebuilt from plan and weights computes what the PyTorch artifact (and ``model.ts``, where
   it ships beside ``model.pt2``) computes on the whole test split (float: within ``1e-4``; int8:
   the same kernels, the same predictions; :func:`_verify_rebuild`, :func:`_verify_torchscript`).

Latency is then re-timed on the exported runtime's file in a fresh Python process that does nothing
else (``python -m automl._measure latency ...``), by the function trials use, on the same real test
inputs, and written next to the recorded value; it is information, not a pass/fail check, because
the machine may be busy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from automl import _onnx as onnx_export
from automl._artifact import ONNX_FILE, PT2_FILE, TORCHSCRIPT_FILE, ArtifactError, artifact_files, eager_artifact, load_artifact, move_onnx, remove_artifact, to_torchscript
from automl._checkpoint import RECORD, WEIGHTS, CheckpointError, load_checkpoint, read_weights
from automl._latency import LatencySettings
from automl._measure import artifact_accuracy, latency_inputs
from automl._pareto import FrontRow, StudyView
from automl._rebuild import load_model
from automl._target import cpu_name
from searchspace import artifact_quantization
from searchspace._reason import first_line

__all__ = ["ExportError", "LoadedCheckpoint", "export_trial", "load_trial_checkpoint"]


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    # torch.jit.load warns on every call that TorchScript is deprecated; model.ts is only read where
    # the study's runtime is TorchScript or it was asked for, so the warning is only noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _pt2_load(path: Path) -> torch.nn.Module:
    """The module of a saved ``torch.export`` program, as a user runs it (``torch.export.load(path).module()``)."""
    return torch.export.load(str(path)).module()


def _load_reference(folder: Path) -> tuple[str | None, Any]:
    """The PyTorch artifact a checkpoint or export holds, as (file name, loaded module): ``model.pt2``
    where there is one (every float model), else ``model.ts`` (the torchscript runtime; int8, which has
    no .pt2, see artifact.json), else (None, None) (int8 for ONNX Runtime: model.onnx is its only file)."""
    if (folder / PT2_FILE).is_file():
        return PT2_FILE, _pt2_load(folder / PT2_FILE)  # an exported program's module has no .eval(): it is inference already
    if (folder / TORCHSCRIPT_FILE).is_file():
        return TORCHSCRIPT_FILE, _jit_load(folder / TORCHSCRIPT_FILE).eval()
    return None, None


class ExportError(RuntimeError):
    """An export cannot proceed; ``code`` is the exit status (2 = bad input/checkpoint, 1 = check failed)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class LoadedCheckpoint:
    folder: Path
    #: The eager module rebuilt from plan and weights (:func:`automl.load_model`).
    model: torch.nn.Module
    record: dict[str, Any]
    state_dict: dict[str, Any]
    #: The PyTorch artifact file the checkpoint holds (``model.pt2``, else ``model.ts``, else None).
    reference: str | None = None


def load_trial_checkpoint(study_dir: Path, row: FrontRow) -> LoadedCheckpoint:
    """Load, validate and rebuild a trial's checkpoint (:func:`automl.load_model`).

    Raises:
        ExportError: (code 2) the folder or a file is missing, a file does not load, or the
            plan does not rebuild to a model its weights fit.
    """
    if row.checkpoint is None:
        raise ExportError(f"trial {row.number} has no checkpoint recorded (user attr 'checkpoint' is missing)")
    try:
        ckpt = load_checkpoint(study_dir / row.checkpoint)
        model = load_model(ckpt.folder)
    except CheckpointError as exc:
        raise ExportError(f"trial {row.number}: {exc}") from exc
    name = next((n for n in (PT2_FILE, TORCHSCRIPT_FILE) if (ckpt.folder / n).is_file()), None)
    try:
        _load_reference(ckpt.folder)
    except Exception as exc:  # noqa: BLE001 - the measured file is damaged
        raise ExportError(f"trial {row.number}: checkpoint {ckpt.folder} is corrupted: {name} does not load ({first_line(exc)})") from exc
    return LoadedCheckpoint(ckpt.folder, model, ckpt.record, ckpt.state_dict, name)


# --- ONNX ---------------------------------------------------------------------------------


def _is_quantized(reference: Any) -> bool:
    """Whether the PyTorch artifact runs torch.ao int8 kernels (only TorchScript can hold them here)."""
    return isinstance(reference, torch.jit.ScriptModule) and onnx_export.is_quantized(reference)


def _check_onnx(reference: Any, reference_name: str | None, folder: Path, data: Any, n_test: int, *, quantized: bool) -> dict[str, Any]:
    """Compare ONNX Runtime (``folder/model.onnx``) with the PyTorch artifact on the whole test split.

    Float models must match to 1e-4; int8 ones (integer kernels round differently) must reach the
    same accuracy with (almost) the same predictions (:func:`automl._onnx.compare`). Without a
    PyTorch artifact (int8 for ONNX Runtime, exported without ``--torchscript``) there is nothing to
    compare with: the ONNX file is the measured artifact, verified on the recorded accuracy.
    """
    try:
        sess = load_artifact(folder, runtime="onnxruntime")
    except ArtifactError as exc:
        return {"status": "rejected", "reason": str(exc)}
    max_diff, correct, correct_torch, agree = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in data.batches("test", 500):
            got = sess(x)
            correct += int((got.argmax(1) == y).sum())
            if reference is None:
                continue
            ref = reference(x)
            if got.shape != ref.shape:
                return {"status": "rejected", "reason": f"ONNX output shape {tuple(got.shape)} != {reference_name} {tuple(ref.shape)}"}
            max_diff = max(max_diff, float((got - ref).abs().max()))
            correct_torch += int((ref.argmax(1) == y).sum())
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
    if reference is None:
        return {
            "status": "measured",
            "opset": onnx_export.OPSET,
            "accuracy": correct / max(n_test, 1),
            "pytorch_artifact": None,
            "quantized": quantized,
            "reason": "no PyTorch artifact to compare with (int8 quantised by ONNX Runtime has no model.pt2; export --torchscript adds model.ts); model.onnx is the measured artifact, its accuracy verified",
        }
    info = {
        "opset": onnx_export.OPSET,
        "pytorch_artifact": reference_name,
        "max_abs_diff_vs_torch": max_diff,
        "accuracy": correct / max(n_test, 1),
        "accuracy_pytorch_artifact": correct_torch / max(n_test, 1),
        "predictions_equal": agree,
        "quantized": quantized,
        "criterion": f"int8: same test accuracy, same prediction on >= {onnx_export.INT8_AGREEMENT:.0%} of samples" if quantized else f"max |diff| <= {onnx_export.ATOL:g}",
    }
    reason = onnx_export.compare(max_diff, agree, n_test, correct, correct_torch, quantized=quantized and _is_quantized(reference))
    if quantized:
        # Two quantisers' int8 forms of the same float weights (ONNX Runtime's is the measured
        # model.onnx, torch.ao's the model.ts asked for), not copies of one model: how they differ
        # is recorded, never a rejection (they may disagree on a prediction in a few hundred).
        info["criterion"] = "independent int8 quantisations of the same float weights (ONNX Runtime's is the measured artifact): compared for information"
        return {"status": "ok", **info, **({"pytorch_artifact_differs": reason} if reason else {})}
    if reason is not None:
        return {"status": "rejected", "reason": reason, **info}
    return {"status": "ok", **info}


# --- weights ------------------------------------------------------------------------------


def _rebuild_matches(model: torch.nn.Module, reference: Any, name: str, data: Any) -> tuple[str | None, dict[str, Any]]:
    """None if ``model`` (the rebuilt eager module) computes what the PyTorch artifact ``name``
    computes on the test split, else what differs; with the numbers for the card. Both run PyTorch's
    kernels, so int8 models agree exactly on predictions and float ones to float rounding."""
    quantized = _is_quantized(reference)
    max_diff, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for x, _ in data.batches("test", 500):
            got, ref = model(x), reference(x)
            if got.shape != ref.shape:
                return f"output shape {tuple(got.shape)} != {name} {tuple(ref.shape)}", {}
            max_diff = max(max_diff, float((got - ref).abs().max()))
            agree += int((got.argmax(1) == ref.argmax(1)).sum())
            n += len(x)
    info = {"pytorch_artifact": name, "max_abs_diff_vs_pytorch_artifact": max_diff, "predictions_equal": agree, "n": n}
    if agree != n:
        return f"{n - agree} of {n} test predictions differ from {name}", info
    if not quantized and max_diff > onnx_export.ATOL:
        return f"max |diff| {max_diff:.3g} vs {name} > {onnx_export.ATOL:g}", info
    return None, info


def _same_weights(saved: dict[str, Any], model: dict[str, Any]) -> str | None:
    """None if every tensor of the exported model's state dict is in ``saved`` and equal, else what differs.

    ``saved`` may hold more: a TorchScript state dict omits entries kept in script objects (packed
    int8 weights of torch.ao quantised layers), which the eager state dict in the checkpoint has.
    """
    ts = {k: v for k, v in saved.items() if isinstance(v, torch.Tensor)}
    tm = {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(tm) - set(ts))
    if missing:
        return f"{len(missing)} tensors of the model are not in the file, e.g. {missing[:3]}"
    for k in tm:
        x, y = ts[k], tm[k]
        if x.is_quantized or y.is_quantized:
            x, y = x.dequantize(), y.dequantize()
        if x.shape != y.shape or not torch.equal(x, y):
            return f"tensor {k!r} differs"
    return None


# --- latency in a fresh process -------------------------------------------------------------


def _fresh_latency(folder: Path, inputs: torch.Tensor, latency: LatencySettings, *, per_sample: bool, timeout: float = 600.0) -> dict[str, Any]:
    """The exported artifact timed by a new Python process doing nothing else, with the function,
    settings and real test inputs trials use (``python -m automl._measure latency``)."""
    import tempfile

    if latency.runtime == "eager":
        return {"error": "the eager runtime ships no runnable file (weights and plan); nothing re-timed"}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(inputs.detach().cpu().contiguous(), Path(tmp) / "inputs.pt")
        cmd = [
            sys.executable, "-m", "automl._measure", "latency", str(folder),
            "--inputs", str(Path(tmp) / "inputs.pt"),
            "--settings", json.dumps(dataclasses.asdict(latency)),
        ]
        if per_sample:
            cmd.append("--per-sample")
        env = dict(os.environ)
        # The worker must import this same code (an editable install or PYTHONPATH already point here).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["latency process failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- environment ------------------------------------------------------------------------


def environment(latency: Any) -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": {p: version(p) for p in ("torch", "onnx", "onnxruntime", "safetensors", "optuna", "ray", "automl-compress")},
        "latency": {"runtime": latency.runtime, "device": latency.device, "batch_size": latency.batch_size, "threads": latency.threads, "warmup": latency.warmup, "repeats": latency.repeats},
    }


# --- the export ---------------------------------------------------------------------------


def _external_note(names: list[str]) -> str:
    if not names:
        return ""
    listed = ", ".join(f"`{n}`" for n in names)
    return f"\nThe weights are in {listed} (ONNX external data, for a model too large for one file): keep them beside `model.onnx`.\n"


def _usage(card: dict[str, Any]) -> str:
    shape = ", ".join(str(s) for s in card["input_shape"])
    weights = card["files"]["weights"]
    onnx = card["onnx"]
    onnx_part = (
        f"""## ONNX Runtime (no PyTorch needed)

```python
import numpy as np, onnxruntime as ort
sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
logits = sess.run(None, {{"input": np.zeros((1, {shape}), np.float32)}})[0]
```
{_external_note(card["files"].get("onnx_external_data") or [])}"""
        if card["files"].get("onnx")
        else f"## ONNX\n\nNot exported: {onnx.get('reason')}\n"
    )
    parts = []
    if card["files"].get("pt2"):
        parts.append(
            f"""## PyTorch program, `model.pt2` (needs only torch)

A `torch.export` program (`torch.export.save`); no Python class of this project is needed to run it.

```python
import torch
model = torch.export.load("model.pt2").module()
logits = model(torch.zeros(1, {shape}))
```
"""
        )
    if card["files"].get("torchscript"):
        why = "written on request (`automl export --torchscript`)" if (card.get("torchscript") or {}).get("written_by_export") else f"the artifact of the study's `{card.get('runtime')}` runtime or of an int8 model, which has no `.pt2`"
        parts.append(
            f"""## TorchScript, `model.ts` (needs only torch)

{why}; TorchScript is deprecated in PyTorch, prefer `model.pt2` where it is shipped.

```python
import torch
model = torch.jit.load("model.ts").eval()
logits = model(torch.zeros(1, {shape}))
```
"""
        )
    if not parts:
        why = card["files"].get("pt2_reason") or "no torch.export program"
        parts.append(f"## PyTorch\n\nNo `model.pt2`: {why}. `automl export --torchscript` adds a TorchScript `model.ts`; the plan and weights below rebuild the module.\n")
    torch_part = "\n".join(parts)
    m = card["metrics"]["recorded"]
    return f"""# Trial {card['trial']} of study {card['study']}: {card['method']}

Test accuracy {m.get('accuracy')} (re-verified on export), size {m.get('size_bytes')} bytes,
latency {m.get('latency_ms')} ms recorded / {card['metrics']['exported'].get('latency_ms')} ms re-timed in a fresh process
({card['environment']['latency']['runtime']} on {card['environment']['latency']['device']}, batch {card['environment']['latency']['batch_size']}, {card['environment']['latency']['threads']} thread(s)).
Input: float32 tensor of shape (batch, {shape}), preprocessed as in the study's dataset `{card.get('dataset')}`.
Output: logits (batch, classes). All numbers and the method chain are in `card.json`.

{torch_part}
{onnx_part}
## Plan and weights (the eager PyTorch module)

`{weights}` holds the state dict, nothing pickled (packed int8 weights as plain tensors and a
layout in the file's metadata); `trial.json` the plan that rebuilds the module it fits:

```python
import automl
model = automl.load_model(".")  # this folder: base architecture, chain replayed, weights loaded strictly
```
"""


# --- the steps of an export -----------------------------------------------------------------


def _recorded_metrics(row: FrontRow, record: dict[str, Any]) -> dict[str, Any]:
    """The trial's recorded numbers: the study's, completed by the checkpoint record's where the
    study has none (a value the study holds wins).

    Raises:
        ExportError: (code 2) no recorded accuracy, so nothing to verify against.
    """
    recorded = dict(row.metrics)
    for k, v in record.get("metrics", {}).items():
        if recorded.get(k) is None:
            recorded[k] = v
    if recorded.get("accuracy") is None:
        raise ExportError(f"trial {row.number} has no recorded accuracy to verify against")
    return recorded


def _checkpoint_runtime(folder: Path, record: dict[str, Any]) -> str:
    """The runtime the trial was measured on: the record's, else guessed from the files it holds
    (``model.onnx``: ONNX Runtime; ``model.ts``: TorchScript; neither: eager)."""
    if record.get("runtime"):
        return str(record["runtime"])
    if (folder / ONNX_FILE).is_file():
        return "onnxruntime"
    return "torchscript" if (folder / TORCHSCRIPT_FILE).is_file() else "eager"


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden ``.partial`` folder beside ``out`` to write into; renamed to ``out`` when the block
    ends without error (replacing an existing ``out``), removed on any error together with a
    parent folder made for it, so a failed export leaves nothing on disk."""
    created_parent = not out.parent.exists()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=False)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            try:
                out.parent.rmdir()
            except OSError:
                pass
        raise


def _copy_checkpoint_files(source: Path, dest: Path) -> None:
    """Byte for byte what the trial wrote: plan and weights (``automl.load_model(dest)`` rebuilds
    the module), the PyTorch artifact (``model.pt2``, or ``model.ts`` where the runtime is
    TorchScript or int8 has no .pt2) and the measured ``model.onnx`` with its external-data files
    (:func:`automl._artifact.artifact_files`)."""
    for name in (WEIGHTS, RECORD, PT2_FILE, TORCHSCRIPT_FILE, ONNX_FILE):
        if name not in (WEIGHTS, RECORD) and not (source / name).is_file():
            continue
        files = artifact_files(source / name) if name == ONNX_FILE else [source / name]
        for f in files:
            target = dest / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            os.chmod(target, 0o644)  # safetensors writes 0600; the folder is meant to be shared


class _Rebuilt:
    """The module ``automl.load_model`` rebuilt, and (made on first use) the form the PyTorch
    runtimes run: quantised by the model's recipe where it carries one, else the module itself."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.recipe = artifact_quantization(model)
        self._pytorch: torch.nn.Module | None = None

    def pytorch(self) -> torch.nn.Module:
        if self._pytorch is None:
            self._pytorch = self.recipe.quantize_torch(self.model, {}).eval() if self.recipe is not None else self.model.eval()
        return self._pytorch


def _write_torchscript(module: torch.nn.Module, example: torch.Tensor, folder: Path) -> None:
    """``--torchscript``: ``model.ts`` scripted (or traced) from the rebuilt module.

    Raises:
        ExportError: (code 1) the module does not become TorchScript.
    """
    try:
        scripted = to_torchscript(module, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # asked for: TorchScript's deprecation notice is known
            scripted.save(str(folder / TORCHSCRIPT_FILE))
    except Exception as exc:  # noqa: BLE001 - the flag asked for a file this model cannot give
        raise ExportError(f"--torchscript: the rebuilt module does not become TorchScript: {first_line(exc)}", code=1) from exc


def _accuracy_matches(accuracy: float, recorded: float, n_test: int) -> bool:
    """Whether two test accuracies on ``n_test`` samples count the same number of correct samples."""
    return abs(accuracy - recorded) < 0.5 / max(n_test, 1)


def _verify_accuracy(folder: Path, runtime: str, rebuilt: _Rebuilt, data: Any, recorded: float, *, trial: int) -> tuple[float, str]:
    """Check: the study runtime's artifact in ``folder`` reproduces the recorded test accuracy
    (the same number of correct test samples), by the function trials use.

    Returns:
        ``(accuracy, runtime verified)``.

    Raises:
        ExportError: code 2 where the artifact does not run; code 1 where the accuracy differs.
    """
    verify_runtime = runtime if runtime in ("onnxruntime", "torchscript", "eager") else "onnxruntime"
    try:
        artifact = eager_artifact(rebuilt.pytorch()) if verify_runtime == "eager" else load_artifact(folder, runtime=verify_runtime)
        acc = artifact_accuracy(artifact, data)
    except ArtifactError as exc:
        raise ExportError(f"trial {trial}: the checkpoint's {verify_runtime} artifact does not run: {exc}") from exc
    n_test = data.n("test")
    if not _accuracy_matches(acc, recorded, n_test):
        raise ExportError(
            f"verification failed: the exported {verify_runtime} model's test accuracy {acc:.6f} != recorded {recorded:.6f} ({n_test} test samples)",
            code=1,
        )
    return acc, verify_runtime


def _verify_rebuild(
    folder: Path, rebuilt: _Rebuilt, reference: Any, reference_name: str | None, data: Any, artifact_info: dict[str, Any], *, ts_written: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """Check: the weights file holds the PyTorch artifact's weights, and the module rebuilt from plan
    and weights computes what it computes. Returns the card's ``rebuild`` entry.

    Where the artifact was quantised when it was built (``artifact.json``: ``quantization``), the
    weights are the float ones the runtime's quantiser started from and the checkpoint's
    ``model.ts`` holds the quantised form: nothing to compare, unless export wrote that ``model.ts``
    itself (``--torchscript``) from the rebuilt module.

    Raises:
        ExportError: (code 1) the weights or the rebuilt module's outputs differ.
    """
    quantized = "quantization" in artifact_info
    if reference is None:
        why = "int8 quantised by ONNX Runtime when the artifact was built" if quantized else f"no model.pt2 ({(artifact_info.get('pt2') or {}).get('reason')})"
        log(f"rebuild: no PyTorch artifact in the checkpoint: {why}; model.onnx is compared with the rebuilt module below")
        return {"skipped": f"{why}: no PyTorch artifact to compare the rebuilt module with", "pytorch_artifact": None}
    if quantized and not ts_written:
        log(f"weights: the float weights the runtime quantised ({artifact_info['quantization'].get('mode')}); {reference_name} is their quantised form")
        return {"skipped": "the artifact is quantised from the rebuilt float module when it is built", "pytorch_artifact": reference_name}
    if not quantized:
        diff = _same_weights(read_weights(folder / WEIGHTS), reference.state_dict())
        if diff is not None:
            raise ExportError(f"verification failed: {WEIGHTS} does not match {reference_name}: {diff}", code=1)
    diff, info = _rebuild_matches(rebuilt.pytorch() if quantized else rebuilt.model, reference, reference_name, data)
    if diff is not None:
        raise ExportError(f"verification failed: the module automl.load_model rebuilds from plan and weights differs from {reference_name}: {diff}", code=1)
    log(f"verified: the module rebuilt from plan and weights computes what {reference_name} computes")
    return info


def _verify_torchscript(folder: Path, rebuilt: _Rebuilt, reference_name: str | None, data: Any, rebuild_info: dict[str, Any], *, ts_written: bool, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Check: a ``model.ts`` shipped beside ``model.pt2`` computes what the rebuilt module computes.
    Returns the card's ``torchscript`` entry (None where no such file ships).

    Raises:
        ExportError: (code 1) it computes something else.
    """
    info: dict[str, Any] | None = None
    if (folder / TORCHSCRIPT_FILE).is_file() and reference_name != TORCHSCRIPT_FILE:
        ts_module = _jit_load(folder / TORCHSCRIPT_FILE).eval()
        diff, info = _rebuild_matches(rebuilt.pytorch(), ts_module, TORCHSCRIPT_FILE, data)
        if diff is not None:
            raise ExportError(f"verification failed: the module automl.load_model rebuilds from plan and weights differs from {TORCHSCRIPT_FILE}: {diff}", code=1)
        log(f"verified: {TORCHSCRIPT_FILE} computes what the rebuilt module computes")
    if info is not None or ts_written:
        return {**(info or rebuild_info), "written_by_export": ts_written}
    return None


def _verify_onnx(
    folder: Path, rebuilt: _Rebuilt, reference: Any, reference_name: str | None, data: Any, *, onnx_measured: bool, quantized: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """Check: ONNX Runtime's outputs against the PyTorch artifact's on the whole test split
    (:func:`_check_onnx`). Returns the card's ``onnx`` entry.

    Where the trial did not time ONNX Runtime, ``model.onnx`` is made here first (from
    ``model.pt2`` by the dynamo exporter, else from the TorchScript or rebuilt module); such an
    extra file that fails to export or to match is removed, not shipped. A measured ``model.onnx``
    (verified by :func:`_verify_accuracy`) always ships, and the entry says how the PyTorch artifact
    differs from it, if it does.
    """
    path = folder / ONNX_FILE
    info: dict[str, Any] = {}
    if not onnx_measured:
        try:
            # Written beside and moved in when done, so a failed export leaves none of its files.
            with tempfile.TemporaryDirectory(dir=folder, prefix=".onnx-") as scratch:
                written = Path(scratch) / ONNX_FILE
                if reference_name == PT2_FILE:  # the program export ships, translated by the dynamo exporter
                    onnx_export.to_onnx(torch.export.load(str(folder / PT2_FILE)), data.example(), written, keep=onnx_export.onnx_initializers(rebuilt.model))
                else:
                    onnx_export.to_onnx(reference if reference is not None else rebuilt.pytorch(), data.example(), written)
                move_onnx(written, folder)
        except Exception as exc:  # noqa: BLE001 - say what does not export instead of failing the whole export
            info = {"status": "unsupported", "reason": f"torch.onnx.export failed: {first_line(exc)}"}
    n_test = data.n("test")
    if path.is_file():
        if reference is None and not quantized:
            # A float model torch.export cannot capture (Python control flow on tensor values):
            # the checkpoint has only model.onnx, so it is compared with the rebuilt module.
            info = _check_onnx(rebuilt.model.eval(), "automl.load_model", folder, data, n_test, quantized=False)
        else:
            info = _check_onnx(reference, reference_name, folder, data, n_test, quantized=quantized)
    if info["status"] == "ok":
        log(f"verified: ONNX Runtime matches {reference_name} ({info['criterion']}; max |diff| {info['max_abs_diff_vs_torch']:.2e}), accuracy {info['accuracy']:.4f}")
    elif onnx_measured:
        log(f"ONNX is the measured artifact: {info.get('reason')}")
    else:
        remove_artifact(path)
        log(f"ONNX: not shipped ({info['reason']})")
    return info


@dataclass
class _Checks:
    """What the checks found, for the card."""

    #: Test accuracy of the study runtime's artifact, and that runtime.
    accuracy: float
    accuracy_runtime: str
    rebuild: dict[str, Any]
    torchscript: dict[str, Any] | None
    onnx: dict[str, Any]
    #: The fresh process's timing (``latency_ms``, ``latency_iqr_ms``), or why there is none.
    latency: dict[str, Any]


def _build_card(
    view: StudyView,
    row: FrontRow,
    study_dir: Path,
    folder: Path,
    record: dict[str, Any],
    *,
    recorded: dict[str, Any],
    checks: _Checks,
    runtime: str,
    input_shape: list[int],
    n_test: int,
    reference_name: str | None,
    artifact_info: dict[str, Any],
    latency: LatencySettings,
) -> dict[str, Any]:
    """The export's ``card.json``: where the trial comes from, what it is, its recorded and
    re-measured numbers, what the checks found, the files in ``folder`` and the environment."""
    plan = record.get("plan", {})
    has = lambda name: (folder / name).is_file()  # noqa: E731
    return {
        "study": view.name,
        "study_dir": str(study_dir.resolve()),
        "dataset": view.attrs.get("dataset"),
        "base_model": view.attrs.get("base_model"),
        "trial": row.number,
        "derived_from": row.attrs.get("derived_from"),
        "ray_trial_id": row.attrs.get("ray_trial_id"),
        "method": row.method,
        "chain": plan.get("chain", []),
        "finetune": plan.get("finetune", {}),
        "search_params": row.params,
        "notes": record.get("notes", {}),
        "input_shape": input_shape,
        "runtime": runtime,
        "objectives": dict(zip(view.objectives, view.directions)),
        "on_front": any(r.number == row.number for r in view.front),
        "metrics": {
            "recorded": recorded,
            "exported": {
                "accuracy": checks.accuracy,
                "accuracy_runtime": checks.accuracy_runtime,
                "accuracy_onnx": checks.onnx.get("accuracy"),
                "latency_ms": checks.latency.get("latency_ms"),
                "latency_iqr_ms": checks.latency.get("latency_iqr_ms"),
                "latency_error": checks.latency.get("error"),
                "latency_target": checks.latency.get("latency_target"),
                "size_bytes_weights_file": (folder / WEIGHTS).stat().st_size,
                "n_test": n_test,
            },
            "base": view.base,
            "compression": row.compression,
            "speedup": row.speedup,
        },
        "onnx": checks.onnx,
        "rebuild": checks.rebuild,
        "torchscript": checks.torchscript,
        "files": {
            "pt2": PT2_FILE if has(PT2_FILE) else None,
            "pt2_reason": None if has(PT2_FILE) else (artifact_info.get("pt2") or {}).get("reason"),
            "torchscript": TORCHSCRIPT_FILE if has(TORCHSCRIPT_FILE) else None,
            "pytorch_artifact": reference_name,
            "onnx": ONNX_FILE if has(ONNX_FILE) else None,
            # The files beside the graph where a model too large for one ONNX file keeps its weights.
            "onnx_external_data": [f.relative_to(folder).as_posix() for f in artifact_files(folder / ONNX_FILE)[1:]] if has(ONNX_FILE) else [],
            "weights": WEIGHTS,
            "plan": RECORD,
            "usage": "README.md",
        },
        "environment": environment(latency),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def export_trial(
    view: StudyView,
    row: FrontRow,
    out: Path,
    *,
    study_dir: Path,
    load_data: Callable[[], Any],
    latency: LatencySettings,
    force: bool = False,
    measure_latency: bool = True,
    torchscript: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Export ``row``'s trial to ``out`` after verifying it; returns the card.

    Args:
        load_data: returns the study's splits (called only once the checkpoint is known to be good).
        latency: the study's latency settings (runtime, device, batch size, threads, ...).
        force: replace an existing ``out`` folder.
        torchscript: also ship ``model.ts`` (scripted or traced from the rebuilt module, int8
            quantised as the PyTorch runtimes quantise it), verified like the other files; without
            it ``model.ts`` ships only where the checkpoint has one (the torchscript runtime).

    Raises:
        ExportError: code 2 for a missing/corrupted checkpoint or an existing ``out``; code 1 when a
            verification fails. Nothing is left on disk in either case.
    """
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"output folder {out} already exists; pass --force to replace it or --out to choose another")
    ckpt = load_trial_checkpoint(study_dir, row)
    recorded = _recorded_metrics(row, ckpt.record)
    onnx_measured = (ckpt.folder / ONNX_FILE).is_file()  # the trial timed ONNX Runtime
    runtime = _checkpoint_runtime(ckpt.folder, ckpt.record)
    per_sample = bool(ckpt.record.get("per_sample"))
    data = load_data()
    input_shape = list(ckpt.record.get("input_shape") or data.input_shape)

    with _staging(out) as tmp:
        _copy_checkpoint_files(ckpt.folder, tmp)
        info_file = ckpt.folder / "artifact.json"
        artifact_info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        quantized = "quantization" in artifact_info
        rebuilt = _Rebuilt(ckpt.model)
        ts_written = torchscript and not (tmp / TORCHSCRIPT_FILE).is_file()
        if ts_written:
            _write_torchscript(rebuilt.pytorch(), data.example(), tmp)
        reference_name, reference = _load_reference(tmp)

        acc, verify_runtime = _verify_accuracy(tmp, runtime, rebuilt, data, float(recorded["accuracy"]), trial=row.number)
        log(f"verified: {verify_runtime} test accuracy {acc:.4f} equals the recorded {float(recorded['accuracy']):.4f}")
        rebuild_info = _verify_rebuild(tmp, rebuilt, reference, reference_name, data, artifact_info, ts_written=ts_written, log=log)
        torchscript_info = _verify_torchscript(tmp, rebuilt, reference_name, data, rebuild_info, ts_written=ts_written, log=log)
        onnx_info = _verify_onnx(tmp, rebuilt, reference, reference_name, data, onnx_measured=onnx_measured, quantized=quantized, log=log)

        # Latency of the exported runtime's file in a fresh, otherwise idle process: information,
        # not a check (the machine may be busy).
        fresh: dict[str, Any] = {"skipped": True}
        if measure_latency:
            inputs = latency_inputs(data, latency, dynamic=per_sample)
            fresh = _fresh_latency(tmp, inputs, dataclasses.replace(latency, runtime=runtime), per_sample=per_sample)
        if "latency_ms" in fresh:
            log(f"latency: {fresh['latency_ms']:.3f} ms ({runtime}) re-timed in a fresh process (recorded {recorded.get('latency_ms') or float('nan'):.3f} ms)")

        checks = _Checks(accuracy=acc, accuracy_runtime=verify_runtime, rebuild=rebuild_info, torchscript=torchscript_info, onnx=onnx_info, latency=fresh)
        card = _build_card(
            view, row, study_dir, tmp, ckpt.record, recorded=recorded, checks=checks, runtime=runtime, input_shape=input_shape,
            n_test=data.n("test"), reference_name=reference_name, artifact_info=artifact_info, latency=latency,
        )
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str))
        (tmp / "README.md").write_text(_usage(card))
    return card
