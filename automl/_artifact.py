"""The deployable artifact of a model for one runtime: built once, timed, checkpointed and exported.

What a study records for a model is measured on the artifact ``automl export`` ships for the
configured ``latency.runtime``, not on the Python module that produced it:

- ``onnxruntime``: ``model.onnx``, made from the eager module by ``torch.export`` and the dynamo
  ONNX exporter (:mod:`automl._onnx`), run by an ONNX Runtime session with ``latency.threads``
  intra-op threads (CUDA provider for ``cuda``);
- ``torchscript``: ``model.ts`` as ``torch.jit.load`` gives it back;
- ``eager``: the PyTorch module itself (shipped as weights plus the plan that rebuilds it).

Beside it, for every runtime, ``model.pt2``: the PyTorch model as a ``torch.export`` program
(``torch.export.save``; ``torch.export.load(path).module()`` runs it), from the same capture the
ONNX file is translated from. ``model.ts`` is written only for the ``torchscript`` runtime or when
asked (``torchscript=True``). ``artifact.json`` records how each file was made (exporter, torch
version, quantiser, and why a file was not written), for the checkpoint record and the card.

Quantisation declared at artifact time (a model carrying a
:class:`searchspace.ArtifactQuantization` recipe, e.g. ``int8``) is done here, by the runtime's own
tools: the float ONNX file is quantised by the recipe (ONNX Runtime's quantiser) for
``onnxruntime``, the module for the PyTorch runtimes; size and accuracy are the quantised artifact's.

An ONNX model too large for one file (torch's exporter switches at 1.5 GiB of weights, under the
2 GiB protobuf limit) keeps its weights in external-data files beside the graph (``model.onnx.data``).
They are part of the artifact: :func:`artifact_files` lists an artifact's files (for ONNX, read
from the graph's external-data references), :func:`artifact_bytes` is its size, and every reader,
copier and measurer of an artifact uses them. ONNX files are written in a scratch folder inside
the artifact's and moved in when complete, so a failed export or the float model an int8 recipe
quantises leaves nothing behind.

A model that cannot become its runtime's artifact raises :class:`ArtifactError` with the reason;
the trial fails with it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from automl._latency import torch_threads
from searchspace import DynamicInference, artifact_quantization
from searchspace._reason import first_line

__all__ = [
    "Artifact", "ArtifactError", "artifact_bytes", "artifact_files", "build_artifact", "eager_artifact", "load_artifact", "move_onnx", "onnx_files",
    "remove_artifact", "state_dict_bytes", "to_torchscript",
]

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
PT2_FILE = "model.pt2"
#: How the files in the folder were made (see the module docstring).
INFO_FILE = "artifact.json"


class ArtifactError(RuntimeError):
    """A model cannot be turned into (or loaded as) its runtime's artifact; the message says why."""


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what the weights file of the eager runtime holds."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def onnx_files(path: Path) -> list[Path]:
    """The files the ONNX model at ``path`` is made of: ``path`` (the graph), then each file its
    tensors keep their data in (external data), in the order first referenced.

    A model whose weights do not fit the 2 GiB protobuf limit keeps them beside the graph: torch's
    dynamo exporter does so by itself once the initializers pass 1.5 GiB (``model.onnx.data``),
    ONNX Runtime's quantiser when told to (``<output>.data``), the TorchScript-based exporter in one
    file per tensor. The files are read from the graph's external-data references, not guessed from
    those names; only the graph is parsed (``load_external_data=False``), never the data.

    Raises:
        ArtifactError: ``path`` does not parse as ONNX, or a tensor's data file is missing or lies
            outside ``path``'s folder (it would not travel with the artifact).
    """
    return _onnx_files(Path(path), check=True)


