"""Timing: the settings, the one clock every latency goes through, and node-local isolation.

This module is a leaf (of the project it imports only the metric names, :mod:`automl._metrics`):
:mod:`automl._artifact` builds what is timed, :mod:`automl._measure` decides what to time and calls
:func:`time_blocks` / :func:`time_per_sample` through :func:`stable_latency`.

Definitions (the README repeats them, nothing else does):

- **block timing** (static models): ``warmup`` untimed calls, then ``repeats`` timed blocks, each of
  ``number`` back-to-back calls chosen so that one block lasts about 2 ms (timer resolution stops
  mattering); the latency is the median of the per-call block means, ``latency_iqr_ms`` their IQR.
- **per-sample timing** (dynamic models, e.g. early exits): every sample is run alone (batch 1,
  real early termination) once per pass, ``repeats`` passes; each sample's time is its median over
  the passes and the latency is the mean over samples; the IQR is that of the per-pass means.
- On CUDA the device is synchronised before the clock is read, so a block's time is the GPU's.

Isolation, so a number means something on a node where other trials train at the same time:

1. **One measurement at a time per node, and no other work meanwhile**: :func:`latency_lock` takes
   an exclusive ``fcntl`` lock on a node-local file; all other CPU work of the study on the node
   holds the same lock *shared* (:func:`busy`): a trial from its first stage to its last number,
   the launcher's dry run of the next plan. Shared holders reach a :func:`yield_point` at every
   batch of every split (:func:`gated_batches`) and between stages, where they let a waiting
   measurement go first, so a measurement waits for the current step or export to end, and nothing
   else runs on the node while a model is timed. Holding only the training steps would leave
   evaluation passes, exports, decompositions and the launcher's dry runs running beside the timed
   model; on a 2-core machine a quarter of the recorded latencies then read 2x. A turnstile
   file (taken by workers only in passing, held by the measurer while it waits) keeps a stream of
   overlapping steps from starving the measurement. File locks rather than a named Ray actor: the
   kernel releases them when a worker dies (no lock leaked by a crashed trial) and they cost a system
   call, not a round trip through Ray, per step.
2. **Several spaced attempts, the fastest kept**: :func:`stable_latency` measures
   ``latency.min_attempts`` times (then again while the fastest attempt's IQR/median >
   ``latency.max_spread``, up to ``latency.max_attempts``) and keeps the attempt with the lowest
   median. Disturbances (another program, a page fault, a process start on the node) only ever add
   time, so the lowest of independent medians is the best estimate of the model's own time (the
   rule of Python's ``timeit``). Keeping the tightest attempt instead would keep a uniformly
   slowed one: a 1.5-2x attempt has as narrow a spread as an undisturbed one. The attempts are
   ``latency.attempt_gap_s`` apart, with the lock released in between (the study's other work runs
   in the gaps): attempts back to back (~60 ms each) fall in the same slow spell, and a
   virtual machine may run one model at two speeds in spells of 0.1 s to a few seconds (BENCHMARKS.md,
   "How steady is this machine's timing?"), so only attempts spread over more than a spell are independent.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import statistics
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, NamedTuple

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from automl._metrics import Runtime

__all__ = [
    "LatencySettings",
    "PerSample",
    "busy",
    "gated_batches",
    "idle",
    "latency_lock",
    "lock_path",
    "stable_latency",
    "time_blocks",
    "time_per_sample",
    "torch_threads",
    "yield_point",
]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class LatencySettings:
    """How latency is measured: the one definition of every timing setting, its default and its
    allowed range. The study config's ``latency`` section is this plus the search's own options
    (:class:`automl._config.LatencyConfig`); a pydantic dataclass, so a setting out of its range
    fails wherever the settings are built, and they are immutable."""

    #: The runtime whose artifact is timed: ``onnxruntime`` (what export ships), ``torchscript``, ``eager``.
    runtime: Runtime = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = Field(default=1, ge=1, le=4096)
    threads: int = Field(default=1, ge=1, le=256)
    warmup: int = Field(default=10, ge=0, le=100_000)
    repeats: int = Field(default=30, ge=3, le=100_000)
    #: Dynamic models (early exits): at most this many test samples are timed one by one (the first ones).
    max_samples: int = Field(default=1000, ge=1, le=1_000_000)
    #: Hold the node-local latency lock while timing (one measurement at a time per node).
    isolate: bool = True
    #: Attempts per measurement at least; the lowest median is kept (see the module docstring).
    min_attempts: int = Field(default=5, ge=1, le=100)
    #: More attempts while the kept one's IQR/median exceeds this, up to ``max_attempts`` in all.
    max_spread: float = Field(default=0.1, gt=0.0, le=10.0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    #: Seconds between attempts, the lock released meanwhile, so they fall in different spells.
    attempt_gap_s: float = Field(default=0.5, ge=0.0, le=60.0)
    #: A Ray custom resource (``ray start --resources '{"NAME": 1}'``): every latency is timed on a
    #: node that declares it, training stays where Ray places it (:mod:`automl._target`).
    node: str | None = Field(default=None, strict=True)
    #: A user's timing function ``module:function`` (:class:`automl._target.TimingRunner`): it gets
    #: the artifact file, the inputs and these settings, and returns per-call times in ms.
    runner: str | None = Field(default=None, strict=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LatencySettings:
        """The settings named in ``values`` (e.g. a config section's dump); other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def lock_path() -> Path:
    """The node-local lock file (``AUTOML_LATENCY_LOCK`` overrides; default in the temp folder)."""
    return Path(os.environ.get("AUTOML_LATENCY_LOCK") or Path(tempfile.gettempdir()) / "automl-latency.lock")


_FILES: dict[str, object] = {}


def _files() -> tuple[int, int]:
    """This process's descriptors of the turnstile and the lock (one pair per process and path).

    One pair per process, not one per use: ``flock`` locks belong to an open file description, so a
    measurement in a process whose own training step still holds the lock shared (a step abandoned
    by an exception) converts that hold to exclusive instead of deadlocking on itself.
    """
    path = lock_path()
    key = str(path)
    if _FILES.get("key") != key:
        path.parent.mkdir(parents=True, exist_ok=True)
        _FILES.update(key=key, gate=open(path.with_name(path.name + ".turnstile"), "a+"), lock=open(path, "a+"))
    return _FILES["gate"].fileno(), _FILES["lock"].fileno()  # type: ignore[union-attr]


#: This process's shared hold on the lock: ``depth`` nested :func:`busy` blocks (0 = none).
_HOLD = {"depth": 0}


def _take_shared() -> None:
    gate, lock = _files()
    fcntl.flock(gate, fcntl.LOCK_EX)  # wait while a measurement is waiting or running...
    fcntl.flock(gate, fcntl.LOCK_UN)
    fcntl.flock(lock, fcntl.LOCK_SH)  # ...then work beside the other workers


@contextlib.contextmanager
def latency_lock(enabled: bool = True) -> Iterator[None]:
    """Hold the node's latency lock exclusively: no other measurement and no other work meanwhile.

    A process inside :func:`busy` gives up its own shared hold first and takes it back after:
    holding it while waiting at the turnstile would deadlock with a measurer waiting for it.
    """
    if not enabled:
        yield
        return
    gate, lock = _files()
    held = _HOLD["depth"] > 0
    if held:
        fcntl.flock(lock, fcntl.LOCK_UN)
    fcntl.flock(gate, fcntl.LOCK_EX)  # new work now waits at the turnstile...
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ...and the running work reaches a yield point
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        fcntl.flock(gate, fcntl.LOCK_UN)
        if held:
            _take_shared()


@contextlib.contextmanager
def busy(enabled: bool = True) -> Iterator[None]:
    """Hold the node's latency lock *shared* for a stretch of work that is not itself timed.

    Everything a trial or the launcher computes (training and evaluation batches, a method's
    ``apply``, the artifact export, MAC counting, a dry run) runs inside ``busy``, so no model is
    timed while it runs. Nested blocks share the one hold. A long block must reach
    :func:`yield_point` now and then (every batch of :class:`gated_batches` does), where it lets a
    waiting measurement go first; waiting on something else belongs in :func:`idle`.
    """
    if not enabled:
        yield
        return
    if _HOLD["depth"] == 0:
        _take_shared()
    _HOLD["depth"] += 1
    try:
        yield
    finally:
        _HOLD["depth"] -= 1
        if _HOLD["depth"] == 0:
            fcntl.flock(_files()[1], fcntl.LOCK_UN)


def yield_point() -> None:
    """Inside :func:`busy`: if a measurement waits at the turnstile, let it run first, then go on."""
    if _HOLD["depth"] == 0:
        return
    gate, lock = _files()
    try:
        fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a measurer holds the turnstile and waits for our hold to go
        fcntl.flock(lock, fcntl.LOCK_UN)
        _take_shared()
    else:
        fcntl.flock(gate, fcntl.LOCK_UN)


@contextlib.contextmanager
def idle() -> Iterator[None]:
    """Inside :func:`busy`: give the hold up while waiting on something that is not CPU work (a
    gate, another trial), so measurements on the node are not held up by a waiting process."""
    if _HOLD["depth"] == 0:
        yield
        return
    fcntl.flock(_files()[1], fcntl.LOCK_UN)
    try:
        yield
    finally:
        _take_shared()


class gated_batches:
    """A view of a dataset's splits whose batches (every split: training, evaluation,
    calibration) each run inside :func:`busy`, from the moment a batch is handed out until the next
    one is asked for, with a :func:`yield_point` before each: no model is timed during a step, and a
    measurement waits at most one step.
    """

    def __init__(self, data) -> None:
        self._data = data

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def __getstate__(self):
        return {"_data": self._data}

    def __setstate__(self, state) -> None:
        self._data = state["_data"]

    def batches(self, split: str, *args, **kwargs):
        for batch in self._data.batches(split, *args, **kwargs):
            with busy():
                yield_point()
                yield batch


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` for the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _median_iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], 0.0
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[2] - q[0]


def time_blocks(run: Callable[[], Any], settings: LatencySettings, *, sync: Callable[[], None] | None = None) -> tuple[float, float]:
    """Median and IQR (ms) of one call of ``run`` (block timing, see the module docstring)."""
    sync = sync or (lambda: None)
    clock = time.perf_counter

    def block(number: int) -> float:
        sync()
        start = clock()
        for _ in range(number):
            run()
        sync()
        return (clock() - start) / number

    for _ in range(settings.warmup):
        run()
    once = block(1)
    number = max(1, min(1000, int(0.002 / max(once, 1e-7))))
    return _median_iqr([block(number) * 1e3 for _ in range(settings.repeats)])


class PerSample(NamedTuple):
    """Per-sample timing of a dynamic model, in ms (:func:`time_per_sample`)."""

    #: Mean over the samples of each sample's median time: the expected latency of one request.
    mean_ms: float
    #: IQR of the per-pass means: whether the mean can be trusted.
    iqr_ms: float
    #: Median and 90th percentile over the samples of each sample's median time: the latency a
    #: request meets half the time, and the tail a user with a latency budget plans for.
    p50_ms: float
    p90_ms: float


def time_per_sample(runs: list[Callable[[], Any]], settings: LatencySettings, *, sync: Callable[[], None] | None = None) -> PerSample:
    """Per-sample latency of ``runs`` (per-sample timing), see :class:`PerSample`.

    ``runs[i]`` runs the model on sample ``i`` alone. A pass over many samples is long enough to be
    preempted on a shared machine; a per-sample median over the repeats, like the block median of
    :func:`time_blocks`, discards those interruptions instead of averaging them in. The quantiles
    are linear interpolations between the sorted per-sample medians (``torch.quantile``).
    """
    if not runs:
        raise ValueError("per-sample timing needs at least one input sample, got none")
    sync = sync or (lambda: None)
    clock = time.perf_counter
    for run in runs[: settings.warmup]:
        run()
    times = torch.empty(settings.repeats, len(runs), dtype=torch.float64)
    for r in range(settings.repeats):
        for i, run in enumerate(runs):
            sync()
            start = clock()
            run()
            sync()
            times[r, i] = clock() - start
    per_pass = (times.mean(dim=1) * 1e3).tolist()
    per_sample = times.median(dim=0).values * 1e3
    p50, p90 = torch.quantile(per_sample, torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
    return PerSample(float(per_sample.mean()), _median_iqr(per_pass)[1], p50, p90)


def stable_latency(once: Callable[[], tuple[float, float]], settings: LatencySettings) -> tuple[float, float, int]:
    """Run the measurement ``once`` under the node lock, several times, spaced; keep the fastest.

    ``min(min_attempts, max_attempts)`` attempts, then more while the kept attempt's IQR/median is
    above ``max_spread``, up to ``max_attempts`` in all; ``attempt_gap_s`` between two attempts,
    the lock given up meanwhile (:func:`idle`: a trial timing its own model lets the node's other
    work run). See the module docstring.

    Returns:
        ``(median_ms, iqr_ms, attempts)`` of the attempt with the lowest median.
    """
    best: tuple[float, float] | None = None
    attempts = 0
    most = max(1, settings.max_attempts)
    least = max(1, min(settings.min_attempts, most))
    while attempts < most:
        if attempts and settings.attempt_gap_s > 0:
            with idle():
                time.sleep(settings.attempt_gap_s)
        attempts += 1
        with latency_lock(settings.isolate):
            median, iqr = once()
        if best is None or median < best[0]:
            best = (median, iqr)
        if attempts >= least and best[1] / max(best[0], 1e-12) <= settings.max_spread:
            break
    assert best is not None
    return best[0], best[1], attempts
