"""The base's sensitivity profile: measured once per study, before the first trial, and cached.

For every method of the search that implements :class:`searchspace.Profiled` and whose ranges can
sample a setting that reads the profile (``prune.allocation: sensitivity``), each layer it can act
on is compressed alone at each of its profile levels, without fine-tuning, and the result is
measured: accuracy on the first :data:`PROFILE_SAMPLES` validation samples (never test), and the
exact parameters and MACs saved against the base. The table and its wall time go to
``<study>/profile.json``; a resumed study reads it back instead of measuring again, and the study
records where it is and what it cost (study user attribute :data:`PROFILE`).

The profile is measured where trials run: a Ray task with the trial resources (``resources.cpus``
and ``resources.gpus``), computing with a trial's thread count on its device. The study starts Ray
for its trials anyway, and the trials' payload ships the same base and data, so the task costs a
worker start; on a cluster it keeps the launcher's machine, which may be small, out of the work.
The record says where it ran (device, node, process).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from searchspace import ApplyContext, CompressionMethod, LayerLevel, Profiled, SensitivityProfile
from automl._measure import count_macs, param_count

__all__ = ["PROFILE", "PROFILE_FILE", "PROFILE_SAMPLES", "compute_profile", "ensure_profile", "profiled_methods"]

#: The cache file in the study folder.
PROFILE_FILE = "profile.json"
#: Study user attribute: ``{"file", "seconds", "samples", "layers": {method: layer count}, "where"}``,
#: ``where`` the Ray task that measured it (device, torch_threads, node_id, pid; also in the file).
PROFILE = "profile"
#: Validation samples each profile accuracy is measured on (the first this many).
PROFILE_SAMPLES = 2000


def profiled_methods(methods: Mapping[str, CompressionMethod]) -> dict[str, CompressionMethod]:
    """The methods whose ranges can sample a setting that reads the profile, by name."""
    return {n: m for n, m in sorted(methods.items()) if isinstance(m, Profiled) and m.needs_profile()}


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str, batch: int = 500) -> float:
    model = model.eval().to(device)
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum())
    return correct / max(len(y), 1)


def compute_profile(
    base: nn.Module,
    data: Any,
    methods: Mapping[str, CompressionMethod],
    *,
    batch_size: int,
    seed: int,
    samples: int = PROFILE_SAMPLES,
    device: torch.device | str = "cpu",
) -> SensitivityProfile:
    """Measure every layer of every method of ``methods`` alone at each of its levels (see the module doc).

    ``methods`` are :class:`searchspace.Profiled` (callers pass :func:`profiled_methods`).
    """
    start = time.perf_counter()
    base = base.eval().cpu()
    example = data.example()
    x_val, y_val = data.tensors("val", limit=samples)
    base_accuracy = _accuracy(base, x_val, y_val, device)
    base_params = param_count(base)
    base_macs = count_macs(base, example)
    context = ApplyContext(
        example_input=example,
        calibration=lambda: iter(data.batches("train", batch_size, shuffle=True, seed=seed)),
        fit=lambda module, **_: module,
        base=base,
    )
    layers: dict[str, dict[str, tuple[LayerLevel, ...]]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for name, method in methods.items():
        if not isinstance(method, Profiled):
            raise TypeError(f"a profiled method must implement searchspace.Profiled, but {name!r} does not")
        rows: dict[str, tuple[LayerLevel, ...]] = {}
        for layer in method.profile_layers(base, example):
            entries = []
            for level in method.profile_levels():
                with torch.enable_grad():  # Torch-Pruning traces its dependency graph through autograd
                    model = method.compress_layer(base, layer, level, context=context)
                if model is None:
                    continue
                saved = base_params - param_count(model)
                entries.append(LayerLevel(float(level), _accuracy(model, x_val, y_val, device), saved, base_macs - count_macs(model.cpu(), example)))
            if entries:
                rows[layer] = tuple(sorted(entries, key=lambda e: e.params_saved))
        layers[name] = rows
        with torch.enable_grad():
            extra[name] = method.profile_extra(base, example)
    return SensitivityProfile(
        base_accuracy=base_accuracy, base_params=base_params, base_macs=base_macs, layers=layers, extra=extra,
        samples=len(y_val), seconds=time.perf_counter() - start,
    )


def _profile_task(
    base: nn.Module, data: Any, methods: Mapping[str, CompressionMethod], batch_size: int, seed: int, gpus: float, cpus: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ray task: the profile measured on the task's device (the trials' resources), and where it ran."""
    import ray

    from automl._cluster import assigned_device
    from automl._threads import set_threads, training_threads

    threads = set_threads(training_threads(cpus))
    device, where = assigned_device(gpus)
    profile = compute_profile(base, data, methods, batch_size=batch_size, seed=seed, device=device)
    return profile.to_dict(), {**where, "torch_threads": threads, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def ensure_profile(
    cfg: Any, study_dir: Path, base: nn.Module, data: Any, methods: Mapping[str, CompressionMethod], *, log: Callable[[str], None] = print
) -> tuple[SensitivityProfile | None, dict[str, Any] | None]:
    """The study's profile: read from ``<study>/profile.json``, or measured and written there.

    Returns:
        ``(profile, record)``: None and None when no method needs one; the record is what the
        study stores under :data:`PROFILE`.
    """
    wanted = profiled_methods(methods)
    if not wanted:
        return None, None
    path = study_dir / PROFILE_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        profile = SensitivityProfile.from_dict(stored)
        if set(wanted) <= set(profile.layers):
            log(f"profile: read {PROFILE_FILE} ({_describe(profile)}, measured in {profile.seconds:.1f} s)")
            return profile, {**_record(profile), **({"where": stored["where"]} if "where" in stored else {})}
    log(f"profile: measuring each layer alone for {', '.join(wanted)} on {PROFILE_SAMPLES} validation samples at most")
    import ray

    from automl._study import init_ray

    init_ray(cfg)
    task = ray.remote(num_cpus=cfg.resources.cpus, num_gpus=cfg.resources.gpus)(_profile_task)
    measured, where = ray.get(task.remote(base, data, wanted, cfg.budget.batch_size, cfg.seed, cfg.resources.gpus, cfg.resources.cpus))
    profile = SensitivityProfile.from_dict(measured)
    # Written whole or not at all: a crash mid-write must not leave a profile resume would trust.
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({**profile.to_dict(), "where": where}, indent=1))
    os.replace(partial, path)
    log(f"profile: {_describe(profile)} in {profile.seconds:.1f} s on {where['device']}, written to {PROFILE_FILE}")
    return profile, {**_record(profile), "where": where}


def _describe(profile: SensitivityProfile) -> str:
    return ", ".join(f"{m} {len(rows)} layers x {max((len(e) for e in rows.values()), default=0)} levels" for m, rows in profile.layers.items())


def _record(profile: SensitivityProfile) -> dict[str, Any]:
    return {"file": PROFILE_FILE, "seconds": profile.seconds, "samples": profile.samples, "layers": {m: len(rows) for m, rows in profile.layers.items()}}
