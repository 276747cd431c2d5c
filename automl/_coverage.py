"""Whether a method really applies to a model: one cell of the method-coverage table.

A cell is one method (a pruning criterion counts as its own method) on one base model at the
method's middle settings. :func:`check_cell` runs what a trial runs, without training: ``supports``,
``apply`` (``fit`` trains nothing), BatchNorm statistics from the inputs (where the trial
fine-tunes), a forward pass, the output shape against the base's, the ONNX
artifact the trial ships (:func:`automl._artifact.build_artifact`) and ONNX Runtime against the eager
model. Its verdict is one of

- ``works``: every step passed;
- ``n/a``: ``supports()`` refused the model, with its reason (the study leaves the method out);
- ``fails``: ``supports()`` accepted the model and a later step failed: the method lies.

The suite's registry-driven test (``tests/searchspace/test_supports_truth.py``) and the coverage
benchmark (``benchmarks/method_coverage.py``) both judge cells here, so a number means the same in both.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna
import torch
from torch import nn

import searchspace
from searchspace._reason import first_line

__all__ = [
    "CONSTANT",
    "NCHWC",
    "ORT_FACTOR",
    "ORT_RTOL",
    "SPREAD",
    "Cell",
    "MidSampler",
    "check_cell",
    "input_dependent",
    "mid_params",
    "ort_rel_diff",
    "ort_tolerance",
    "ort_without",
    "ort_verdict",
    "variants",
]

#: ONNX Runtime against PyTorch, relative to the largest logit: a compressed model passes when it
#: differs by at most :func:`ort_tolerance` of its base's own difference at the same inputs, that is
#: ``max(ORT_RTOL, ORT_FACTOR * base difference)``. Float reordering alone moves some unmodified
#: bases by more than 1e-4 (MobileNetV2 by 1.8e-4 of its largest logit at 32 px), so a fixed 1e-4
#: would fail a correct method on a deep net; measured against the base, a wrong operator or
#: weight (an error of the order of the logits) is still caught.
ORT_RTOL = 1e-4
#: How many times its base's own ONNX Runtime difference a compressed model may differ by: its
#: layers are fewer or rearranged, so its reordering error is of the same order, not the same value.
ORT_FACTOR = 10.0
#: Smallest spread of the logits across inputs, relative to the largest logit, for a base whose
#: logits depend on the input: below it an ONNX check of 1e-4 relative would compare near-constants.
SPREAD = 1e-2
#: Spread below which a compressed model's logits count as constant (no longer depending on the
#: input): a method that does this computes nothing, whatever ONNX Runtime says about it.
CONSTANT = 1e-6
#: ONNX Runtime's graph optimiser that moves convolutions into its blocked NCHWc layout (on at
#: ``ORT_ENABLE_ALL``, the level the artifact runs at). Its kernels round differently from the
#: plain ones, which an ill-conditioned model amplifies: where ONNX Runtime fails a cell, the
#: reason also gives its logits with this optimiser off, which tells those kernels from a wrong export.
NCHWC = "NchwcTransformer"


@dataclass
class Cell:
    """One method on one model. ``step`` names the step that decided the verdict."""

    model: str
    method: str
    status: str  # works | n/a | fails | timeout
    step: str = ""  # supports | apply | forward | shape | onnx | ort | base
    reason: str = ""
    params_base: int | None = None
    params_after: int | None = None
    rel_diff: float | None = None
    #: The base's own ONNX Runtime difference at the same inputs, which sets the tolerance.
    base_rel_diff: float | None = None
    #: Where ONNX Runtime was outside the tolerance: PyTorch's float32 logits against the same model
    #: computed in float64, relative to the largest logit (:func:`ort_verdict`).
    float32_rel_err: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class MidSampler(optuna.samplers.BaseSampler):
    """Optuna sampler that picks the middle of every distribution (``fixed`` values first).

    The middle of a float or int range (geometric for a log range), the middle choice of a
    categorical one. Conditional spaces replay through it as through any sampler.
    """

    def __init__(self, fixed: Mapping[str, Any] | None = None) -> None:
        self.fixed = dict(fixed or {})

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        if param_name in self.fixed:
            return self.fixed[param_name]
        d = param_distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return d.choices[len(d.choices) // 2]
        mid = math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2
        if isinstance(d, optuna.distributions.IntDistribution):
            return int(d.low + round((mid - d.low) / d.step) * d.step)
        return float(mid)


def mid_params(method: searchspace.CompressionMethod, fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``method.space`` at the middle of its domains (``fixed``: Optuna names to pin, e.g. a criterion)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(sampler=MidSampler(fixed)).ask()
    return method.space(trial)


def variants(names: list[str] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, method, fixed Optuna params)`` of every registered method; ``prune`` once per
    criterion (``prune:l1``...), since each criterion is its own algorithm."""
    out = []
    for name in names or searchspace.list_methods():
        domain = searchspace.get_method(name).hyperparameters.get("criterion")
        if isinstance(domain, searchspace.Categorical):
            out.extend((f"{name}:{c}", name, {f"{name}.criterion": c}) for c in domain.choices)
        else:
            out.append((name, name, {}))
    return out


