"""Rebuild a trial's eager model from its checkpoint: base architecture, chain replayed, weights.

A checkpoint is a plan and its weights (:mod:`automl._checkpoint`). The model's structure follows
from the plan, not from the trained weights (the premise of :mod:`automl._prescreen`'s dry run),
so :func:`load_model` builds the base architecture from the plan's base reference, replays the
chain through :func:`automl._trial.apply_chain` with every method's own ``apply`` and a ``fit``
that does not train, and then loads the stored weights strictly: every entry of the rebuilt
model's state dict must be in the file, with its shape, and nothing else may be.

Post-training stages (int8) run their own recipe on calibration data, as in the trial (the data's
training batches when ``data`` is given, else seeded random inputs of the recorded shape): the
recipe decides which layers become which quantised kernels; the calibrated scales and zero points
are then overwritten by the stored ones. Nothing in this module knows a method by name, so a new
or changed method rebuilds as long as its structure follows from its parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from searchspace import CompressionMethod, Plan, SensitivityProfile
from automl._checkpoint import CheckpointError, load_checkpoint
from automl._models import build_model
from automl._train import TrialFailed
from automl._trial import apply_chain

__all__ = ["checkpoint_profile", "load_model"]

#: Random calibration batches (and their size) where no data is given.
_CALIBRATION = (8, 32)


def _calibration(data: Any, shape: tuple[int, ...], batch_size: int, seed: int):
    if data is not None:
        return lambda: iter(data.batches("train", batch_size, shuffle=True, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(_CALIBRATION[1], *shape, generator=gen), torch.zeros(_CALIBRATION[1], dtype=torch.long)) for _ in range(_CALIBRATION[0])]
    return lambda: iter(batches)


def _load_strict(model: nn.Module, state: Mapping[str, Any], folder: Path) -> None:
    """``load_state_dict(strict=True)``, packed int8 weights included.

    Packed weights (TorchScript objects of quantised layers, stored as their ``__getstate__``) are
    made anew from that state and set on their module: torch's own loader for FX-quantised modules
    recognises them only at the root module, and ``__setstate__`` on an existing object changes nothing.
    """
    current = model.state_dict()
    missing, extra = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {folder}: the weights do not fit the plan's rebuilt model: "
            f"{len(missing)} entries missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
        )
    plain: OrderedDict[str, Any] = OrderedDict()
    plain._metadata = getattr(state, "_metadata", OrderedDict())  # type: ignore[attr-defined]  # layers' versions
    for key, value in state.items():
        if isinstance(value, dict) and "script_object" in value:
            owner, _, attr = key.rpartition(".")
            module = model.get_submodule(owner)
            if not isinstance(getattr(module, attr, None), torch.ScriptObject):
                raise CheckpointError(f"checkpoint {folder}: {key!r} holds packed weights, but the rebuilt model has a {type(current[key]).__name__} there")
            packed = torch.ScriptObject.__new__(torch.ScriptObject)
            packed.__setstate__(value["script_object"])  # (state, class name), as __getstate__ gave it
            setattr(module, attr, packed)
        else:
            plain[key] = value
    try:
        result = model.load_state_dict(plain, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"checkpoint {folder}: the weights do not fit the plan's rebuilt model: {str(exc).strip().splitlines()[-1].strip()}") from exc
    left = [k for k in result.missing_keys if not isinstance(current.get(k), torch.ScriptObject)]
    if left or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {folder}: entries not loaded: {left[:3]} missing, {result.unexpected_keys[:3]} unexpected")


def checkpoint_profile(record: Mapping[str, Any]) -> SensitivityProfile | None:
    """The sensitivity profile a checkpoint's plan was applied with (None where the study had none)."""
    stored = record.get("profile")
    return SensitivityProfile.from_dict(stored) if stored else None


def load_model(
    folder: str | Path,
    *,
    data: Any = None,
    methods: Mapping[str, CompressionMethod] | None = None,
    seed: int = 0,
) -> nn.Module:
    """The eager model of a checkpoint folder (a trial's or an extra operating point's ``variant_K``), in eval mode on the CPU.

    Args:
        folder: the checkpoint folder (``<study>/checkpoints/trial_NNNNN``).
        data: the study's splits; post-training stages then calibrate on the training batches
            the trial drew (the base reference's ``calibration``: batch size and seed). Without
            it, on random inputs of the right shape: the stored weights (and any stored scales)
            replace what they fit, but a recipe kept for the artifact (int8 quantised when the
            artifact is built) holds those random inputs.
        methods: method instances by name (default: the registered classes; a user method's
            plugin module must be imported first).

    Raises:
        CheckpointError: the folder is missing, damaged or of an older format, a stage of its
            plan does not apply, or the weights do not fit the rebuilt model.
    """
    ckpt = load_checkpoint(folder)
    ref = ckpt.record["base"]
    shape = tuple(ref["input_shape"])
    try:
        torch.manual_seed(seed)
        base = build_model(ref["model"], input_shape=shape, num_classes=int(ref["num_classes"]), options=ref.get("options") or {}).eval()
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.folder}: base {ref.get('model')!r} cannot be built: {exc}") from exc
    plan = Plan.from_dict(ckpt.record["plan"])
    profile = checkpoint_profile(ckpt.record)
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))
    if data is not None:
        example = data.example()
    try:
        # Replayed as a trial runs it: some methods trace the graph through autograd (torch-pruning),
        # so a caller's torch.no_grad() must not reach them.
        with torch.enable_grad():
            calib = ref.get("calibration") or {}
            model, _ = apply_chain(
                plan, base, example=example,
                calibration=_calibration(data, shape, int(calib.get("batch_size", _CALIBRATION[1])), int(calib.get("seed", seed))),
                train=lambda module, **_: module, methods=methods, dry_run=True, profile=profile,
            )
    except (TrialFailed, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.folder}: its plan {plan.label} cannot be replayed: {exc}") from exc
    model = model.cpu().eval()
    _load_strict(model, ckpt.state_dict, ckpt.folder)
    return model.eval()
