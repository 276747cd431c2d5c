"""The thread plan: how many threads every computing process of a study uses, from its config.

PyTorch's default is one intra-op (OpenMP) thread per core. On a machine shared with anything else,
those threads wait for cores another process holds, and every operation waits for its slowest
thread: a base trained with both threads of a 2-core machine beside one busy process ran at a
quarter to a third of its idle speed. So nothing a study computes runs at PyTorch's default; the
count comes from the config:

- training: ``resources.cpus`` whole threads, at least one (:func:`training_threads`), what Ray
  reserves for a trial. Every trial and the dry-run screen (Ray workers), the launcher (the base,
  the end-of-study drift check) and the commands that open a study (export's checks, finalize,
  the report) compute with it;
- data-loader workers: ``dataset.workers`` processes for streamed datasets (none for the in-memory
  ones, :func:`automl._data.loader_workers`), each with one thread (PyTorch sets one thread in
  every ``DataLoader`` worker);
- timing: ``latency.threads``, set by the artifact itself around each timed call
  (:meth:`automl._artifact.Artifact.context` for the PyTorch runtimes, the ONNX Runtime session's
  intra-op threads), whatever the process's training count;
- priority: Ray starts its workers at niceness 15 (its ``worker_niceness``), so beside as many
  busy processes as cores a trial trained at 2 % of its speed instead of its share. A Ray the launcher
  starts gives its workers the launcher's own niceness (:func:`ray_system_config`): trials, the
  base and the profile compete for cores as the launcher would (``nice automl launch`` still
  yields). Nodes a user starts with ``ray start`` take ``RAY_worker_niceness=0`` from their
  environment. Every trial and the base record the niceness they ran at (``nice``).

:meth:`ThreadPlan.apply` (or :func:`set_threads` where only ``resources.cpus`` travels, as in Ray
workers) sets it in one process and in the environment its child processes inherit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ThreadPlan", "ray_system_config", "set_threads", "training_threads"]

#: Environment variables the OpenMP and MKL runtimes of child processes read at start-up.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def training_threads(cpus: float) -> int:
    """PyTorch threads for ``resources.cpus``: its whole part, at least 1 (a fraction of a core is
    one thread that Ray lets share a core)."""
    if not cpus > 0:
        raise ValueError(f"resources.cpus must be > 0, got {cpus}")
    return max(1, math.floor(cpus))


def ray_system_config() -> dict[str, Any]:
    """Settings for a Ray the launcher starts: its workers run at this process's niceness."""
    return {"worker_niceness": os.nice(0)}


def set_threads(threads: int) -> int:
    """Set this process's PyTorch threads to ``threads`` and its children's OpenMP/MKL default.

    The intra-op count (what every operation splits over) is set every time. The inter-op pool
    (``torch.jit.fork`` and the like, which training never uses) can be sized once per process,
    before it starts: a process that already sized it (a Ray worker reused for another trial, a
    launcher running a second study) keeps its pool, which holds no thread that computes here.

    Returns:
        ``torch.get_num_threads()`` afterwards.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # sized once already in this process (see above)
            pass
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    return torch.get_num_threads()


@dataclass(frozen=True)
class ThreadPlan:
    """Threads of one study's processes (see the module doc).

    Attributes:
        training: PyTorch threads of every process that trains or evaluates (``resources.cpus``).
        data_workers: ``DataLoader`` worker processes beside each of them, one thread each.
        timing: threads a model is timed with (``latency.threads``).
    """

    training: int
    data_workers: int
    timing: int

    @classmethod
    def from_config(cls, cfg: Any) -> ThreadPlan:
        """The plan of a :class:`automl.StudyConfig`."""
        from automl._data import loader_workers

        return cls(
            training=training_threads(cfg.resources.cpus),
            data_workers=loader_workers(cfg.dataset.name, cfg.dataset.workers),
            timing=int(cfg.latency.threads),
        )

    def apply(self) -> int:
        """Set the training count in this process and its children (:func:`set_threads`)."""
        return set_threads(self.training)

    def describe(self) -> str:
        """One line for the launcher's output."""
        workers = f"{self.data_workers} data-loader workers of 1 thread each (dataset.workers)" if self.data_workers else "no data-loader workers (in-memory dataset)"
        return f"threads: training {self.training} per process (resources.cpus), {workers}, timing {self.timing} (latency.threads)"

    def warnings(self, cores: float) -> list[str]:
        """One line per part of the plan that asks for more than ``cores`` (the cores Ray sees)."""
        out = []
        busy = self.training + self.data_workers
        if busy > cores:
            asked = f"{self.training} training threads (resources.cpus)"
            if self.data_workers:
                asked += f" and {self.data_workers} data-loader workers (dataset.workers), {busy} threads in all"
            out.append(f"warning: each training process runs {asked}, more than the {cores:g} cores Ray sees; its threads will wait for each other")
        if self.timing > cores:
            out.append(f"warning: latency.threads times each model with {self.timing} threads, more than the {cores:g} cores Ray sees")
        return out
