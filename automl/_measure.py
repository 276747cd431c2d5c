"""Every number the study reports, defined once and used by trials, the base, export and benchmarks.

- ``accuracy``: top-1 accuracy of the deployed artifact (see :mod:`automl._artifact`) on the test
  split, in [0, 1].
- ``params``: parameters the model stores: every float parameter tensor's elements, plus the
  elements of packed int8 weights (quantised layers), each counted once. A layer that computes its
  kernel from a smaller stored tensor (WSNet) counts the stored tensor, not the kernel.
- ``size_bytes``: bytes of the deployed artifact for ``latency.runtime`` (``model.onnx`` and the
  external-data files it references for ``onnxruntime``, ``model.ts`` for ``torchscript``:
  :func:`automl._artifact.artifact_bytes`; the saved state dict for ``eager``);
  ``state_dict_bytes`` (the saved state dict) is recorded beside it for every runtime.
- ``macs``: multiply-accumulates of one batch-1 forward pass, counted by torchprofile on the traced
  graph of the float model, so custom layers built from standard ops count what they run;
  post-training stages (int8) keep the count of the float graph they quantise.
- ``latency_ms``: the artifact timed on real test inputs by :func:`time_artifact`: block timing of
  the first ``latency.batch_size`` test samples (static models), per-sample timing over the first
  ``latency.max_samples`` test samples (dynamic models); see :mod:`automl._latency` for the clock.
  ``latency_iqr_ms`` is the spread that says whether the median can be trusted. Where it was
  timed (here, the ``latency.node`` target, or a ``latency.runner``) is :mod:`automl._target`'s
  choice; ``latency_target`` records where (host, Ray node id, CPU, runtime and version, threads).

Dynamic models (early exits, :class:`~searchspace.DynamicInference`) do different work per
input, so for them ``macs`` is the expected count, sum over exits of (fraction of test samples
leaving there) x (MACs of everything a sample leaving there runs), and ``exit_fractions``,
``exit_accuracy``, ``exit_macs`` give per exit the fraction of test samples that leave there, their
accuracy, and the MACs up to and including that exit (None for static models). Their
``latency_ms`` is the mean per-sample latency, and ``latency_p50_ms`` / ``latency_p90_ms`` the
median and 90th percentile over the samples, the tail a latency budget must allow for.

``python -m automl._measure latency FOLDER --inputs X.pt ...`` times an artifact folder in a fresh
process with the same function (export's verification uses it).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automl._artifact import Artifact, ArtifactError, build_artifact, load_artifact, state_dict_bytes
from automl._latency import LatencySettings, yield_point
from automl._metrics import Metrics
from automl._target import Timing, time_artifact
from searchspace import DynamicInference, artifact_quantization


__all__ = [
    "LatencySettings",
    "MeasureError",
    "Metrics",
    "Timing",
    "artifact_accuracy",
    "count_macs",
    "latency_inputs",
    "measure",
    "param_count",
    "state_dict_bytes",
    "time_artifact",
]


class MeasureError(ArtifactError):
    """A number cannot be measured for this model; the message says which and why."""


def _tensors(value: Any) -> list[torch.Tensor]:
    """Tensors inside a state-dict entry: a tensor, a packed-params object, or nested tuples of them."""
    if isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):
        value = value.__getstate__()
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def param_count(model: nn.Module) -> int:
    """Parameters the model stores (see the module docstring).

    Float parameters are ``model.parameters()``. Quantised layers keep their weights outside it, in
    state-dict entries that are neither parameters nor buffers: int8 weight tensors and float biases
    of ``torch.ao`` modules, or packed-params objects; their non-scalar tensors (weights, biases)
    count once each, the scalar quantisation parameters (scale, zero point) do not.
    """
    n = sum(p.numel() for p in model.parameters())
    # Every name a parameter or buffer has, aliases included (T-Net layers share one tensor).
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)} | {name for name, _ in model.named_buffers(remove_duplicate=False)}
    for key, value in model.state_dict().items():
        if key not in known:
            n += sum(t.numel() for t in _tensors(value) if t.dim() >= 1)
    return n


def _stored_params(model: nn.Module) -> int:
    """:func:`param_count` of what the model stores once quantised: a model carrying an artifact-time
    quantisation recipe (int8) counts its quantised form (packed weights once each, BatchNorm folded
    where static int8 fuses it), the same count for every runtime."""
    recipe = artifact_quantization(model)
    return param_count(model if recipe is None else recipe.quantize_torch(model))


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass on ``example`` (batch 1), counted by torchprofile.

    Raises:
        MeasureError: the graph cannot be traced (the reason is kept as the cause).
    """
    from torchprofile import profile_macs

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                # One pass first: a model that caches inference-time constants (T-Net's kernels)
                # fills them, so the trace counts inference, not the cache's construction.
                model.eval()(example)
            return int(profile_macs(model, example))
    except Exception as exc:  # noqa: BLE001 - torchprofile raises whatever jit.trace raises
        raise MeasureError(f"macs: torchprofile cannot trace {type(model).__name__}: {type(exc).__name__}: {str(exc).strip()[:200]}") from exc


