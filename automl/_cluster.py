"""Running on a Ray cluster without a shared filesystem.

What travels how:

- **Data and the base model**: once, in Ray's object store (``tune.with_parameters`` puts the
  :class:`~automl._study.Payload`); any node fetches it from there.
- **Trial checkpoints**: a trial on any node packs its checkpoint folder into bytes and hands them
  to :class:`CheckpointSink`, an actor pinned to the launcher's node, which writes
  ``<study_dir>/checkpoints/trial_NNNNN/`` atomically (``.partial`` then rename) *before* the trial
  reports its result. So the study folder on the launcher's machine holds every checkpoint, and a
  COMPLETE trial in Optuna always has one. Ray Tune's own checkpoint persistence is not used: with
  a local ``storage_path`` it would need a filesystem shared by all nodes.
- **Results and Tune's experiment state**: written by the driver (the launcher) into
  ``<study_dir>/ray/``, local to the launcher's node.
- **The Optuna storage** must be reachable from the launcher only (trials never touch it); use
  PostgreSQL when several launchers share a study.

- **User code** (a ``module:function`` model or dataset factory, plugins) that lives in the
  config's ``python_path`` folders rather than in an installed package: :func:`runtime_env` lists
  those modules as Ray ``py_modules``, which Ray uploads once and puts on every worker's path.

Nothing else has to be shared between nodes except the Python environment (same packages, this
project installed) and, for datasets read from disk, the data at the same ``dataset.root``.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Mapping

__all__ = ["FULL_ERRNOS", "CheckpointSink", "assigned_device", "full_folder", "pack_folder", "runtime_env", "start_sink", "unpack_to", "user_modules"]


def user_modules(cfg: Any) -> list[str]:
    """Files or package folders of the modules a study names (``base.model``, ``dataset.name``,
    ``plugins``) that live under one of its ``python_path`` folders (installed packages excluded)."""
    import importlib.util

    names = [ref.partition(":")[0] for ref in (cfg.base.model, cfg.dataset.name) if ":" in ref]
    names += list(cfg.plugins)
    if getattr(cfg.latency, "runner", None):
        names.append(cfg.latency.runner.partition(":")[0])
    roots = [Path(p).resolve() for p in cfg.python_path]
    found: list[str] = []
    for name in names:
        spec = importlib.util.find_spec(name.split(".")[0])
        if spec is None:
            continue
        where = Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin or "")
        where = where.resolve()
        if any(root == where.parent for root in roots) and str(where) not in found:
            found.append(str(where))
    return found


def trial_slots(cfg: Any, resources: Mapping[str, float]) -> int:
    """How many trials ``resources`` (``ray.cluster_resources()``) run at once at the trial resources
    (``resources.cpus``, ``resources.gpus``), capped by ``resources.max_concurrent``; 0 when no
    trial's GPUs fit."""
    slots = int(resources.get("CPU", 1) // cfg.resources.cpus)
    if cfg.resources.gpus > 0:
        slots = min(slots, int(resources.get("GPU", 0) // cfg.resources.gpus))
    return min(slots, cfg.resources.max_concurrent or slots)


def assigned_device(gpus: float) -> tuple[str, dict[str, Any]]:
    """The torch device of this Ray task and a record of it for the trial's notes.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned, so ``cuda`` is the assigned GPU (several
    trials at ``resources.gpus`` below 1 share one). A task that was given a GPU but finds no CUDA
    (no driver, a CPU-only torch, Ray's logical GPUs) trains on the CPU and says so.
    """
    import torch

    record: dict[str, Any] = {"device": "cpu"}
    if gpus <= 0:
        return "cpu", record
    try:
        import ray

        record["gpu_ids"] = [str(i) for i in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside a Ray task no ids are assigned
        record["gpu_ids"] = []
    if torch.cuda.is_available():
        record["device"] = f"cuda ({torch.cuda.get_device_name(0)})"
        return "cuda", record
    record["gpu_fallback"] = (
        f"resources.gpus={gpus} asked for a GPU (Ray assigned {record['gpu_ids'] or 'none'}) but torch finds no "
        "CUDA device in this worker; trained on the CPU"
    )
    return "cpu", record


def runtime_env(cfg: Any) -> dict[str, Any] | None:
    """The Ray ``runtime_env`` that ships the study's user modules to every worker (None if none)."""
    modules = user_modules(cfg)
    return {"py_modules": modules} if modules else None


def pack_folder(folder: str | os.PathLike[str]) -> bytes:
    """A folder's files as an uncompressed tar (checkpoints are mostly float weights: gzip gains little)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(Path(folder).iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


#: ``OSError.errno`` of a write that found no room: the device is full, or the user's quota is.
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def full_folder(exc: BaseException) -> str | None:
    """The folder a failed write found full, when ``exc`` (or what it was raised from, or a Ray
    task error's ``cause``) is an ``OSError`` with a :data:`FULL_ERRNOS` errno; else None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return str(e.filename) if e.filename else "(folder not named by the system)"
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def unpack_to(blob: bytes, dest: str | os.PathLike[str]) -> Path:
    """Write ``blob`` (from :func:`pack_folder`) to ``dest`` atomically: all files or none.

    Raises:
        OSError: no room (``ENOSPC``/``EDQUOT``): nothing is left behind and the error names
            ``dest``'s folder, the one that is full.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
            tar.extractall(tmp, filter="data")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in FULL_ERRNOS:
            raise OSError(exc.errno, os.strerror(exc.errno), str(dest.parent)) from exc
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


class CheckpointSink:
    """Writes trial checkpoints into the study folder on the launcher's node (a Ray actor)."""

    def __init__(self, study_dir: str) -> None:
        self.root = Path(study_dir) / "checkpoints"

    def write(self, number: int, blob: bytes) -> str:
        return str(unpack_to(blob, self.root / f"trial_{number:05d}"))


def start_sink(study_dir: Path):
    """Start a :class:`CheckpointSink` actor on this (the launcher's) node; returns its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(CheckpointSink)  # write is idempotent
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote(str(study_dir.resolve()))
