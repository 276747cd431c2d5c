"""Post-training int8 quantisation by the runtime that runs the model (declared at artifact time).

The method does not quantise a PyTorch module for every runtime. ``apply`` returns the float model
(layers with computed weights frozen into plain ones) carrying an :class:`Int8Recipe` (the mode and,
for ``static``, the calibration inputs drawn from training batches, ``context.calibration``), and
declares ``quantizes_artifact``; the artifact builder (``automl._artifact``) quantises what it ships
with the tools of the configured ``latency.runtime``:

- ``onnxruntime``: ONNX Runtime's own quantiser on the exported float ONNX file.
  ``static``: ``onnxruntime.quantization.quantize_static``, QDQ format, per-channel int8 weights,
  uint8 activations (U8S8, what ONNX Runtime recommends on x86; 7-bit weights on an x86 CPU without
  VNNI, where those kernels saturate: :func:`u8s8_saturates`), MinMax ranges calibrated on the
  recipe's training inputs through a ``CalibrationDataReader``. ``dynamic``: ``quantize_dynamic``
  (int8 weights; activations quantised on the fly; ONNX Runtime has integer kernels for
  convolutions too, ``ConvInteger``, and matrix products, ``MatMulInteger``). The measured model is
  the shipped ``model.onnx``, so there is no cross-runtime rounding to explain.
- ``torchscript`` / ``eager``: PyTorch's x86 quantised kernels via ``torch.ao.quantization``
  (:meth:`Int8Recipe.quantize_torch`): ``dynamic`` (``quantize_dynamic``: ``Linear`` only, PyTorch
  has no dynamic convolution kernel, the notes list the float convolutions) and ``static`` (FX graph
  mode, ``prepare_fx`` / ``convert_fx``, x86 default qconfig). torchao's PT2E flow
  (``prepare_pt2e`` / ``convert_pt2e`` with ``X86InductorQuantizer``, torchao 0.18) was tried on
  torch 2.14.1 and falls short for these runtimes: the converted program runs
  dequantise -> float op -> quantise reference ops unless it is compiled by inductor, so on
  ``digits_cnn`` it was 2.8x slower than the float model (0.81 vs 0.29 ms per batch-1 call, eager)
  and its state dict no smaller (306,416 vs 245,640 bytes); int8 kernels come only from
  ``torch.compile``, which is not an artifact a trial times or export ships.

Where the whole model cannot be FX-traced (a forward that branches on ``x.dim()``, say), each child
is quantised on its own, recursively; a part that cannot be traced at all stays float and the notes
name it. Layers whose weight is computed from shared factors (e.g. T-Net) are first frozen into
plain layers with their current weight: int8 is post-training, nothing trains the factors any more.

Mixed precision (``keep_float: K``): the K layers the base's sensitivity profile finds most
sensitive to int8 stay float, as HAQ (Wang et al., CVPR 2019) and AIMET keep the layers that lose
most: ONNX Runtime's quantiser is given their nodes in ``nodes_to_exclude`` (found by their weight
initializer, ``<layer>.weight``), PyTorch's their module names with qconfig None. The profile
measures each conv and linear layer alone with simulated int8 (per-channel symmetric int8 weights,
per-tensor uint8 input with MinMax ranges on training batches: what the static recipes do), without
fine-tuning, on the validation split; a layer the profile does not know (one an earlier stage put
in) is never kept float.

Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018.

Changes from the paper, and why (one place): Jacob et al. train with simulated quantisation
(quantisation-aware training) and run integer-only arithmetic; here quantisation is post-training
(calibration only, no fine-tuning: the trial does not fine-tune int8 models, ``finetune = False``)
and runs on the deploying runtime's int8 kernels, because post-training int8 is what a user applies
to a finished model within a trial's budget. ``dynamic`` mode is not in the paper at all
(weight-only + on-the-fly activation quantisation) and is offered as the cheap alternative.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical, Int
from searchspace._registry import register_method
from searchspace._surgery import clone

__all__ = ["Int8", "Int8Recipe", "freeze_computed_weights"]

ENGINE = "x86"


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's U8S8 integer kernels can saturate on this CPU: an x86 CPU without a
    VNNI instruction (AVX-512 VNNI, AVX-VNNI or AMX) multiplies with ``VPMADDUBSW``, whose pairwise
    sums of uint8 x int8 products are clamped to int16. ONNX Runtime's quantisation guide then asks
    for 7-bit weights (``reduce_range``), which keeps every pair sum in range. On such a CPU (AMD
    EPYC with AVX2 only) static int8 of the trained ``digits_cnn`` lost 2.2 points with 8-bit
    weights (tests/searchspace/test_int8.py holds it to 1)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # no way to tell here (not Linux): keep ONNX Runtime's default
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags.split())


_PLAIN = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: The most layers ``keep_float`` may leave float.
MAX_KEEP_FLOAT = 8


def freeze_computed_weights(model: nn.Module) -> list[str]:
    """Replace every conv/linear whose ``weight`` is not a stored Parameter by the plain layer.

    Returns the names of the replaced layers.
    """
    frozen = []
    for name, m in list(model.named_modules()):
        plain = next((c for c in _PLAIN if isinstance(m, c)), None)
        if plain is None or isinstance(m._parameters.get("weight"), nn.Parameter):
            continue
        with torch.no_grad():
            weight = m.weight.detach().clone()
        if plain is nn.Linear:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        else:
            new = plain(
                m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
            )
        with torch.no_grad():
            new.weight.copy_(weight)
            if m.bias is not None:
                new.bias.copy_(m.bias.detach())
        model.set_submodule(name, new.to(weight.device))
        frozen.append(name)
    return frozen


def _first_inputs(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, tuple[Any, ...]]:
    """The positional inputs every submodule receives on ``example``."""
    seen: dict[nn.Module, tuple[Any, ...]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.setdefault(module, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _relative(layer: str, scope: str) -> str | None:
    """``layer``'s name inside the submodule named ``scope`` (None where it lies outside it)."""
    if not scope:
        return layer
    return layer[len(scope) + 1 :] if layer.startswith(scope + ".") else None


