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

Nothing has to be shared between nodes except the Python environment (same packages, and the
project importable: install it, or set ``PYTHONPATH``/a Ray ``runtime_env``).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

__all__ = ["CheckpointSink", "pack_folder", "start_sink", "unpack_to"]


def pack_folder(folder: str | os.PathLike[str]) -> bytes:
    """A folder's files as an uncompressed tar (checkpoints are mostly float weights: gzip gains little)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(Path(folder).iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


def unpack_to(blob: bytes, dest: str | os.PathLike[str]) -> Path:
    """Write ``blob`` (from :func:`pack_folder`) to ``dest`` atomically: all files or none."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(tmp, filter="data")
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
