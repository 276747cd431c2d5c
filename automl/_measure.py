"""Every number the study reports, defined once and used by trials, reports and export alike.

- ``accuracy``: top-1 accuracy on the test split, in [0, 1].
- ``params``: number of parameters (``sum(p.numel())``; quantised weights count once each).
- ``size_bytes``: bytes of the model's ``state_dict`` saved with ``torch.save`` (what export writes;
  int8 weights take one byte each).
- ``macs``: multiply-accumulates of one batch-1 forward pass, counted by torchprofile on the traced
  graph, so custom layers built from standard ops are counted by what they actually run.
- ``latency_ms``: median wall time of one forward pass at ``latency.batch_size`` with
  ``latency.threads`` threads, after ``latency.warmup`` untimed passes, over ``latency.repeats``
  timed blocks (``torch.utils.benchmark``); ``latency_iqr_ms`` is the interquartile range of those
  blocks, the spread that tells whether the median can be trusted.

Dynamic models (early exits), recognised by the :class:`DynamicInference` protocol, do different work
per input, so for them:

- ``latency_ms``: mean per-sample latency over the whole test split, fed one sample at a time (batch 1,
  real early termination); each sample's time is its median over ``latency.repeats`` passes
  (:func:`measure_sample_latency`), ``latency_iqr_ms`` the IQR of the per-pass means;
- ``macs``: expected MACs, sum over exits of (fraction of test samples leaving there) x (MACs of
  everything a sample leaving there runs);
- ``exit_fractions``, ``exit_accuracy``, ``exit_macs``: per exit, the fraction of test samples that
  leave there, their accuracy, and the MACs up to and including that exit (None for static models).
"""

from __future__ import annotations

import io
import logging
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns on every CPU-only worker that it found no
# CUDA runtime: noise in every trial's log, not a problem.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402

from automl._data import Splits
from automl._train import evaluate

#: Test inputs timed one by one for input-dependent models (the first this many of the test split).
LATENCY_SAMPLES = 2000

__all__ = [
    "DynamicInference",
    "LatencySettings",
    "Metrics",
    "count_macs",
    "measure",
    "measure_latency",
    "measure_sample_latency",
    "param_count",
    "size_bytes",
]


@runtime_checkable
class DynamicInference(Protocol):
    """A model whose cost depends on its input, e.g. early exits (``searchspace.methods.exits``).

    ``exit_indices(x)`` gives the exit each sample of ``x`` leaves at, under the model's current
    settings; ``exit_paths()`` gives, per exit, a module that runs exactly what a sample leaving
    there runs (for counting MACs with the same counter as every other model).
    """

    def exit_indices(self, x: torch.Tensor) -> torch.Tensor: ...

    def exit_paths(self) -> list[nn.Module]: ...


@dataclass(frozen=True)
class LatencySettings:
    batch_size: int = 1
    threads: int = 1
    warmup: int = 10
    repeats: int = 30
    #: Hold the node-local latency lock while timing (one measurement at a time per node).
    isolate: bool = True
    #: Repeat a measurement whose IQR/median exceeds this, up to ``max_attempts`` times.
    max_spread: float = 0.1
    max_attempts: int = 3


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    params: int
    size_bytes: int
    macs: int | None
    latency_ms: float
    latency_iqr_ms: float
    exit_fractions: list[float] | None = None
    exit_accuracy: list[float | None] | None = None
    exit_macs: list[int | None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_count(model: nn.Module) -> int:
    n = sum(p.numel() for p in model.parameters())
    # Quantised layers keep packed weights that are not Parameters; their ``weight()``/``bias()``
    # accessors unpack them, so int8 weights still count once each.
    for m in model.modules():
        for attr in ("weight", "bias"):
            get = getattr(type(m), attr, None)
            if callable(get) and not isinstance(get, property):
                t = getattr(m, attr)()
                n += t.numel() if isinstance(t, torch.Tensor) else 0
    return n


def size_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def count_macs(model: nn.Module, example: torch.Tensor) -> int | None:
    """MACs of one forward pass on ``example`` (batch 1), or None where the graph cannot be traced."""
    from torchprofile import profile_macs

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(profile_macs(model.eval(), example))
    except Exception:  # noqa: BLE001 - a model torch.jit.trace cannot handle has no MAC count
        return None


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, settings: LatencySettings) -> tuple[float, float]:
    """Median and IQR, in milliseconds, of one forward pass on a batch shaped like ``example``."""
    model.eval()
    x = example.expand(settings.batch_size, *example.shape[1:]).contiguous()
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=settings.threads)
    if settings.warmup:
        timer.timeit(settings.warmup)
    # Pick a block size so that one timed block lasts >= ~2 ms: timer resolution stops mattering.
    once = timer.timeit(1).mean
    number = max(1, min(1000, int(0.002 / max(once, 1e-7))))
    blocks = [timer.timeit(number).mean * 1e3 for _ in range(settings.repeats)]
    q = statistics.quantiles(blocks, n=4)
    return statistics.median(blocks), q[2] - q[0]