def _prepare(module: nn.Module, name: str, inputs: dict[nn.Module, tuple[Any, ...]], notes: dict[str, Any], keep: tuple[str, ...] = ()) -> nn.Module:
    """FX-prepare ``module`` whole, else each child; returns the (possibly replaced) module.
    The layers named in ``keep`` (full names) get qconfig None: they stay float."""
    mapping = get_default_qconfig_mapping(ENGINE)
    for layer in keep:
        rel = _relative(layer, name)
        if rel:
            mapping.set_module_name(rel, None)
    if module in inputs and next(module.parameters(), None) is not None:
        try:
            prepared = prepare_fx(copy.deepcopy(module), mapping, example_inputs=inputs[module])
            notes["prepared"].append(name or "<model>")
            return prepared
        except Exception as exc:  # noqa: BLE001 - any trace failure: try the parts instead
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    else:
        reason = "not called on the example input" if module not in inputs else "no parameters"
    children = list(module.named_children())
    if not children:
        if next(module.parameters(), None) is not None:
            notes["float"][name] = "kept float (keep_float)" if name in keep else reason
        return module
    for child_name, child in children:
        full = f"{name}.{child_name}" if name else child_name
        new = _prepare(child, full, inputs, notes, keep)
        if new is not child:
            setattr(module, child_name, new)
    return module


