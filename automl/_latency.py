"""Latency that means something on a machine where other trials train at the same time.

Three measures, all on top of :func:`automl._measure.measure_latency` (``torch.utils.benchmark``):

1. **One measurement at a time per node, and no training meanwhile**: :func:`latency_lock` takes an
   exclusive ``fcntl`` lock on a node-local file; every training step of every trial on the node
   holds the same lock *shared* (:func:`gated_batches` wraps the trial's data), so a measurement
   waits for the running steps to end, and steps wait while a model is timed. A turnstile file
   (taken by trainers only in passing, held by the measurer while it waits) keeps a stream of
   overlapping training steps from starving the measurement. File locks rather than a named Ray
   actor: the kernel releases them when a worker dies (no lock leaked by a crashed trial) and they
   cost a system call, not a round trip through Ray, per step.
2. **Repeat when the spread is too wide**: :func:`stable_latency` re-measures while
   IQR/median > ``latency.max_spread`` (up to ``latency.max_attempts``) and keeps the tightest one.
   Threads are pinned by ``latency.threads`` (``Timer(num_threads=...)``).
3. **Re-measure the front alone**: :func:`remeasure_front` times every Pareto-front model again once
   the search is over (nothing else running on the launcher's node) from its saved TorchScript
   checkpoint, and stores both numbers: the in-trial value stays the trial's objective value, the
   isolated one goes to the study user attrs ``latency_ms_isolated`` / ``latency_iqr_ms_isolated``
   (``{trial number: ms}``; Optuna forbids changing a finished trial, the study's attrs are the place).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import warnings
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import optuna
import torch

from automl._measure import LatencySettings, measure_latency

__all__ = ["gated_batches", "latency_lock", "lock_path", "remeasure_front", "stable_latency"]


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


@contextlib.contextmanager
def latency_lock(enabled: bool = True) -> Iterator[None]:
    """Hold the node's latency lock exclusively: no other measurement, no training step meanwhile."""
    if not enabled:
        yield
        return
    gate, lock = _files()
    fcntl.flock(gate, fcntl.LOCK_EX)  # new training steps now wait at the turnstile...
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ...and the running ones finish
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        fcntl.flock(gate, fcntl.LOCK_UN)


def _step_enter() -> None:
    gate, lock = _files()
    fcntl.flock(gate, fcntl.LOCK_EX)
    fcntl.flock(gate, fcntl.LOCK_UN)
    fcntl.flock(lock, fcntl.LOCK_SH)


def _step_leave() -> None:
    fcntl.flock(_files()[1], fcntl.LOCK_UN)


class gated_batches:
    """A view of a :class:`~automl._data.Splits` whose training batches hold the node's latency lock
    shared from the moment a batch is handed out until the next one is asked for (one training step).

    Only the ``train`` split is gated; evaluation and calibration passes are short and untimed.
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
        inner = self._data.batches(split, *args, **kwargs)
        if split != "train":
            yield from inner
            return
        for batch in inner:
            _step_enter()
            try:
                yield batch
            finally:
                _step_leave()


def stable_latency(model: torch.nn.Module, example: torch.Tensor, settings: LatencySettings) -> tuple[float, float, int]:
    """Median and IQR (ms) under the node lock, repeated while the spread is too wide.

    Returns:
        ``(median_ms, iqr_ms, attempts)``; the attempt with the smallest IQR/median is kept.
    """
    best: tuple[float, float] | None = None
    attempts = 0
    with latency_lock(settings.isolate):
        while attempts < max(1, settings.max_attempts):
            attempts += 1
            median, iqr = measure_latency(model, example, settings)
            if best is None or iqr / max(median, 1e-12) < best[1] / max(best[0], 1e-12):
                best = (median, iqr)
            if iqr / max(median, 1e-12) <= settings.max_spread:
                break
    return best[0], best[1], attempts


def remeasure_front(
    study: optuna.Study,
    study_dir: Path,
    settings: LatencySettings,
    *,
    base: torch.nn.Module | None = None,
    example: torch.Tensor | None = None,
    log: Callable[[str], None] = print,
) -> dict[int, float]:
    """Time each front trial's saved TorchScript model again, alone; store and return ``{number: ms}``.

    The base model is timed the same way (as TorchScript, study attr ``base_latency_ms_isolated``),
    so speed-ups computed from re-measured values compare like with like.
    """
    from automl._trial import load_checkpoint

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return {}
    medians = dict(study.user_attrs.get("latency_ms_isolated") or {})
    iqrs = dict(study.user_attrs.get("latency_iqr_ms_isolated") or {})
    out: dict[int, float] = {}
    elsewhere = []
    for t in study.best_trials:
        folder = study_dir / str(t.user_attrs.get("checkpoint") or f"checkpoints/trial_{t.number:05d}")
        if not folder.is_dir():
            elsewhere.append(t.number)  # run by another launcher sharing the study: it re-measures
            continue
        try:
            # The saved TorchScript model: what export ships, and loadable without unpickling code
            # (the eager module of an arbitrary method would need unrestricted pickle).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, record = load_checkpoint(folder)
        except (OSError, ValueError, RuntimeError) as exc:
            log(f"re-measure: trial {t.number} skipped: {type(exc).__name__}: {exc}")
            continue
        example = torch.zeros(1, *record["input_shape"])
        median, iqr, _ = stable_latency(model, example, settings)
        medians[str(t.number)] = median
        iqrs[str(t.number)] = iqr
        out[t.number] = median
    if out and base is not None and example is not None:
        from automl._trial import _to_torchscript

        scripted = _to_torchscript(base.eval(), example)
        study.set_user_attr("base_latency_ms_isolated", stable_latency(scripted, example, settings)[0])
    study.set_user_attr("latency_ms_isolated", medians)
    study.set_user_attr("latency_iqr_ms_isolated", iqrs)
    if elsewhere:
        log(f"re-measure: front trials {elsewhere} were run by another launcher (their checkpoints are in its study folder)")
    if out:
        log("re-measured front latency alone (ms): " + ", ".join(f"trial {n}: {v:.3f}" for n, v in sorted(out.items())))
    return out
