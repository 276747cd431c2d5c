"""The deployable artifact of a model for one runtime: built once, timed, checkpointed and exported.

What a study records for a model is measured on the artifact ``automl export`` ships for the
configured ``latency.runtime``, not on the Python module that produced it:

- ``onnxruntime``: ``model.onnx`` (made from the TorchScript model, see :mod:`automl._onnx`) run by an
  ONNX Runtime session with ``latency.threads`` intra-op threads (CUDA provider for ``cuda``);
- ``torchscript``: ``model.ts`` as ``torch.jit.load`` gives it back;
- ``eager``: the PyTorch module itself (shipped as weights plus the plan that rebuilds it).

``model.ts`` is written for every runtime (export ships it beside the ONNX file). A model that cannot
become its runtime's artifact raises :class:`ArtifactError` with the reason; the trial fails with it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from automl._latency import torch_threads

__all__ = ["Artifact", "ArtifactError", "DynamicInference", "build_artifact", "eager_artifact", "load_artifact", "state_dict_bytes", "to_torchscript"]

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"


class ArtifactError(RuntimeError):
    """A model cannot be turned into (or loaded as) its runtime's artifact; the message says why."""


@runtime_checkable
class DynamicInference(Protocol):
    """A model whose work depends on its input, e.g. early exits (``searchspace.methods.exits``).

    ``exit_indices(x)`` gives the exit each sample of ``x`` leaves at, under the model's current
    settings; ``exit_paths()`` gives, per exit, a module that runs exactly what a sample leaving
    there runs (for counting MACs with the same counter as every other model). Such a model is
    compiled with ``torch.jit.script`` (its control flow depends on the data, so tracing would
    freeze one path) and timed per sample.
    """

    def exit_indices(self, x: torch.Tensor) -> torch.Tensor: ...

    def exit_paths(self) -> list[nn.Module]: ...


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what the weights file of the eager runtime holds."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def to_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The TorchScript form of ``model``: scripted, or traced where a static model does not script.

    A static model runs the same ops for every input, so tracing records it exactly where scripting
    cannot compile it (e.g. a ``super().forward`` call). A dynamic model (:class:`DynamicInference`)
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
                raise ArtifactError(f"torchscript: a model with input-dependent control flow must script, but torch.jit.script failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        try:
            with torch.no_grad():
                return torch.jit.trace(model, example.cpu(), check_trace=False)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"torchscript: torch.jit.script and torch.jit.trace both failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


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
    #: Bytes of the deployed artifact: the ONNX / TorchScript file, or the state dict for ``eager``.
    size_bytes: int
    _run: Callable[[Any], Any]
    _prepare: Callable[[torch.Tensor], Any]
    _to_tensor: Callable[[Any], torch.Tensor]

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
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime lacks a kernel or rejects the graph
        raise ArtifactError(f"onnxruntime cannot load {path.name}: {type(exc).__name__}: {_first_line(exc)}") from exc
    name = session.get_inputs()[0].name
    return Artifact(
        runtime="onnxruntime",
        device=device,
        threads=threads,
        path=path,
        size_bytes=path.stat().st_size,
        _run=lambda feed: session.run(None, feed)[0],
        _prepare=lambda x: {name: x.detach().cpu().contiguous().numpy()},
        _to_tensor=lambda y: torch.from_numpy(y),
    )


def build_artifact(model: nn.Module, example: torch.Tensor, folder: Path, *, runtime: str = "onnxruntime", device: str = "cpu", threads: int = 1) -> Artifact:
    """Write ``model``'s files for ``runtime`` into ``folder`` and open them as that runtime runs them.

    ``model.ts`` is always written; ``model.onnx`` for ``onnxruntime``. The returned artifact runs
    the written files as they were reloaded (what export ships), not the module in memory.

    Raises:
        ArtifactError: the model cannot be turned into this runtime's artifact.
    """
    from automl import _onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    scripted = to_torchscript(model, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted.save(str(folder / TORCHSCRIPT_FILE))
    if runtime == "onnxruntime":
        try:
            _onnx.to_onnx(scripted, example.cpu(), folder / ONNX_FILE)
        except Exception as exc:  # noqa: BLE001 - any exporter error is the reason the trial fails
            (folder / ONNX_FILE).unlink(missing_ok=True)
            raise ArtifactError(f"onnx: torch.onnx.export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    if runtime == "eager":
        return eager_artifact(model, device=device, threads=threads)
    return load_artifact(folder, runtime=runtime, device=device, threads=threads)


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
            raise ArtifactError(f"{path} does not load: {type(exc).__name__}: {_first_line(exc)}") from exc
        return _torch_artifact("torchscript", module, device, threads, path, path.stat().st_size)
    raise ArtifactError(f"runtime {runtime!r} has no artifact file to load; allowed: onnxruntime, torchscript")