def _onnx_files(path: Path, *, check: bool) -> list[Path]:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse error: not an ONNX model
        raise ArtifactError(f"{path.name} does not parse as ONNX: {first_line(exc)}") from exc
    folder = path.parent.resolve()
    files = [path]
    for tensor in _get_all_tensors(model):  # initializers and attribute tensors, subgraphs included
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        data = (path.parent / location).resolve()
        if not data.is_relative_to(folder):
            raise ArtifactError(f"the external data of an ONNX model must lie in its folder, but {path.name} keeps tensor {tensor.name!r} in {location!r}")
        data = path.parent / data.relative_to(folder)
        if data in files:
            continue
        if check and not data.is_file():
            raise ArtifactError(f"{path.name} keeps tensor {tensor.name!r} in {location!r}, which is missing")
        files.append(data)
    return files


def artifact_files(path: Path) -> list[Path]:
    """The files the artifact at ``path`` ships as: an ONNX model's graph and external data
    (:func:`onnx_files`), else the file itself (``model.ts``)."""
    path = Path(path)
    return onnx_files(path) if path.suffix == ".onnx" else [path]


def artifact_bytes(path: Path) -> int:
    """Bytes of the artifact at ``path`` as shipped: the sum over :func:`artifact_files`.

    This is ``size_bytes`` for the file runtimes (:mod:`automl._measure`), and what a trial's
    checkpoint, the latency target and an export carry.
    """
    return sum(f.stat().st_size for f in artifact_files(path))


def remove_artifact(path: Path) -> None:
    """Remove the artifact at ``path`` and every file of it (:func:`artifact_files`); nothing if absent."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        files = _onnx_files(path, check=False) if path.suffix == ".onnx" else [path]
    except ArtifactError:
        files = [path]  # a graph that does not parse references nothing readable: remove what is there
    for f in files:
        f.unlink(missing_ok=True)


def move_onnx(path: Path, folder: Path) -> Path:
    """Move the ONNX model at ``path`` (:func:`onnx_files`, names and relative places kept, so its
    external-data references stay true) into ``folder``, replacing what was there under the same
    name; return its new path. Same filesystem: renames, not copies."""
    folder = Path(folder)
    dest = folder / Path(path).name
    remove_artifact(dest)
    for f in onnx_files(path):
        target = folder / f.relative_to(Path(path).parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target)
    return dest


def to_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The TorchScript form of ``model``: scripted, or traced where a static model does not script.

    A static model runs the same ops for every input, so tracing records it exactly where scripting
    cannot compile it (e.g. a ``super().forward`` call). A dynamic model (:class:`searchspace.DynamicInference`)
    must script: tracing would freeze one path, so it fails with the reason instead.

    Raises:
        ArtifactError: the model can be neither scripted nor (static only) traced.
    """
    model = model.eval()
    with torch.no_grad():
        model(example.cpu())  # fill inference-time caches (T-Net's kernels) before a trace records them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice on every call
        try:
            return torch.jit.script(model)
        except Exception as exc:  # noqa: BLE001 - any compile error is the reason
            if isinstance(model, DynamicInference):
                raise ArtifactError(f"torchscript: a model with input-dependent control flow must script, but torch.jit.script failed: {first_line(exc)}") from exc
        try:
            with torch.no_grad():
                return torch.jit.trace(model, example.cpu(), check_trace=False)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"torchscript: torch.jit.script and torch.jit.trace both failed: {first_line(exc)}") from exc


@dataclass
class Artifact:
    """A model as its runtime runs it: ``artifact(x)`` gives logits as a CPU tensor.

    ``bind(x)`` returns a no-argument call that runs the artifact on ``x`` with the input already
    in the runtime's form (device, NumPy), so timing counts the model, not the conversion.
    """

    runtime: str
    device: str
    threads: int
    #: The file shipped for this runtime (None for ``eager``, which ships weights and the plan).
    path: Path | None
    #: Bytes of the deployed artifact (:func:`artifact_bytes`): the ONNX graph and its external
    #: data, the TorchScript file, or the state dict for ``eager``.
    size_bytes: int
    _run: Callable[[Any], Any]
    _prepare: Callable[[torch.Tensor], Any]
    _to_tensor: Callable[[Any], torch.Tensor]
    #: How the files were made (``artifact.json``; empty for an artifact loaded from files).
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.context():
            return self._to_tensor(self._run(self._prepare(x)))

    def bind(self, x: torch.Tensor) -> Callable[[], Any]:
        feed = self._prepare(x)
        run = self._run
        return lambda: run(feed)

    def sync(self) -> None:
        """Wait for queued device work (CUDA); a no-op on the CPU."""
        if self.device == "cuda" and self.runtime != "onnxruntime":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """What must hold while the artifact runs: no autograd and the thread count, for PyTorch."""
        if self.runtime == "onnxruntime":
            yield  # the session owns its threads
            return
        with torch.no_grad(), torch_threads(self.threads):
            yield


