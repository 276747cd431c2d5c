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
"""

from __future__ import annotations

import io
import logging
import statistics
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# torch.utils.benchmark imports cpp_extension, which warns on every CPU-only worker that it found no
# CUDA runtime: noise in every trial's log, not a problem.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402

from automl._data import Splits
from automl._train import evaluate

__all__ = ["LatencySettings", "Metrics", "count_macs", "measure", "measure_latency", "param_count", "size_bytes"]


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
    model.eval()
    example = data.x_test[:1].to(device)
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