@torch.no_grad()
def measure_sample_latency(model: nn.Module, inputs: torch.Tensor, settings: LatencySettings) -> tuple[float, float]:
    """Mean per-sample latency (ms) when every sample of ``inputs`` is fed alone (batch 1), so
    input-dependent work (early exits) is measured as it runs; and the IQR of the per-pass means.

    Each sample is timed on its own in each of ``settings.repeats`` passes and its latency is the
    median over the passes; the result is the mean over samples. On a shared machine a pass over a
    whole test set is long enough to be preempted; a per-sample median, like the block median of
    :func:`measure_latency`, discards those interruptions instead of averaging them in.
    """
    model.eval()
    samples = list(inputs.split(1))
    if not samples:
        raise ValueError("measure_sample_latency needs at least one input sample, got none")
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        for s in samples[: settings.warmup]:
            model(s)
        times = torch.empty(settings.repeats, len(samples), dtype=torch.float64)
        clock = time.perf_counter
        for r in range(settings.repeats):
            for i, s in enumerate(samples):
                start = clock()
                model(s)
                times[r, i] = clock() - start
    finally:
        torch.set_num_threads(previous)
    per_pass = (times.mean(dim=1) * 1e3).tolist()
    q = statistics.quantiles(per_pass, n=4) if len(per_pass) > 1 else [per_pass[0]] * 3
    return float(times.median(dim=0).values.mean()) * 1e3, q[2] - q[0]


@torch.no_grad()
def _measure_dynamic(model: Any, data: Splits, settings: LatencySettings, device: torch.device | str) -> Metrics:
    model.eval()
    taken, preds, labels = [], [], []
    for x, y in data.batches("test", 500):
        x = x.to(device)
        taken.append(model.exit_indices(x).cpu())
        preds.append(model(x).argmax(dim=1).cpu())
        labels.append(y)
    exit_of, pred, y_test = torch.cat(taken), torch.cat(preds), torch.cat(labels)
    paths = model.exit_paths()
    example = data.example().to(device)
    exit_macs = [count_macs(p, example) for p in paths]
    n = len(exit_of)
    fractions, accuracy = [], []
    for k in range(len(paths)):
        mask = exit_of == k
        fractions.append(float(mask.sum()) / max(n, 1))
        accuracy.append(float((pred[mask] == y_test[mask]).float().mean()) if mask.any() else None)
    expected = None
    if all(m is not None for m in exit_macs):
        expected = round(sum(f * m for f, m in zip(fractions, exit_macs)))
    latency, iqr = measure_sample_latency(model, data.tensors("test", limit=LATENCY_SAMPLES)[0].to(device), settings)
    return Metrics(
        accuracy=int((pred == y_test).sum()) / len(y_test),  # exact, as evaluate() counts
        params=param_count(model),
        size_bytes=size_bytes(model),
        macs=expected,
        latency_ms=latency,
        latency_iqr_ms=iqr,
        exit_fractions=fractions,
        exit_accuracy=accuracy,
        exit_macs=exit_macs,
    )


def measure(
    model: nn.Module,
    data: Splits,
    settings: LatencySettings,
    *,
    device: torch.device | str = "cpu",
    macs: int | None = None,
) -> Metrics:
    """All metrics of a finished model. Latency is measured on the CPU copy unless ``device`` is CUDA.

    Args:
        macs: a MAC count to use instead of tracing (e.g. the float graph of an int8 model).
    """
    if isinstance(model, DynamicInference):
        return _measure_dynamic(model, data, settings, device)
    model.eval()
    example = data.example().to(device)
    acc = evaluate(model, data, "test", device=device)
    from automl._latency import stable_latency  # lock + spread check around measure_latency

    latency, iqr, _ = stable_latency(model, example, settings)
    return Metrics(
        accuracy=acc,
        params=param_count(model),
        size_bytes=size_bytes(model),
        macs=macs if macs is not None else count_macs(model, example),
        latency_ms=latency,
        latency_iqr_ms=iqr,
    )