def _torch_artifact(runtime: str, module: nn.Module, device: str, threads: int, path: Path | None, size: int) -> Artifact:
    if device == "cuda" and not torch.cuda.is_available():
        raise ArtifactError("latency.device is 'cuda' but PyTorch finds no CUDA device on this node")
    module = module.eval().to(device)
    return Artifact(
        runtime=runtime,
        device=device,
        threads=threads,
        path=path,
        size_bytes=size,
        _run=module,
        _prepare=lambda x: x.to(device),
        _to_tensor=lambda y: y.detach().float().cpu(),
    )


def _onnx_artifact(path: Path, device: str, threads: int) -> Artifact:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ArtifactError("latency.device is 'cuda' but this ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    size = artifact_bytes(path)  # first: a missing external-data file is named here
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime lacks a kernel or rejects the graph
        raise ArtifactError(f"onnxruntime cannot load {path.name}: {first_line(exc)}") from exc
    name = session.get_inputs()[0].name
    return Artifact(
        runtime="onnxruntime",
        device=device,
        threads=threads,
        path=path,
        size_bytes=size,
        _run=lambda feed: session.run(None, feed)[0],
        _prepare=lambda x: {name: x.detach().cpu().contiguous().numpy()},
        _to_tensor=lambda y: torch.from_numpy(y),
    )


def build_artifact(
    model: nn.Module,
    example: torch.Tensor,
    folder: Path,
    *,
    runtime: str = "onnxruntime",
    device: str = "cpu",
    threads: int = 1,
    torchscript: bool | None = None,
    like: Path | None = None,
) -> Artifact:
    """Write ``model``'s files for ``runtime`` into ``folder`` and open them as that runtime runs them.

    ``model.pt2`` is always attempted (a model ``torch.export`` cannot capture gets the reason in
    ``artifact.json``); ``model.onnx`` is written for ``onnxruntime``; ``model.ts`` for
    ``torchscript`` or when ``torchscript`` is True. The returned artifact runs the written files as
    they were reloaded (what export ships), not the module in memory.

    ``like``: a folder this function wrote for the same model in another of its settings, where the
    settings differ only in the buffers the model keeps as named ONNX initializers (an operating
    point of a calibrated model, e.g. other exit thresholds). Its files are copied with those buffers
    set to ``model``'s (:func:`_rebind`) instead of capturing and exporting again, when everything
    else in the program's state equals ``model``'s; otherwise the files are built from scratch.

    Raises:
        ArtifactError: the model cannot be turned into this runtime's artifact.
    """
    from automl import _onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example = example.cpu()
    write_ts = runtime == "torchscript" if torchscript is None else bool(torchscript)
    recipe = artifact_quantization(model)
    if like is not None and runtime == "onnxruntime" and not write_ts and recipe is None:
        info = _rebind(model, Path(like), folder)
        if info is not None:
            artifact = load_artifact(folder, runtime=runtime, device=device, threads=threads)
            artifact.info = info
            return artifact
    info: dict[str, Any] = {"runtime": runtime, "torch": torch.__version__.split("+")[0]}
    torch_model = model
    if recipe is not None:
        info["quantization"] = recipe.describe()
        if runtime != "onnxruntime" or write_ts:
            notes: dict[str, Any] = {}
            try:
                torch_model = recipe.quantize_torch(model, notes)
            except Exception as exc:  # noqa: BLE001 - the quantiser's reason is the trial's
                raise ArtifactError(f"quantisation for PyTorch failed: {first_line(exc)}") from exc
            info["quantization"]["torch"] = {"quantizer": "torch.ao.quantization (x86)", **notes}

    # The PyTorch program (model.pt2) and the capture the ONNX file is translated from.
    program = None
    if recipe is None:
        try:
            program = _onnx.export_program(model, example)
            torch.export.save(program, str(folder / PT2_FILE))
            info["pt2"] = {"file": PT2_FILE, "exporter": "torch.export"}
        except Exception as exc:  # noqa: BLE001 - recorded; for onnxruntime the ONNX export below fails too
            (folder / PT2_FILE).unlink(missing_ok=True)
            info["pt2"] = {"file": None, "reason": f"torch.export failed: {first_line(exc)}"}
    else:
        # torch.export cannot capture torch.ao's quantised modules, and torchao's PT2E program runs
        # reference (dequantise-float-quantise) ops without inductor: see searchspace.methods.int8.
        info["pt2"] = {"file": None, "reason": f"int8 has no torch.export program here: {_onnx.LEGACY_REASON}; torchao PT2E runs int8 only through torch.compile"}

    if write_ts:
        try:
            scripted = to_torchscript(torch_model, example)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # asked for: TorchScript's deprecation notice is known
                scripted.save(str(folder / TORCHSCRIPT_FILE))
            info["torchscript"] = {"file": TORCHSCRIPT_FILE}
        except ArtifactError as exc:
            if runtime == "torchscript":
                raise
            # An extra file, not the measured artifact: say why it is missing instead of failing.
            (folder / TORCHSCRIPT_FILE).unlink(missing_ok=True)
            info["torchscript"] = {"file": None, "reason": str(exc)}
    if runtime == "onnxruntime":
        # Written in a scratch folder beside the artifact and moved in only when done: whatever the
        # exporters and the quantiser leave (a failed export's files, the float model and its
        # external data, the quantiser's shape-inferred copy) goes with the folder.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".onnx-") as scratch:
            written = _write_onnx(model, program, example, recipe, info, Path(scratch))
            move_onnx(written, folder)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    if runtime == "eager":
        artifact = eager_artifact(torch_model, device=device, threads=threads)
    else:
        artifact = load_artifact(folder, runtime=runtime, device=device, threads=threads)
    artifact.info = info
    return artifact


def _write_onnx(model: nn.Module, program: Any, example: torch.Tensor, recipe: Any, info: dict[str, Any], scratch: Path) -> Path:
    """Export ``model`` (its ``program`` where there is one) to ``scratch``, quantised by ``recipe``
    where there is one; record how in ``info["onnx"]`` and return the written model's path."""
    from automl import _onnx

    target = scratch / ONNX_FILE
    float_path = scratch / "model.float.onnx" if recipe is not None else target
    keep = _onnx.onnx_initializers(model)
    try:
        if recipe is None and program is None:
            raise ArtifactError(info["pt2"]["reason"])
        info["onnx"] = _onnx.to_onnx(program if program is not None else model, example, float_path, keep=keep)
    except Exception as exc:  # noqa: BLE001 - any exporter error is the reason, kept below
        remove_artifact(float_path)
        dynamo_error = first_line(exc, named=False) if isinstance(exc, ArtifactError) else first_line(exc)
        # A model torch.export cannot capture (Python control flow on tensor values in a
        # user's model, not torch.cond) may still script: the legacy exporter, and the card says why.
        try:
            scripted = to_torchscript(model, example)
            info["onnx"] = _onnx.to_onnx(scripted, example, float_path, keep=keep or None)
        except Exception as legacy_exc:  # noqa: BLE001
            raise ArtifactError(
                f"onnx: torch.onnx.export(dynamo=True) failed: {dynamo_error}; the legacy exporter too: "
                f"{first_line(legacy_exc)}"
            ) from exc
        info["onnx"]["reason"] = f"torch.export failed ({dynamo_error}); the TorchScript-based exporter took the scripted model"
    if recipe is not None:
        try:
            info["onnx"]["quantization"] = recipe.quantize_onnx(float_path, target)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"onnx: quantisation by ONNX Runtime failed: {first_line(exc)}") from exc
    return target


