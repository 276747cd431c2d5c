"""Post-training int8 quantisation with PyTorch's own quantisation stack (x86 engine).

- ``dynamic``: weights stored as int8, activations quantised on the fly per batch
  (``torch.ao.quantization.quantize_dynamic``). PyTorch's x86 dynamic kernels exist for ``Linear``
  (and recurrent layers) only, so convolutions stay float in this mode; the notes list them.
- ``static``: weights and activations int8 with scales calibrated on training batches
  (``context.calibration``), via FX graph mode (``prepare_fx`` fuses conv-BN-ReLU, inserts the
  observers, ``convert_fx`` swaps in the quantised kernels), with the x86 default qconfig (per-channel
  weights, histogram-calibrated activations). Jacob et al., "Quantization and Training of Neural
  Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018.

Where the whole model cannot be FX-traced (a forward that branches on ``x.dim()``, say), each child
is quantised on its own, recursively; a part that cannot be traced at all stays float and the notes
name it. Layers whose weight is computed from shared factors (e.g. T-Net) are first frozen into
plain layers with their current weight: int8 is post-training, nothing trains the factors any more.

Changes from the paper, and why (one place): Jacob et al. train with simulated quantisation
(quantisation-aware training) and run integer-only arithmetic; here quantisation is post-training
(calibration only, no fine-tuning: the trial does not fine-tune int8 models, ``finetune = False``)
and runs on PyTorch's x86 kernels, because post-training int8 is what a user applies to a finished
model within a trial's budget. ``dynamic`` mode is not in the paper at all (PyTorch's
weight-only + on-the-fly activation scheme) and is offered as the cheap alternative.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical
from searchspace._registry import register_method
from searchspace._surgery import clone

__all__ = ["Int8", "freeze_computed_weights"]

ENGINE = "x86"
_PLAIN = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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


def _prepare(module: nn.Module, name: str, inputs: dict[nn.Module, tuple[Any, ...]], notes: dict[str, Any]) -> nn.Module:
    """FX-prepare ``module`` whole, else each child; returns the (possibly replaced) module."""
    mapping = get_default_qconfig_mapping(ENGINE)
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
            notes["float"][name] = reason
        return module
    for child_name, child in children:
        full = f"{name}.{child_name}" if name else child_name
        new = _prepare(child, full, inputs, notes)
        if new is not child:
            setattr(module, child_name, new)
    return module


@register_method
class Int8(CompressionMethod):
    """int8 weights (dynamic) or weights and activations (static), PyTorch x86 quantisation.

    Post-training: the trial does not fine-tune after it. MACs are those of the float graph
    (counted by the trial before this stage); size and latency are measured on the int8 model.
    """

    name = "int8"
    stage = Stage.QUANTIZE
    finetune = False
    reference = "Jacob et al., CVPR 2018, arXiv:1712.05877 (integer-arithmetic-only inference); PyTorch torch.ao.quantization"
    hyperparameters = {"mode": Categorical(["dynamic", "static"])}
    #: Calibration batches for static mode (training data only).
    calibration_batches = 8

    def supports(self, model: nn.Module) -> str | None:
        if ENGINE not in torch.backends.quantized.supported_engines:
            return f"quantisation engine {ENGINE!r} is not available, only {torch.backends.quantized.supported_engines}"
        return None

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        mode = params["mode"]
        if mode not in ("dynamic", "static"):
            raise ValueError(f"int8.mode must be 'dynamic' or 'static', got {mode!r}")
        torch.backends.quantized.engine = ENGINE
        out = clone(model).cpu().eval()
        frozen = freeze_computed_weights(out)
        if frozen:
            context.notes["int8.frozen"] = frozen
        if mode == "dynamic":
            out = quantize_dynamic(out, {nn.Linear}, dtype=torch.qint8)
            context.notes["int8.float"] = {n: "x86 dynamic int8 has no convolution kernel" for n, m in out.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
            return out
        notes: dict[str, Any] = {"prepared": [], "float": {}}
        example = context.example_input.cpu()
        out = _prepare(out, "", _first_inputs(out, example), notes)
        with torch.no_grad():
            for x, _ in context.batches(self.calibration_batches):
                out(x.cpu())
        out = self._convert(out)
        context.notes["int8.quantised"] = notes["prepared"]
        context.notes["int8.float"] = notes["float"]
        return out

    @staticmethod
    def _convert(module: nn.Module) -> nn.Module:
        if isinstance(module, torch.fx.GraphModule):
            return convert_fx(module)
        for child_name, child in list(module.named_children()):
            new = Int8._convert(child)
            if new is not child:
                setattr(module, child_name, new)
        return module