def latency_inputs(data: Any, settings: LatencySettings, *, dynamic: bool) -> torch.Tensor:
    """The real test inputs latency is timed on: the first ``batch_size`` test samples (repeated if
    the split is smaller) for a static model, the first ``max_samples`` for a dynamic one."""
    want = settings.max_samples if dynamic else settings.batch_size
    got: list[torch.Tensor] = []
    n = 0
    for x, _ in data.batches("test", min(want, 500)):
        got.append(x)
        n += len(x)
        if n >= want:
            break
    if not got:
        raise MeasureError("latency: the test split is empty")
    x = torch.cat(got)[:want]
    if not dynamic and len(x) < want:
        x = x.repeat((want + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:want]
    return x.contiguous()


def _predictions(artifact: Artifact, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    preds, labels = [], []
    for x, y in data.batches("test", 500):
        preds.append(artifact(x).argmax(dim=1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def artifact_accuracy(artifact: Artifact, data: Any) -> float:
    """Top-1 test accuracy of the artifact, counted exactly (correct / n)."""
    pred, y = _predictions(artifact, data)
    return int((pred == y).sum()) / max(len(y), 1)


def _exit_numbers(model: Any, data: Any, pred: torch.Tensor, labels: torch.Tensor, example: torch.Tensor) -> tuple[list[float], list[float | None], list[int], int]:
    with torch.no_grad():
        exit_of = torch.cat([model.exit_indices(x) for x, _ in data.batches("test", 500)]).cpu()
    exit_macs = [count_macs(p, example) for p in model.exit_paths()]
    n = len(exit_of)
    fractions, accuracy = [], []
    for k in range(len(exit_macs)):
        mask = exit_of == k
        fractions.append(float(mask.sum()) / max(n, 1))
        accuracy.append(float((pred[mask] == labels[mask]).float().mean()) if mask.any() else None)
    expected = round(sum(f * m for f, m in zip(fractions, exit_macs)))
    return fractions, accuracy, exit_macs, expected


def measure(
    model: nn.Module,
    data: Any,
    settings: LatencySettings,
    *,
    folder: Path,
    macs: int | None = None,
    accuracy: bool = True,
    like: Path | None = None,
) -> tuple[Metrics, Artifact]:
    """All metrics of a finished model, measured on its artifact for ``settings.runtime``.

    The artifact's files are written to ``folder`` (a trial's checkpoint takes them from there).

    Args:
        macs: a MAC count to use instead of tracing ``model`` (the float graph of an int8 model).
        like: the artifact folder of another setting of the same model (``build_artifact``'s ``like``).
        accuracy: False where the accuracy means nothing (a dry run's untrained model): the test
            split is not run through a static model and ``Metrics.accuracy`` is NaN. A dynamic model
            still runs it, its expected MACs follow from where the samples exit.

    Raises:
        ArtifactError: the model cannot become the runtime's artifact, or a number cannot be measured.
    """
    model = model.eval().cpu()
    dynamic = isinstance(model, DynamicInference)
    inputs = latency_inputs(data, settings, dynamic=dynamic)
    example = inputs[:1]
    # model.ts only for the torchscript runtime (build_artifact's rule): export verifies against
    # model.pt2 and writes TorchScript itself when asked (automl export --torchscript).
    artifact = build_artifact(model, example, folder, runtime=settings.runtime, device=settings.device, threads=settings.threads, like=like)
    yield_point()
    top1 = math.nan
    if accuracy or dynamic:
        pred, labels = _predictions(artifact, data)
        top1 = int((pred == labels).sum()) / max(len(labels), 1) if accuracy else math.nan
    timing = time_artifact(artifact, inputs, settings, per_sample=dynamic)
    exits: dict[str, Any] = {}
    if dynamic:
        fractions, exit_accuracy, exit_macs, expected = _exit_numbers(model, data, pred, labels, example)
        exits = {"exit_fractions": fractions, "exit_accuracy": exit_accuracy, "exit_macs": exit_macs}
        macs = expected
    metrics = Metrics(
        accuracy=top1,
        params=_stored_params(model),
        size_bytes=artifact.size_bytes,
        macs=macs if macs is not None else count_macs(model, example),
        latency_ms=timing.median_ms,
        latency_iqr_ms=timing.iqr_ms,
        latency_p50_ms=timing.p50_ms,
        latency_p90_ms=timing.p90_ms,
        latency_target=json.dumps(timing.where, sort_keys=True, default=str),
        state_dict_bytes=state_dict_bytes(model),
        runtime=settings.runtime,
        **exits,
    )
    return metrics, artifact


# --- timing an artifact folder in a fresh process (export's verification) --------------------


def _latency_main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m automl._measure latency")
    ap.add_argument("folder")
    ap.add_argument("--inputs", required=True, help="the test inputs to time on, saved with torch.save")
    ap.add_argument("--settings", required=True, help="latency settings as JSON")
    ap.add_argument("--per-sample", action="store_true", help="a dynamic model: time each sample alone")
    args = ap.parse_args(argv)
    settings = LatencySettings.from_mapping(json.loads(args.settings))
    inputs = torch.load(args.inputs, map_location="cpu", weights_only=True)
    artifact = load_artifact(Path(args.folder), runtime=settings.runtime, device=settings.device, threads=settings.threads)
    timing = time_artifact(artifact, inputs, settings, per_sample=args.per_sample)
    print(json.dumps({"runtime": settings.runtime, "latency_ms": timing.median_ms, "latency_iqr_ms": timing.iqr_ms, "latency_target": timing.where}, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "latency":
        sys.exit(_latency_main(sys.argv[2:]))
    sys.exit("usage: python -m automl._measure latency FOLDER --inputs X.pt --settings JSON [--per-sample]")
