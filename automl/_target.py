"""Where a latency is measured: the one function every artifact timing goes through.

:func:`time_artifact` times an artifact in one of three places, chosen by the ``latency`` settings:

- **here** (default): the node that built the artifact, with the clock of :mod:`automl._latency`
  (block or per-sample timing, several spaced attempts under the node-local lock);
- **on the target node** (``latency.node: RESOURCE``): a Ray task that requires the custom
  resource ``RESOURCE`` (declared on the deployment box with ``ray start --resources
  '{"RESOURCE": 1}'``) receives the artifact's file as bytes and the inputs as task arguments (no
  shared filesystem), opens the artifact there and times it *here* on that node, under that node's
  lock, so one measurement runs at a time on it and no training of the study runs beside it.
  Training stays where Ray places it; the caller gives up its own node hold while it waits
  (:func:`automl._latency.idle`), so a trial on the target node itself cannot block its timing;
- **by the user's runner** (``latency.runner: "module:function"``, see :class:`TimingRunner`): for
  a target Ray cannot run on (a phone over ``adb``, a TensorRT engine), the function gets the
  artifact file, the inputs and the settings and returns per-call times in ms; ``latency_ms`` is
  their median, ``latency_iqr_ms`` their IQR. With ``latency.node`` as well, the runner runs on
  the target node (the box the phone is plugged into).

Every timing returns a :class:`Timing` whose ``where`` says where it was measured (host, Ray node
id, process, CPU model and cores, runtime and its version, device, threads, the resource and the
runner); :class:`automl._measure.Metrics` keeps it as ``latency_target`` (JSON text: one shape in
Optuna's user attributes, the base record and the dry runs), so ``automl show`` can say where the
study's latencies were measured and warn when its records disagree (:func:`target_summary`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import platform
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Protocol, Sequence

import torch

from automl._artifact import Artifact, ArtifactError, artifact_files, eager_artifact, load_artifact
from automl._latency import LatencySettings, _median_iqr, idle, latency_lock, stable_latency, time_blocks, time_per_sample

__all__ = ["TargetError", "Timing", "TimingRunner", "cpu_name", "load_runner", "provenance", "require_node", "study_targets", "target_of", "target_summary", "time_artifact"]

#: Keys of a ``where`` record that decide what a latency means; records that differ in one of them
#: were measured on different targets (the Ray node id and process change with every restart).
TARGET_KEYS = ("resource", "host", "cpu", "cores", "runtime", "runtime_version", "device", "threads", "runner")

#: Seconds between two checks, while a timing waits on the target node, that the node is still there.
_NODE_CHECK_S = 10.0


class TargetError(RuntimeError):
    """The configured target cannot be reached (no node declares the resource); one line."""


class Timing(NamedTuple):
    """One latency: median (or per-sample mean) and IQR in ms, and where it was measured."""

    median_ms: float
    iqr_ms: float
    #: :func:`provenance` of the process that ran the clock.
    where: dict[str, Any]
    #: Per-sample timing only (a dynamic model): median and 90th percentile over the samples
    #: (:class:`automl._latency.PerSample`); None for block timing and a ``latency.runner``.
    p50_ms: float | None = None
    p90_ms: float | None = None


class TimingRunner(Protocol):
    """A user's timing function (``latency.runner``) for a target Ray cannot run on.

    Called once per measurement, under the node-local latency lock of the node it runs on (the
    launcher's or the trial's node, or the ``latency.node`` target), with:

    Args:
        path: the artifact file (``model.onnx`` for ``onnxruntime``, ``model.ts`` for
            ``torchscript``), in a folder the function may write beside.
        inputs: the real test inputs (a CPU tensor; batch ``latency.batch_size`` for a static
            model, one row per sample for a dynamic one).
        settings: the study's :class:`~automl._latency.LatencySettings` (warmup, repeats, threads).

    Returns:
        Per-call times in milliseconds (at least one); the study records their median and IQR.
    """

    def __call__(self, path: Path, inputs: torch.Tensor, settings: LatencySettings) -> Sequence[float]: ...


# --- where ---------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model, as the OS names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _runtime_version(runtime: str) -> str | None:
    if runtime == "onnxruntime":
        try:
            import onnxruntime

            return str(onnxruntime.__version__)
        except ImportError:
            return None
    return torch.__version__.split("+")[0]


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - no Ray runtime in this process: no node id to record
        return None


def provenance(settings: LatencySettings) -> dict[str, Any]:
    """Where this process times an artifact with ``settings``: host, Ray node id (None outside Ray),
    process id, CPU model and logical cores, runtime and its version, device, threads, and the
    ``latency.node`` resource and ``latency.runner`` that apply."""
    return {
        "host": socket.gethostname(),
        "node_id": _ray_node_id(),
        "pid": os.getpid(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "runtime": settings.runtime,
        "runtime_version": _runtime_version(settings.runtime),
        "device": settings.device,
        "threads": settings.threads,
        "resource": settings.node,
        "runner": settings.runner,
    }


def target_of(value: Any) -> dict[str, Any] | None:
    """A record's ``latency_target`` (JSON text, as :class:`~automl._measure.Metrics` keeps it) as a dict."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        try:
            out = json.loads(value)
        except ValueError:
            return None
        return out if isinstance(out, dict) else None
    return None