def _rebind(model: nn.Module, like: Path, folder: Path) -> dict[str, Any] | None:
    """``like``'s ``model.pt2`` and ``model.onnx`` with the named-initializer buffers of ``model``
    (:func:`automl._onnx.onnx_initializers`) written into ``folder``; the files' info, or None
    (nothing written) where ``like`` does not hold the same program up to those buffers.

    The ONNX file keeps those buffers as initializers named by their state-dict key (the exporter
    does not fold them into the graph), and ``torch.export`` lifts them into the program's state,
    so setting them there is what a fresh capture and export of ``model`` would write.
    """
    import onnx
    from onnx import numpy_helper

    from automl import _onnx

    try:
        info = json.loads((like / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    onnx_info = info.get("onnx") or {}
    keep = _onnx.onnx_initializers(model)
    if (
        not keep
        or info.get("runtime") != "onnxruntime"
        or "quantization" in info
        or (info.get("pt2") or {}).get("file") != PT2_FILE
        or onnx_info.get("exporter") != "torch.onnx.export(dynamo=True)"
        or sorted(onnx_info.get("named_initializers") or ()) != sorted(keep)
    ):
        return None
    state = model.state_dict()
    settable = {k for k in state if k.rsplit(".", 1)[-1] in keep}
    program = torch.export.load(str(like / PT2_FILE))
    held = {**program.state_dict, **program.constants}
    if set(held) != set(state) or any(not torch.equal(held[k], v) for k, v in state.items() if k not in settable):
        return None
    # The graph only: tensors kept as external data stay references, and their files are copied
    # beside the new graph under the same names, so the references stay true.
    graph = onnx.load(str(like / ONNX_FILE), load_external_data=False)
    slots = {init.name: init for init in graph.graph.initializer if init.name in settable}
    if set(slots) != settable:
        return None
    for k in settable:
        value = state[k].detach().clone()
        if k in program.state_dict:
            program.state_dict[k] = value
        else:
            program.constants[k] = value
        slots[k].CopyFrom(numpy_helper.from_array(value.numpy(), k))
    torch.export.save(program, str(folder / PT2_FILE))
    remove_artifact(folder / ONNX_FILE)
    for f in onnx_files(like / ONNX_FILE)[1:]:
        (folder / f.relative_to(like)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, folder / f.relative_to(like))
    # A rebound slot is now inline (CopyFrom replaced its external reference); its old bytes in the
    # copied data file are unread.
    onnx.save(graph, str(folder / ONNX_FILE))
    info = {**info, "onnx": {**onnx_info, "rebound_from": like.name, "rebound": sorted(settable)}}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return info


def eager_artifact(model: nn.Module, *, device: str = "cpu", threads: int = 1) -> Artifact:
    """The ``eager`` runtime's artifact: the module itself (nothing is written)."""
    return _torch_artifact("eager", model, device, threads, None, state_dict_bytes(model))


def load_artifact(folder: Path, *, runtime: str = "onnxruntime", device: str = "cpu", threads: int = 1) -> Artifact:
    """Open the artifact files in ``folder`` (a checkpoint or an export) for ``runtime``.

    Raises:
        ArtifactError: the file is missing or does not load (``eager`` has no file: use
            :func:`build_artifact` on the rebuilt module).
    """
    folder = Path(folder)
    if runtime == "onnxruntime":
        path = folder / ONNX_FILE
        if not path.is_file():
            raise ArtifactError(f"{folder} holds no {ONNX_FILE}")
        return _onnx_artifact(path, device, threads)
    if runtime == "torchscript":
        path = folder / TORCHSCRIPT_FILE
        if not path.is_file():
            raise ArtifactError(f"{folder} holds no {TORCHSCRIPT_FILE}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"{path} does not load: {first_line(exc)}") from exc
        return _torch_artifact("torchscript", module, device, threads, path, artifact_bytes(path))
    raise ArtifactError(f"runtime {runtime!r} has no artifact file to load; allowed: onnxruntime, torchscript")
