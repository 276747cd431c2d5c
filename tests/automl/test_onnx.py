"""ONNX from saved TorchScript, registry-driven: every method, on the two built-in CNNs, exports and
ONNX Runtime reproduces PyTorch at batch 1 and on a batch (the two paths an early-exit model takes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import searchspace
from automl._export import _jit_load
from automl._onnx import ATOL, THRESHOLD_BUFFERS, is_quantized, to_onnx
from automl._artifact import to_torchscript
from tests.conftest import BASE_MODELS, make_base, random_context, sample_params

SMALL = [b for b in BASE_MODELS if b[0] in ("digits_cnn", "mnist1d_cnn")]


@pytest.mark.parametrize("model_name,shape", SMALL, ids=[m for m, _ in SMALL])
@pytest.mark.parametrize("name", searchspace.list_methods())
def test_every_method_exports_to_onnx_matching_torchscript(name, model_name, shape, tmp_path):
    import onnx
    import onnxruntime as ort

    method = searchspace.get_method(name)()
    base = make_base(model_name, shape)
    if method.supports(base) is not None:
        pytest.skip(f"{name} does not apply to {model_name}")
    ctx = random_context(shape, base, seed=5)
    model = method.apply(base, sample_params(method, seed=5)[0], context=ctx).eval()
    x = torch.cat([batch for batch, _ in ctx.calibration()])
    thresholds = getattr(model, "thresholds", None)
    if isinstance(thresholds, torch.Tensor) and thresholds.numel() > 1:
        # Send about half of a batch out at the first exit, so the batch path routes samples apart.
        with torch.no_grad():
            thresholds[0] = model.confidences(x)[:, 0].median()
    to_torchscript(model, x[:1]).save(str(tmp_path / "model.ts"))
    ts = _jit_load(tmp_path / "model.ts")
    to_onnx(ts, x[:1], tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    quantized = is_quantized(ts)
    for batch in (x[:1], x[:16]):
        with torch.no_grad():
            ref = ts(batch).numpy()
        got = sess.run(None, {"input": batch.numpy()})[0]
        assert got.shape == ref.shape, f"{name} on {model_name}: ONNX output {got.shape} != {ref.shape}"
        diff = float(np.abs(got - ref).max())
        if quantized:
            # Integer kernels round differently (automl._onnx): about one output quantisation step.
            assert diff < 0.05 * float(np.abs(ref).max()) + 1e-3, f"{name} on {model_name}: int8 ONNX differs by {diff}"
        else:
            assert diff <= ATOL, f"{name} on {model_name} (batch {len(batch)}): ONNX differs from TorchScript by {diff}"
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    kept = [b for b, _ in ts.named_buffers() if b.rsplit(".", 1)[-1] in THRESHOLD_BUFFERS]
    names = {i.name for i in graph.initializer}
    assert all(any(n.endswith(b.rsplit(".", 1)[-1]) for n in names) for b in kept), f"thresholds {kept} must stay ONNX initializers, have {sorted(names)[:10]}"


def test_dynamic_int8_linear_is_integer_arithmetic_and_exact(tmp_path):
    """Dynamic int8 Linear becomes QuantizeLinear + MatMulInteger with PyTorch's own arithmetic
    (reduce_range activation scale), so ONNX Runtime reproduces fbgemm to float rounding."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(32, 40) * 3
    torch.jit.script(q).save(str(tmp_path / "q.ts"))
    ts = _jit_load(tmp_path / "q.ts")
    assert is_quantized(ts)
    to_onnx(ts, x[:1], tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 2 and "QuantizeLinear" in ops, f"expected integer matmuls, got {ops}"
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = ts(x).numpy()
        fp = model(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4, f"dynamic int8 ONNX differs from PyTorch's int8 by {np.abs(got - ref).max()}"
    assert np.abs(got - fp).max() > 1e-4, "the ONNX model must compute in int8, not reproduce the float model"