@dataclass
class Int8Recipe:
    """How to quantise one float model, for whichever runtime runs it (``ArtifactQuantization``).

    Attributes:
        mode: ``static`` (weights and activations) or ``dynamic`` (weights; activations on the fly).
        calibration: training inputs the static activation ranges are calibrated on.
    """

    mode: str
    calibration: list[torch.Tensor] = field(default_factory=list, repr=False)
    #: Layers (module names) left float.
    keep_float: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """The mode, the number of calibration samples and the layers kept float, recorded with the artifact."""
        out: dict[str, Any] = {"mode": self.mode, "calibration_samples": sum(len(x) for x in self.calibration)}
        if self.keep_float:
            out["keep_float"] = list(self.keep_float)
        return out

    def _excluded_nodes(self, graph: Any) -> list[str]:
        """The ONNX nodes of ``graph`` computing the layers kept float: those reading ``<layer>.weight``."""
        weights = {f"{layer}.weight" for layer in self.keep_float}
        return [n.name for n in graph.node if any(i in weights for i in n.input)]

    # --- ONNX Runtime ------------------------------------------------------------------------

    def quantize_onnx(self, float_onnx: Path, out: Path) -> dict[str, Any]:
        """ONNX Runtime's quantisation of ``float_onnx`` written to ``out`` (see the module docstring).

        A float model too large for one ONNX file (over 2 GiB; torch's exporter keeps its weights in
        external data) is quantised with ``use_external_data_format``, the rule ONNX Runtime's own
        ``get_qdq_config`` applies: without it the static calibrator cannot save its augmented copy
        of the model, and ``out`` keeps its weights in ``<out>.data`` beside it as well.
        """
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        graph = onnx.load(str(float_onnx), load_external_data=False)
        excluded = self._excluded_nodes(graph.graph)
        large = any(uses_external_data(t) for t in _get_all_tensors(graph))
        del graph
        kept = {"nodes_excluded": excluded} if self.keep_float else {}
        external = {"external_data": True} if large else {}
        if self.mode == "dynamic":
            quantize_dynamic(str(float_onnx), str(out), weight_type=QuantType.QInt8, nodes_to_exclude=excluded, use_external_data_format=large)
            return {"quantizer": "onnxruntime.quantization.quantize_dynamic", "weights": "int8", **kept, **external}
        if not self.calibration:
            raise ValueError("int8 static needs calibration inputs, but the recipe holds none (no training batches)")
        batches = self.calibration

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it: Iterator[torch.Tensor] = iter(batches)

            def get_next(self) -> dict[str, Any] | None:
                x = next(self._it, None)
                return None if x is None else {"input": x.detach().cpu().contiguous().numpy()}

            def rewind(self) -> None:
                self._it = iter(batches)

        reduce_range = u8s8_saturates()
        quantize_static(
            str(float_onnx), str(out), Reader(),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded, use_external_data_format=large,
        )
        weights = "int8 per channel" + (" (7-bit range: this CPU has no VNNI)" if reduce_range else "")
        return {"quantizer": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": weights, "reduce_range": reduce_range, "activations": "uint8 (MinMax calibration)", **self.describe(), **kept, **external}

    # --- PyTorch -----------------------------------------------------------------------------

    def quantize_torch(self, model: nn.Module, notes: dict[str, Any] | None = None) -> nn.Module:
        """PyTorch x86 int8 (``torch.ao.quantization``) of a copy of ``model``; see the module docstring."""
        notes = {} if notes is None else notes
        torch.backends.quantized.engine = ENGINE
        out = copy.deepcopy(model).cpu().eval()
        out.__dict__.pop("artifact_quantization", None)
        if self.mode == "dynamic":
            linears = {n for n, m in out.named_modules() if isinstance(m, nn.Linear) and n not in self.keep_float}
            out = quantize_dynamic(out, linears, dtype=torch.qint8)
            notes["int8.float"] = {n: "x86 dynamic int8 has no convolution kernel" for n, m in out.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
            notes["int8.float"].update({n: "kept float (keep_float)" for n in self.keep_float if n not in notes["int8.float"]})
            return out
        found: dict[str, Any] = {"prepared": [], "float": {}}
        example = self.calibration[0][:1].cpu()
        out = _prepare(out, "", _first_inputs(out, example), found, tuple(self.keep_float))
        with torch.no_grad():
            for x in self.calibration:
                out(x.cpu())
        out = _convert(out)
        notes["int8.quantised"] = found["prepared"]
        notes["int8.float"] = found["float"]
        return out


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, torch.fx.GraphModule):
        return convert_fx(module)
    for child_name, child in list(module.named_children()):
        new = _convert(child)
        if new is not child:
            setattr(module, child_name, new)
    return module


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 rounding of a weight (what the static recipes store)."""
    scale = w.detach().abs().flatten(1).amax(1).clamp(min=1e-12) / 127.0
    shape = (-1, *([1] * (w.dim() - 1)))
    return torch.round(w / scale.view(shape)).clamp(-128, 127) * scale.view(shape)


class _SimulatedInt8(nn.Module):
    """One layer with int8-rounded weights and a uint8-rounded input (per-tensor MinMax range)."""

    def __init__(self, layer: nn.Module, low: float, high: float) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)
        with torch.no_grad():
            self.layer.weight.copy_(_fake_quant_weight(self.layer.weight))
        low, high = min(low, 0.0), max(high, 0.0)
        self.scale = max(high - low, 1e-12) / 255.0
        self.zero = int(round(-low / self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, 0, 255))


@register_method
class Int8(CompressionMethod):
    """int8 weights (dynamic) or weights and activations (static), by the runtime's quantiser.

    Post-training: the trial does not fine-tune after it. MACs are those of the float graph
    (counted by the trial before this stage); size, accuracy and latency are measured on the
    quantised artifact (see the module docstring).
    """

    name = "int8"
    stage = Stage.QUANTIZE
    finetune = False
    quantizes_artifact = True
    reference = "Jacob et al., CVPR 2018, arXiv:1712.05877 (integer-arithmetic-only inference); ONNX Runtime quantization; PyTorch torch.ao.quantization"
    hyperparameters = {"mode": Categorical(["dynamic", "static"]), "keep_float": Int(0, MAX_KEEP_FLOAT)}
    default_ranges = {"keep_float": Int(0, 0)}
    #: Calibration batches for static mode (training data only).
    calibration_batches = 8

    def space(self, trial: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.suggest(trial, "mode")}
        keep = self.suggest(trial, "keep_float")
        if keep:
            # A plan that keeps nothing float does not name the setting: it equals the same plan of
            # a study whose config does not search it.
            out["keep_float"] = keep
        return out

    # --- the sensitivity profile (searchspace.Profiled) -------------------------------------

    def needs_profile(self) -> bool:
        return getattr(self.ranges["keep_float"], "high", 0) > 0

    def profile_levels(self) -> tuple[float, ...]:
        return (1.0,)

    def profile_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, _PLAIN) and isinstance(m._parameters.get("weight"), nn.Parameter)]

    def compress_layer(self, model: nn.Module, layer: str, level: float, *, context: ApplyContext) -> nn.Module | None:
        out = clone(model).eval()
        target = out.get_submodule(layer)
        seen: list[torch.Tensor] = []
        handle = target.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().aminmax()))
        try:
            with torch.no_grad():
                for x, _ in context.batches(self.calibration_batches):
                    out(x)
        finally:
            handle.remove()
        if not seen:
            return None
        low = min(float(lo) for lo, _ in seen)
        high = max(float(hi) for _, hi in seen)
        out.set_submodule(layer, _SimulatedInt8(target, low, high))
        return out

    def profile_extra(self, model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
        return {}

    def kept_float(self, model: nn.Module, k: int, profile: Any) -> list[str]:
        """The ``k`` layers of ``model`` whose int8 rounding cost the most validation accuracy in
        ``profile`` (ties: the earlier layer), in the profile's order."""
        present = set(self.profile_layers(model, torch.empty(0)))
        rows = {n: e for n, e in profile.rows(self.name).items() if n in present and e}
        order = list(rows)
        ranked = sorted(order, key=lambda n: (rows[n][0].accuracy, order.index(n)))
        chosen = set(ranked[:k])
        return [n for n in order if n in chosen]

    def supports(self, model: nn.Module) -> str | None:
        if ENGINE not in torch.backends.quantized.supported_engines:
            return f"quantisation engine {ENGINE!r} is not available, only {torch.backends.quantized.supported_engines}"
        return None

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        mode = params["mode"]
        if mode not in ("dynamic", "static"):
            raise ValueError(f"int8.mode must be 'dynamic' or 'static', got {mode!r}")
        out = clone(model).cpu().eval()
        frozen = freeze_computed_weights(out)
        if frozen:
            context.notes["int8.frozen"] = frozen
        calibration = [x.detach().cpu().clone() for x, _ in context.batches(self.calibration_batches)] if mode == "static" else []
        if mode == "static" and not calibration:
            calibration = [context.example_input.detach().cpu().clone()]
            context.notes["int8.calibration"] = "no training batches: calibrated on the example input only"
        keep: list[str] = []
        k = int(params.get("keep_float", 0))
        if k:
            if context.profile is None or self.name not in context.profile.layers:
                raise ValueError(f"int8.keep_float={k} needs the base's sensitivity profile, but the context has none for {self.name!r}")
            keep = self.kept_float(out, k, context.profile)
            context.notes["int8.kept_float"] = keep
        out.artifact_quantization = Int8Recipe(mode=mode, calibration=calibration, keep_float=tuple(keep))
        context.notes["int8.recipe"] = out.artifact_quantization.describe()
        return out