class TargetSummary(NamedTuple):
    """Where a study's latencies were measured: one line, and a warning when records disagree."""

    #: The distinct targets (the :data:`TARGET_KEYS` of each), most records first, with their count.
    targets: list[tuple[dict[str, Any], int]]
    #: Records that carry no ``latency_target`` (measured before it was recorded).
    unknown: int

    @staticmethod
    def describe(target: dict[str, Any]) -> str:
        how = f"runner {target['runner']}" if target.get("runner") else f"{target.get('runtime')} {target.get('runtime_version') or ''}".strip()
        on = f"node with resource {target['resource']!r}, " if target.get("resource") else ""
        return f"{on}{target.get('host')} ({target.get('cpu')}, {target.get('cores')} cores), {how}, {target.get('device')}, {target.get('threads')} threads"

    @property
    def line(self) -> str | None:
        if not self.targets:
            return None
        return "latency measured on " + self.describe(self.targets[0][0])

    @property
    def warning(self) -> str | None:
        if len(self.targets) < 2:
            return None
        parts = "; ".join(f"{n} on {self.describe(t)}" for t, n in self.targets)
        return f"latency records disagree on the target, so their latencies do not compare: {parts}"


def target_summary(records: Iterable[Any]) -> TargetSummary:
    """Group ``latency_target`` values (JSON text or dicts; None for a record without one) by target."""
    counts: dict[str, tuple[dict[str, Any], int]] = {}
    unknown = 0
    for value in records:
        where = target_of(value)
        if where is None:
            unknown += 1
            continue
        key = {k: where.get(k) for k in TARGET_KEYS}
        text = json.dumps(key, sort_keys=True, default=str)
        counts[text] = (key, counts.get(text, (key, 0))[1] + 1)
    return TargetSummary(sorted(counts.values(), key=lambda kv: -kv[1]), unknown)


def study_targets(base: dict[str, Any], rows: Iterable[Any]) -> TargetSummary:
    """:func:`target_summary` of a study: its base record and each finished trial's user attributes
    (``rows``: :class:`automl._pareto.FrontRow`), the trial's own timing and its dry run's."""
    records: list[Any] = [base.get("latency_target")] if base else []
    for r in rows:
        records.append(r.attrs.get("latency_target"))
        dry = r.attrs.get("dry_run")
        if isinstance(dry, dict) and dry.get("latency_target"):
            records.append(dry["latency_target"])
    return target_summary(records)


# --- runner --------------------------------------------------------------------------------


