"""ONNX from a trial's saved TorchScript model, for every method family.

Export reads only the checkpoint (the eager module is gone by then), so ONNX is made from the
TorchScript model with PyTorch's TorchScript-based exporter (``dynamo=False``; the ``torch.export``
exporter cannot take a ``ScriptModule``). Two things make that work across the families:

- **Freezing** (``torch.jit.freeze``) first. A saved-and-reloaded ScriptModule carries no tensor
  dtypes, and the exporter needs them for some ops (the ``BatchNorm`` after a WSNet layer whose
  weight is computed by indexing, a reduction after ``diagonal``). Freezing inlines the weights
  and submodules as constants so the exporter's shape inference can type every value. Scripted
  control flow survives as ONNX ``If``/``Loop``: an early-exit model keeps its per-sample routing,
  and its ``threshold(s)`` buffer stays a named initializer, so thresholds can be changed in the
  ONNX file as in the TorchScript one.
- **Dynamic int8 Linear**: PyTorch has no ONNX export for ``quantized::linear_dynamic``. It is
  written here as ONNX's integer ops with the same arithmetic: the activation's per-tensor scale
  and zero point from its min/max over the batch (including 0, over ``[0, 127]`` because PyTorch's
  x86 kernel uses ``reduce_range``), ``QuantizeLinear`` to uint8, ``MatMulInteger`` with the int8
  weight, then ``x_scale * w_scale`` and the float bias. Static int8 (``quantized::conv*``,
  ``quantized::linear``) uses PyTorch's own symbolics (QuantizeLinear/DequantizeLinear around
  float ops, which ONNX Runtime may fuse into QLinear kernels). Quantised models are exported
  unfrozen: freezing cannot hold their packed-weight objects.

Static int8 models do not match PyTorch to 1e-4: PyTorch's symbolics (int32-quantised bias,
QuantizeLinear/DequantizeLinear around float ops) and fbgemm's requantisation round differently, by
up to about one quantisation step of a layer's output, whether or not ONNX Runtime fuses them
(``benchmarks/int8_onnx_rounding.py``). Dynamic int8 matches to float rounding. :func:`compare` says
how the check treats int8.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["OPSET", "compare", "is_quantized", "to_onnx"]

OPSET = 17
#: Float models: largest absolute difference of ONNX Runtime's outputs from PyTorch's accepted.
ATOL = 1e-4

#: Buffers kept as named ONNX initializers instead of being folded into the graph by freezing.
THRESHOLD_BUFFERS = ("threshold", "thresholds")
#: int8 models: fraction of test samples on which ONNX Runtime must predict what PyTorch predicts.
INT8_AGREEMENT = 0.99

_DYNAMIC_LINEAR: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}


def is_quantized(model: torch.jit.ScriptModule) -> bool:
    """Whether the model runs torch.ao quantised kernels (``quantized::`` ops, packed int8 weights)."""
    return "quantized::" in str(model.inlined_graph)


def _packed_linears(model: torch.jit.ScriptModule) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Graph parameter name -> (int8 weight (out, in), per-output scale, float bias) of every dynamic
    int8 Linear; the name is the attribute path the exporter gives the packed weights."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    for name, m in model.named_modules():
        packed = getattr(getattr(m, "_packed_params", None), "_packed_params", None)
        if not isinstance(packed, torch.ScriptObject) or "Linear" not in str(packed._type()):
            continue
        weight, bias = torch.ops.quantized.linear_unpack(packed)
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale = weight.q_per_channel_scales().float()
            if bool((weight.q_per_channel_zero_points() != 0).any()):
                continue  # asymmetric int8 weights: left to the exporter, which then says it cannot
        else:
            if weight.q_zero_point() != 0:
                continue
            scale = torch.full((weight.shape[0],), weight.q_scale(), dtype=torch.float32)
        out[f"{name}._packed_params._packed_params" if name else "_packed_params._packed_params"] = (
            weight.int_repr(), scale, None if bias is None else bias.detach().float(),
        )
    return out


def _linear_dynamic_symbolic(g: Any, x: Any, packed: Any, reduce_range: Any) -> Any:
    key = packed.debugName()
    if key not in _DYNAMIC_LINEAR:
        raise RuntimeError(f"dynamic int8 Linear {key!r} has weights this exporter cannot read (asymmetric int8 weights)")
    weight, w_scale, bias = _DYNAMIC_LINEAR[key]
    from torch.onnx import symbolic_helper

    rr = symbolic_helper._maybe_get_const(reduce_range, "b")
    qmax = 127.0 if (rr is None or bool(rr)) else 255.0  # PyTorch's module passes reduce_range=True

    def const(t: torch.Tensor) -> Any:
        return g.op("Constant", value_t=t)

    zero = const(torch.tensor(0.0))
    lo = g.op("Min", g.op("ReduceMin", x, keepdims_i=0), zero)
    hi = g.op("Max", g.op("ReduceMax", x, keepdims_i=0), zero)
    scale = g.op("Div", g.op("Sub", hi, lo), const(torch.tensor(qmax)))
    # All-zero input: any positive scale gives the exact result (PyTorch uses 0.1).
    scale = g.op("Where", g.op("Greater", scale, zero), scale, const(torch.tensor(0.1)))
    zp = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", lo), scale)), zero, const(torch.tensor(qmax)))
    zp = g.op("Cast", zp, to_i=2)  # uint8
    xq = g.op("QuantizeLinear", x, scale, zp)
    acc = g.op("MatMulInteger", xq, const(weight.t().contiguous()), zp, const(torch.tensor(0, dtype=torch.int8)))
    y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", scale, const(w_scale)))
    if bias is not None:
        y = g.op("Add", y, const(bias))
    return y


def to_onnx(model: torch.jit.ScriptModule, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` as ONNX (opset :data:`OPSET`, dynamic batch axis, input ``input``, output ``logits``).

    Raises whatever the exporter raises for a graph it cannot export; the caller records it.
    """
    quantized = is_quantized(model)
    # Early-exit thresholds stay ONNX initializers (tunable after export) rather than constants.
    keep = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in THRESHOLD_BUFFERS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # freeze is "deprecated" with the rest of TorchScript
        # optimize_numerics=False: no conv-BN folding or other rewrites that change the numbers.
        target: Any = model if quantized else torch.jit.freeze(model.eval(), preserved_attrs=keep, optimize_numerics=False)
    _DYNAMIC_LINEAR.clear()
    _DYNAMIC_LINEAR.update(_packed_linears(model))
    registered = bool(_DYNAMIC_LINEAR)
    if registered:
        torch.onnx.register_custom_op_symbolic("quantized::linear_dynamic", _linear_dynamic_symbolic, OPSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                target,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=OPSET,
            )
    finally:
        if registered:
            torch.onnx.unregister_custom_op_symbolic("quantized::linear_dynamic", OPSET)
        _DYNAMIC_LINEAR.clear()


def compare(max_abs_diff: float, agree: int, total: int, correct_onnx: int, correct_torch: int, *, quantized: bool) -> str | None:
    """None if the ONNX model may ship in place of the TorchScript one, else why not.

    Float models: every output within :data:`ATOL` of PyTorch's. int8 models: ONNX Runtime's integer
    kernels round differently from fbgemm (see the module docstring), so logits differ by about a
    quantisation step; they ship when they reach the same test accuracy as PyTorch and make the same
    prediction on at least :data:`INT8_AGREEMENT` of the test samples; the card records both and the
    largest logit difference.
    """
    if not quantized:
        if max_abs_diff <= ATOL:
            return None
        return f"ONNX Runtime outputs differ from PyTorch by {max_abs_diff:.3g} > {ATOL:g}"
    if correct_onnx == correct_torch and agree >= INT8_AGREEMENT * total:
        return None
    return (
        f"int8: ONNX Runtime predicts differently from PyTorch on {total - agree} of {total} test samples "
        f"(accuracy {correct_onnx / max(total, 1):.4f} vs {correct_torch / max(total, 1):.4f}; max logit difference {max_abs_diff:.3g})"
    )