def _logit_spread(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = model(x).float()
    return float(y.std(dim=0).max() / y.abs().max().clamp_min(1e-12))


def input_dependent(model: nn.Module, x: torch.Tensor) -> float:
    """Make a randomly initialised ``model`` give logits that depend on the input; returns their
    spread (largest per-class std across ``x``, relative to the largest logit).

    BatchNorm statistics are set from ``x`` (the training-mode pass a first step would make), so
    activations neither vanish nor explode through depth; where the logits still barely move (a
    classifier initialised near zero), the last layer producing the logits is re-drawn at unit
    fan-in scale.
    """
    torch.optim.swa_utils.update_bn([x], model)
    model.eval()
    spread = _logit_spread(model, x)
    if spread < SPREAD:
        with torch.no_grad():
            classes = model(x[:1]).shape[-1]
        last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.shape[0] == classes]
        if last:
            w = last[-1].weight
            with torch.no_grad():
                w.normal_(0.0, 1.0 / math.sqrt(w[0].numel()))
            spread = _logit_spread(model, x)
    return spread


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers() if n.endswith("weight_packed"))


def ort_rel_diff(model: nn.Module, x: torch.Tensor, folder: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``model``'s PyTorch and ONNX Runtime outputs on ``x`` and their largest difference relative to
    the largest PyTorch logit. The ONNX model is the trial's artifact
    (:func:`automl._artifact.build_artifact`), exported on ``x[:1]``.

    Raises:
        Exception: whatever the export or ONNX Runtime raises.
    """
    from automl._artifact import build_artifact

    with torch.no_grad():
        ref = model(x)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() if folder is None else contextlib.nullcontext(str(folder)) as tmp:
        got = build_artifact(model, x[:1], Path(tmp), runtime="onnxruntime")(x)
    if tuple(got.shape) != tuple(ref.shape):
        return ref, got, math.inf
    return ref, got, _relative(got, ref, ref)


def _relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest difference of ``a`` and ``b`` relative to the largest entry of ``scale`` (the logits)."""
    return float((a.double() - b.double()).abs().max() / scale.double().abs().max().clamp_min(1e-12))


def float64_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``model``'s logits on ``x`` computed in float64 (a copy), or None where it does not run so
    (a quantised module, an operator without a float64 kernel)."""
    try:
        exact = copy.deepcopy(model).double()
        exact.train()  # drops float32 caches kept for inference (WSNet's materialised kernel; T-Net's follows its factors)
        exact.eval()
        with torch.no_grad():
            return exact(x.double())
    except Exception:  # noqa: BLE001 - no float64 reference: the plain tolerance decides
        return None


def ort_verdict(ref: torch.Tensor, got: torch.Tensor, exact: torch.Tensor | None, base_diff: float) -> tuple[str | None, float | None]:
    """Whether ONNX Runtime's logits ``got`` reproduce PyTorch's float32 ``ref``: ``(None, err)`` if
    they do, else ``(reason, err)``; ``err`` is ``ref``'s own error against ``exact`` (the float64
    logits, :func:`float64_logits`), where it was needed and known.

    Within :func:`ort_tolerance` of ``ref`` passes. Beyond it, ``got`` still passes when it lies at
    most :data:`ORT_FACTOR` times as far from ``exact`` as ``ref`` does: a model whose activations
    grew through layers of weights not yet fine-tuned (WSNet's random initialisation on GhostNetV2:
    logits of 4e11) amplifies float reordering until PyTorch's float32 result is itself 9 % off the
    float64 one, and ONNX Runtime's, with other kernels, lands elsewhere in that noise. A wrong
    operator or weight is as far from the float64 logits as from the float32 ones, and fails.
    """
    diff = _relative(got, ref, ref)
    tolerance = ort_tolerance(base_diff)
    if diff <= tolerance:
        return None, None
    reason = f"ONNX Runtime differs from PyTorch by {diff:.3g} of the largest logit > {tolerance:.3g} (max({ORT_RTOL:g}, {ORT_FACTOR:g} x the base's {base_diff:.3g}))"
    if exact is None:
        return reason, None
    own, far = _relative(ref, exact, exact), _relative(got, exact, exact)
    if far <= ORT_FACTOR * own:
        return None, own
    return f"{reason}, and by {far:.3g} from the float64 logits (PyTorch's float32: {own:.3g})", own


def ort_without(model: nn.Module, x: torch.Tensor, optimizers: tuple[str, ...] = (NCHWC,)) -> torch.Tensor:
    """ONNX Runtime's logits on ``x`` of ``model``'s artifact (:func:`ort_rel_diff`'s file) with the
    graph optimisers ``optimizers`` off, one thread.

    Raises:
        Exception: whatever the export or ONNX Runtime raises.
    """
    import onnxruntime as ort

    from automl._artifact import build_artifact

    with tempfile.TemporaryDirectory() as tmp:
        path = build_artifact(model, x[:1], Path(tmp), runtime="onnxruntime").path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(optimizers))
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.detach().cpu().contiguous().numpy()})[0])


def _without_nchwc(model: nn.Module, x: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor | None) -> str:
    """The end of a failed ONNX Runtime verdict's reason: the same file with :data:`NCHWC` off."""
    try:
        plain = ort_without(model, x)
    except Exception as exc:  # noqa: BLE001 - a diagnosis only; the verdict stands
        return f"; with ONNX Runtime's {NCHWC} off: {first_line(exc)}"
    far = "" if exact is None else f", {_relative(plain, exact, exact):.3g} from the float64 logits"
    return f"; with ONNX Runtime's {NCHWC} off: {_relative(plain, ref, ref):.3g} from PyTorch{far}"


def ort_tolerance(base_diff: float) -> float:
    """The ONNX Runtime difference a compressed model may show (relative to its largest logit):
    ``max(ORT_RTOL, ORT_FACTOR * base_diff)``, with ``base_diff`` its base's own difference at the
    same inputs (:func:`ort_rel_diff`)."""
    return max(ORT_RTOL, ORT_FACTOR * base_diff)


def check_cell(
    model_name: str,
    base: nn.Module,
    x: torch.Tensor,
    label: str,
    method_name: str,
    fixed: Mapping[str, Any] | None = None,
    *,
    folder: Path | None = None,
    base_diff: float | None = None,
) -> Cell:
    """Judge ``method_name`` (at its middle settings, ``fixed`` pinned) on ``base`` with inputs ``x``
    (a small batch whose logits depend on the input, see :func:`input_dependent`).

    A method the trial fine-tunes after (``finetune``) gets its BatchNorm statistics re-estimated
    from ``x`` first, as the base's were and as fine-tuning does. The compressed model's logits
    must then still depend on the input (spread at least
    :data:`CONSTANT` where the base's is). ONNX Runtime must reproduce the compressed model within
    :func:`ort_tolerance` of the base's own difference ``base_diff`` (:func:`ort_rel_diff` of the base on ``x``; measured here when not
    given, which exports the base once more), or, beyond that, be no farther from the model's float64
    logits than :data:`ORT_FACTOR` times PyTorch's float32 ones are (:func:`ort_verdict`); a
    failure there also gives ONNX Runtime's difference with :data:`NCHWC` off. Never
    raises for what the method does: every failure is the cell's reason.
    """
    start = time.perf_counter()
    cell = Cell(model=model_name, method=label, status="works", params_base=_n_params(base))

    def done(status: str, step: str, reason: str = "") -> Cell:
        cell.status, cell.step, cell.reason = status, step, reason
        cell.seconds = round(time.perf_counter() - start, 3)
        return cell

    method = searchspace.get_method(method_name)()
    try:
        why = method.supports(base)
    except Exception as exc:  # noqa: BLE001 - a crash in supports() is the method's fault, reported
        return done("fails", "supports", first_line(exc))
    if why is not None:
        return done("n/a", "supports", str(why))
    try:
        params = mid_params(method, fixed)
        gen = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (len(x),), generator=gen)
        ctx = searchspace.ApplyContext(
            example_input=x[:1], calibration=lambda: iter([(x, y), (x, y)]), fit=lambda module, **kw: module, base=base,
        )
        model = method.apply(base, params, context=ctx).eval()
    except Exception as exc:  # noqa: BLE001
        return done("fails", "apply", first_line(exc))
    cell.params_after = _n_params(model)
    try:
        if method.finetune:
            # What a trial's fine-tuning does first: BatchNorm statistics from its own batches (the
            # base's came from x too). The base's statistics after a lossy or fresh layer can
            # cancel the signal in eval mode (DenseNet's stem re-initialised); training mode cannot.
            torch.optim.swa_utils.update_bn([x], model)
        with torch.no_grad():
            ref = model(x)
            want = base(x)
    except Exception as exc:  # noqa: BLE001
        return done("fails", "forward", first_line(exc))
    if tuple(ref.shape) != tuple(want.shape):
        return done("fails", "shape", f"output shape {tuple(ref.shape)} differs from the base's {tuple(want.shape)}")
    if not bool(torch.isfinite(ref).all()):
        return done("fails", "forward", "non-finite logits")
    spread = float(ref.float().std(dim=0).max() / ref.float().abs().max().clamp_min(1e-12)) if len(ref) > 1 else math.inf
    if spread < CONSTANT <= _logit_spread(base, x):
        return done("fails", "forward", f"the logits no longer depend on the input (spread {spread:.2g} of the largest logit, the base's is not)")
    if base_diff is None:
        try:
            base_diff = ort_rel_diff(base, x, None if folder is None else folder / "base")[2]
        except Exception as exc:  # noqa: BLE001 - the base itself does not export: no method can be judged
            return done("fails", "base", f"the base does not export to ONNX Runtime: {first_line(exc)}")
    cell.base_rel_diff = base_diff
    try:
        _, got, cell.rel_diff = ort_rel_diff(model, x, None if folder is None else folder / "model")
    except Exception as exc:  # noqa: BLE001
        return done("fails", "onnx", first_line(exc))
    if tuple(got.shape) != tuple(ref.shape):
        return done("fails", "ort", f"ONNX Runtime output shape {tuple(got.shape)} differs from PyTorch's {tuple(ref.shape)}")
    if not math.isfinite(cell.rel_diff):
        return done("fails", "ort", "ONNX Runtime gives non-finite logits")
    # An artifact quantised by its runtime (int8) differs from the float eager model by the
    # quantisation error, which on a random-init net says nothing about the export: recorded, not judged.
    if not method.quantizes_artifact and cell.rel_diff > ort_tolerance(base_diff):
        exact = float64_logits(model, x)
        why, cell.float32_rel_err = ort_verdict(ref, got, exact, base_diff)
        if why is not None:
            return done("fails", "ort", why + _without_nchwc(model, x, ref, exact))
    return done("works", "ort")