def load_runner(reference: str) -> TimingRunner:
    """The function a ``module:function`` reference names.

    Raises:
        ArtifactError: it cannot be imported or is not callable (the config validates this first).
    """
    module, _, name = reference.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"latency.runner {reference!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not callable(fn):
        raise ArtifactError(f"latency.runner {reference!r} must be callable, got {type(fn).__name__}")
    return fn


def _time_with_runner(artifact: Artifact, inputs: torch.Tensor, settings: LatencySettings) -> tuple[float, float]:
    if artifact.path is None:
        raise ArtifactError(f"latency.runner times the artifact file, and the {artifact.runtime} runtime writes none")
    runner = load_runner(settings.runner or "")
    with latency_lock(settings.isolate):
        times = runner(Path(artifact.path), inputs.detach().cpu().contiguous(), settings)
    try:
        values = [float(t) for t in times]
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"latency.runner {settings.runner!r} must return per-call times in ms (numbers), got {times!r:.200}") from exc
    if not values or any(not (v >= 0.0 and v < float("inf")) for v in values):
        raise ArtifactError(f"latency.runner {settings.runner!r} must return at least one finite time >= 0 (ms), got {values[:10]}")
    return _median_iqr(values)


# --- here ----------------------------------------------------------------------------------


def _time_here(artifact: Artifact, inputs: torch.Tensor, settings: LatencySettings, *, per_sample: bool) -> tuple[float, float, tuple[float, float] | None]:
    """Median (per-sample: mean) and IQR in ms, and per-sample timing's (p50, p90) of the attempt kept."""
    if settings.runner:
        return (*_time_with_runner(artifact, inputs, settings), None)
    quantiles: dict[float, tuple[float, float]] = {}
    if per_sample:
        runs = [artifact.bind(s) for s in inputs.split(1)]

        def once() -> tuple[float, float]:
            with artifact.context():
                got = time_per_sample(runs, settings, sync=artifact.sync)
            # stable_latency keeps one attempt by its mean; its quantiles are found by that mean.
            quantiles[got.mean_ms] = (got.p50_ms, got.p90_ms)
            return got.mean_ms, got.iqr_ms

    else:
        run = artifact.bind(inputs)

        def once() -> tuple[float, float]:
            with artifact.context():
                return time_blocks(run, settings, sync=artifact.sync)

    median, iqr, _ = stable_latency(once, settings)
    return median, iqr, quantiles.get(median)


# --- on the target node --------------------------------------------------------------------


def _shipped(artifact: Artifact) -> tuple[dict[str, bytes] | None, Any]:
    """What travels to the target: the bytes of the artifact's files (:func:`automl._artifact.artifact_files`,
    an ONNX graph first, then its external data, by their names relative to the graph's folder), or
    for the ``eager`` runtime, which writes no file, the module itself."""
    if artifact.path is None:
        module = artifact._run  # the eager artifact runs the module it holds
        if any(t.device.type != "cpu" for t in (*module.parameters(), *module.buffers())):
            module = copy.deepcopy(module).cpu()  # the target moves it to latency.device itself
        return None, module
    path = Path(artifact.path)
    return {f.relative_to(path.parent).as_posix(): f.read_bytes() for f in artifact_files(path)}, None


def _timing_task(files: dict[str, bytes] | None, module: Any, artifact_runtime: str, inputs: torch.Tensor, settings: LatencySettings, per_sample: bool) -> Timing:
    """Body of the Ray task that runs on the target node: open the shipped artifact, time it here."""
    here = dataclasses.replace(settings, node=None)
    with tempfile.TemporaryDirectory(prefix="automl-target-") as tmp:
        if files is None:
            artifact = eager_artifact(module, device=settings.device, threads=settings.threads)
        else:
            for name, data in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            artifact = load_artifact(Path(tmp), runtime=artifact_runtime, device=settings.device, threads=settings.threads)
        median, iqr, tail = _time_here(artifact, inputs, here, per_sample=per_sample)
    return Timing(median, iqr, {**provenance(here), "resource": settings.node}, *(tail or (None, None)))


