"""The base's sensitivity profile: measured once per study, before the first trial, and cached.

For every method of the search that implements :class:`searchspace.Profiled` and whose ranges can
sample a setting that reads the profile (``prune.allocation: sensitivity``), each layer it can act
on is compressed alone at each of its profile levels, without fine-tuning, and the result is
measured: accuracy on the first :data:`PROFILE_SAMPLES` validation samples (never test), and the
exact parameters and MACs saved against the base. The table and its wall time go to
``<study>/profile.json``; a resumed study reads it back instead of measuring again, and the study
records where it is and what it cost (study user attribute :data:`PROFILE`).

The profile is measured where trials run: Ray tasks with the trial resources (``resources.cpus``
and ``resources.gpus``), computing with a trial's thread count on its device, one per trial slot
(the slots are free until the first trial), each measuring every n-th layer. The study starts Ray
for its trials anyway, and the trials' payload ships the same base and data, so the task costs a
worker start; on a cluster it keeps the launcher's machine, which may be small, out of the work.
The record says where it ran (device, node, process).
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from searchspace import ApplyContext, CompressionMethod, LayerLevel, Profiled, SensitivityProfile
from automl._cluster import trial_slots
from automl._measure import count_macs, param_count
from automl._models import StagedNet

__all__ = ["PROFILE", "PROFILE_FILE", "PROFILE_SAMPLES", "compute_profile", "ensure_profile", "merge_parts", "profiled_methods"]

#: The cache file in the study folder.
PROFILE_FILE = "profile.json"
#: Study user attribute: ``{"file", "seconds", "samples", "layers": {method: layer count}, "where"}``,
#: ``where`` the Ray task that measured it (device, torch_threads, node_id, pid; also in the file).
PROFILE = "profile"
#: Validation samples each profile accuracy is measured on (the first this many).
PROFILE_SAMPLES = 2000
#: Memory a profile (each part of it) may hold of the base's activations at block inputs.
CACHE_BYTES = 512 * 2**20


def profiled_methods(methods: Mapping[str, CompressionMethod]) -> dict[str, CompressionMethod]:
    """The methods whose ranges can sample a setting that reads the profile, by name."""
    return {n: m for n, m in sorted(methods.items()) if isinstance(m, Profiled) and m.needs_profile()}


def _blocks(model: nn.Module) -> list[nn.Module] | None:
    """A :class:`StagedNet`'s blocks in the order its forward runs them (each stage's children where
    the stage is a plain ``nn.Sequential``, else the stage), then its head; None for another model."""
    if not isinstance(model, StagedNet):
        return None
    blocks: list[nn.Module] = []
    for stage in model.stages:
        blocks.extend(stage if type(stage) is nn.Sequential else [stage])
    return [*blocks, model.head]


def _same_state(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    try:
        return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    except (AttributeError, RuntimeError, TypeError):  # a quantized or non-tensor entry: not compared
        return False


class _Validation:
    """Validation accuracy of the base and of copies of it compressed at one layer.

    Such a copy computes what the base does up to the first block the compression changed, so the
    base's activations at block inputs (:func:`_blocks`) are computed once and a copy runs from the
    last stored input at or before its first changed block. Inputs are stored from the last block
    backwards within ``budget`` bytes (default :data:`CACHE_BYTES`), and only where running the rest
    of the base from them gives the base's logits (checked on the first batch); any other model runs
    whole. A block counts as changed where its state (parameter and buffer names, shapes, values)
    differs from the base's, which every profiled method's change does (a pruned or decomposed
    layer, a layer wrapped for simulated int8). Models are evaluated on ``device`` (a copy there
    when it is not the CPU): the caller's models stay on the CPU, where they are compressed and
    their MACs counted.
    """

    def __init__(self, base: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str, *, batch: int = 500, budget: int | None = None) -> None:
        self.x, self.y, self.device, self.batch = x, y, device, batch
        self.blocks = _blocks(base)
        self.states = [b.state_dict() for b in self.blocks] if self.blocks else []
        self.stored: dict[int, list[torch.Tensor]] = {}
        if self.blocks and len(x):
            self._store(self._on_device(base), CACHE_BYTES if budget is None else budget)

    def _on_device(self, model: nn.Module) -> nn.Module:
        model = model.eval()
        return model if torch.device(self.device).type == "cpu" else copy.deepcopy(model).to(self.device)

    @torch.no_grad()
    def _inputs(self, net: nn.Module, blocks: list[nn.Module], xb: torch.Tensor, keep: set[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor] | None:
        """The inputs of ``blocks`` ``keep`` of ``net`` on batch ``xb`` and its logits; None if a
        block is not called exactly once with one tensor."""
        seen: dict[int, list[Any]] = {i: [] for i in range(len(blocks))}
        hooks = [b.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args)) for i, b in enumerate(blocks)]
        try:
            logits = net(xb.to(self.device))
        finally:
            for h in hooks:
                h.remove()
        if any(len(calls) != 1 or len(calls[0]) != 1 or not isinstance(calls[0][0], torch.Tensor) for calls in seen.values()):
            return None
        return {i: seen[i][0][0] for i in keep}, logits

    @torch.no_grad()
    def _store(self, net: nn.Module, budget: int) -> None:
        blocks = _blocks(net)
        assert blocks is not None
        probe = self._inputs(net, blocks, self.x[: self.batch], set(range(1, len(blocks))))
        if probe is None:
            return
        first, logits = probe
        keep, spent = set(), 0
        for i in sorted(first, reverse=True):
            size = first[i].element_size() * first[i].numel() * len(self.x) // max(len(first[i]), 1)
            if spent + size > budget:
                break
            if torch.equal(self._run(blocks, i, first[i]), logits):
                keep.add(i)
                spent += size
        if not keep:
            return
        self.stored = {i: [] for i in keep}
        for start in range(0, len(self.x), self.batch):
            got = first if start == 0 else self._inputs(net, blocks, self.x[start : start + self.batch], keep)[0]  # type: ignore[index]
            for i in keep:
                self.stored[i].append(got[i].cpu())

    @staticmethod
    def _run(blocks: list[nn.Module], start: int, h: torch.Tensor) -> torch.Tensor:
        for block in blocks[start:]:
            h = block(h)
        return h

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        blocks = _blocks(model)
        start = 0
        if blocks is not None and self.stored and len(blocks) == len(self.blocks):
            changed = next((i for i, (b, s) in enumerate(zip(blocks, self.states)) if not _same_state(b.state_dict(), s)), len(blocks))
            start = max((i for i in self.stored if i <= changed), default=0)
        net = self._on_device(model)
        run = _blocks(net) if start else None
        correct = 0
        for n, i in enumerate(range(0, len(self.x), self.batch)):
            if run is not None:
                logits = self._run(run, start, self.stored[start][n].to(self.device))
            else:
                logits = net(self.x[i : i + self.batch].to(self.device))
            correct += int((logits.argmax(1).cpu() == self.y[i : i + self.batch]).sum())
        return correct / max(len(self.y), 1)


def compute_profile(
    base: nn.Module,
    data: Any,
    methods: Mapping[str, CompressionMethod],
    *,
    batch_size: int,
    seed: int,
    samples: int = PROFILE_SAMPLES,
    device: torch.device | str = "cpu",
    part: int = 0,
    parts: int = 1,
) -> SensitivityProfile:
    """Measure every layer of every method of ``methods`` alone at each of its levels (see the module doc).

    ``methods`` are :class:`searchspace.Profiled` (callers pass :func:`profiled_methods`). With
    ``parts`` > 1 this is one part of the profile: it measures every ``parts``-th (method, layer),
    starting at the ``part``-th, lists the other layers with no levels (so the parts keep one order)
    and measures ``extra`` in part 0 only; :func:`merge_parts` joins the parts.
    """
    start = time.perf_counter()
    base = base.eval().cpu()
    example = data.example()
    x_val, y_val = data.tensors("val", limit=samples)
    validation = _Validation(base, x_val, y_val, device)
    base_accuracy = validation.accuracy(base)
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
    job = 0
    for name, method in methods.items():
        if not isinstance(method, Profiled):
            raise TypeError(f"a profiled method must implement searchspace.Profiled, but {name!r} does not")
        rows: dict[str, tuple[LayerLevel, ...]] = {}
        for layer in method.profile_layers(base, example):
            job += 1
            if (job - 1) % parts != part:
                rows[layer] = ()
                continue
            entries = []
            for level in method.profile_levels():
                with torch.enable_grad():  # Torch-Pruning traces its dependency graph through autograd
                    model = method.compress_layer(base, layer, level, context=context)
                if model is None:
                    continue
                saved = base_params - param_count(model)
                entries.append(LayerLevel(float(level), validation.accuracy(model), saved, base_macs - count_macs(model.cpu(), example)))
            if entries or parts > 1:
                rows[layer] = tuple(sorted(entries, key=lambda e: e.params_saved))
        layers[name] = rows
        if part == 0:
            with torch.enable_grad():
                extra[name] = method.profile_extra(base, example)
    return SensitivityProfile(
        base_accuracy=base_accuracy, base_params=base_params, base_macs=base_macs, layers=layers, extra=extra,
        samples=len(y_val), seconds=time.perf_counter() - start,
    )


def merge_parts(parts: Sequence[SensitivityProfile], *, seconds: float) -> SensitivityProfile:
    """The profile the parts of :func:`compute_profile` measure together, in their layer order;
    ``seconds`` is the wall time of the whole."""
    first = parts[0]
    layers = {
        method: {layer: entries for layer in rows if (entries := next((p.layers[method][layer] for p in parts if p.layers[method][layer]), ()))}
        for method, rows in first.layers.items()
    }
    return replace(first, layers=layers, seconds=seconds)


def _profile_task(
    base: nn.Module, data: Any, methods: Mapping[str, CompressionMethod], batch_size: int, seed: int, gpus: float, cpus: float, part: int, parts: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ray task: one part of the profile measured on the task's device (the trials' resources), and where it ran."""
    import ray

    from automl._cluster import assigned_device
    from automl._threads import set_threads, training_threads

    threads = set_threads(training_threads(cpus))
    device, where = assigned_device(gpus)
    profile = compute_profile(base, data, methods, batch_size=batch_size, seed=seed, device=device, part=part, parts=parts)
    return profile.to_dict(), {**where, "torch_threads": threads, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "seconds": profile.seconds}


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
    # The trials' slots are free until the first trial: the layers are split across them.
    parts = max(1, trial_slots(cfg, ray.cluster_resources()))
    task = ray.remote(num_cpus=cfg.resources.cpus, num_gpus=cfg.resources.gpus)(_profile_task)
    start = time.perf_counter()
    shared = ray.put(base), ray.put(data)  # shipped once, whatever the number of parts
    refs = [task.remote(*shared, wanted, cfg.budget.batch_size, cfg.seed, cfg.resources.gpus, cfg.resources.cpus, i, parts) for i in range(parts)]
    measured = ray.get(refs)
    profile = merge_parts([SensitivityProfile.from_dict(m) for m, _ in measured], seconds=time.perf_counter() - start)
    where = {**measured[0][1], "parts": [w for _, w in measured]}
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