def _nodes_with(resource: str) -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and float(n.get("Resources", {}).get(resource, 0)) > 0]


def require_node(resource: str) -> list[str]:
    """The ids of the live Ray nodes that declare ``resource`` (Ray must be initialised).

    Raises:
        TargetError: none does (one line naming ``latency.node``, the resource and what the cluster has).
    """
    import ray

    found = _nodes_with(resource)
    if not found:
        have = sorted({k for n in ray.nodes() if n.get("Alive") for k in n.get("Resources", {}) if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")})
        raise TargetError(
            f"latency.node: a live node of the Ray cluster must declare the resource {resource!r} "
            f"(start the target with `ray start --address ... --resources '{{\"{resource}\": 1}}'`), "
            f"but none does; the cluster's custom resources: {', '.join(have) or 'none'}"
        )
    return found


def _ensure_ray(resource: str) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", include_dashboard=False, log_to_driver=False, configure_logging=False, logging_level="ERROR")
    except Exception as exc:  # noqa: BLE001 - no cluster to connect to: the timing cannot run
        raise ArtifactError(f"latency.node {resource!r}: timing on the target needs a running Ray cluster (RAY_ADDRESS), but none was reached: {type(exc).__name__}: {exc}") from exc


#: This process's Ray task of each target resource (defined once: each definition is exported anew).
_TASKS: dict[str, Any] = {}


def _task(resource: str) -> Any:
    import ray

    if resource not in _TASKS:
        # num_cpus=0: the target's CPUs may all be reserved by training trials; what keeps the
        # measurement alone on the node is its latency lock, taken inside the task. An explicit
        # DEFAULT strategy: a trial's placement group (Ray Tune's) must not capture the task, whose
        # node is chosen by the resource alone.
        _TASKS[resource] = ray.remote(_timing_task).options(num_cpus=0, resources={resource: 0.001}, scheduling_strategy="DEFAULT", name="automl-latency-on-target")
    return _TASKS[resource]


def _time_on_node(artifact: Artifact, inputs: torch.Tensor, settings: LatencySettings, *, per_sample: bool) -> Timing:
    import ray

    resource = settings.node or ""
    _ensure_ray(resource)
    files, module = _shipped(artifact)
    task = _task(resource)
    ref = task.remote(files, module, artifact.runtime, inputs.detach().cpu().contiguous(), settings, per_sample)
    with idle():  # the target may be this node: its measurement must not wait for our hold
        while not ray.wait([ref], timeout=_NODE_CHECK_S)[0]:
            if not _nodes_with(resource):
                ray.cancel(ref, force=True)
                raise ArtifactError(f"latency.node {resource!r}: no live node of the Ray cluster declares the resource any more; the measurement cannot run")
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise ArtifactError(f"latency on the node with resource {resource!r} failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ''}") from exc


# --- the seam ------------------------------------------------------------------------------


def time_artifact(artifact: Artifact, inputs: torch.Tensor, settings: LatencySettings, *, per_sample: bool) -> Timing:
    """Median (or per-sample mean) and IQR, in ms, of ``artifact`` on ``inputs``, and where: the one latency.

    Static models are block-timed on ``inputs`` as one batch; dynamic ones (``per_sample``) run each
    sample of ``inputs`` alone. Held under the node lock and repeated while the spread is too wide
    (:func:`automl._latency.stable_latency`). ``settings.node`` moves the whole measurement to the
    target node, ``settings.runner`` replaces the clock (see the module docstring).

    Raises:
        ArtifactError: the target cannot time the artifact (the reason says why).
    """
    if settings.node:
        return _time_on_node(artifact, inputs, settings, per_sample=per_sample)
    median, iqr, tail = _time_here(artifact, inputs, settings, per_sample=per_sample)
    return Timing(median, iqr, provenance(settings), *(tail or (None, None)))
