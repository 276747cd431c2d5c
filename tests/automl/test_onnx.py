"""ONNX through torch.export and the dynamo exporter, registry-driven: every method, on the two
built-in CNNs, exports from its eager module, and ONNX Runtime (and the saved ``torch.export``
program) reproduce PyTorch at batch 1 and on a batch whose samples leave at different exits (the two
paths an early-exit model takes)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import searchspace
from automl import _onnx
from automl._export import _jit_load
from automl._models import build_model
from automl._onnx import ATOL, LEGACY_REASON, OPSET, export_program, is_quantized, onnx_initializers, to_onnx
from tests.conftest import BASE_MODELS, make_base, random_context, sample_params

SMALL = [b for b in BASE_MODELS if b[0] in ("digits_cnn", "mnist1d_cnn")]


@pytest.mark.parametrize("model_name,shape", SMALL, ids=[m for m, _ in SMALL])
@pytest.mark.parametrize("name", searchspace.list_methods())
def test_every_method_exports_to_onnx_matching_pytorch(name, model_name, shape, tmp_path):
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
    mixed = None
    if isinstance(thresholds, torch.Tensor) and thresholds.numel() > 1:
        # Send about half of a batch out at the first exit, so the batch path routes samples apart.
        with torch.no_grad():
            conf = model.confidences(x[:16])[:, 0]
            thresholds[0] = conf.median()
        mixed = int((conf >= thresholds[0]).sum())
        assert 0 < mixed < 16, f"{name}: the batch must mix exits, {mixed} of 16 leave first"
    program = export_program(model, x[:1])
    torch.export.save(program, str(tmp_path / "model.pt2"))
    info = to_onnx(program, x[:1], tmp_path / "model.onnx", keep=onnx_initializers(model))
    assert info["exporter"] == "torch.onnx.export(dynamo=True)" and info["opset"] == OPSET, f"{name}: made by {info}"
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    reloaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    for batch in (x[:1], x[:16]):
        with torch.no_grad():
            ref = model(batch).numpy()
            pt2 = reloaded(batch).numpy()
        got = sess.run(None, {"input": batch.numpy()})[0]
        assert got.shape == ref.shape, f"{name} on {model_name}: ONNX output {got.shape} != {ref.shape}"
        diff = float(np.abs(got - ref).max())
        assert diff <= ATOL, f"{name} on {model_name} (batch {len(batch)}): ONNX differs from PyTorch by {diff}"
        assert float(np.abs(pt2 - ref).max()) <= ATOL, f"{name} on {model_name} (batch {len(batch)}): model.pt2 differs by {np.abs(pt2 - ref).max()}"
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    names = {i.name for i in graph.initializer}
    kept = onnx_initializers(model)
    assert all(any(n.split(".")[-1] == k for n in names) for k in kept), f"{kept} must stay named ONNX initializers, have {sorted(names)[:10]}"
    if mixed is not None:
        assert any(n.op_type == "If" for n in graph.node), f"{name}: early exits must be ONNX If (torch.cond), ops {sorted({n.op_type for n in graph.node})}"
    # The exporter annotates each node with the exporting machine's stack trace and source paths;
    # the shipped file carries none of it (If branches included).
    raw = (tmp_path / "model.onnx").read_bytes()
    checkout = str(Path(__file__).resolve().parents[2]).encode()
    assert checkout not in raw and b"stack_trace" not in raw, f"{name}: model.onnx carries the exporter's debug metadata (paths of this machine)"


def shifted_mix(x: torch.Tensor, weight: torch.Tensor, shift: list[int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """As Swin's attention: a function kept whole by ``torch.fx.wrap`` (with a None default) that
    builds a mask by in-place writes to slices of a new tensor."""
    mask = x.new_zeros((x.shape[2], x.shape[3]))
    count = 0
    for h in ((0, -shift[0]), (-shift[0], None)):
        for w in ((0, -shift[1]), (-shift[1], None)):
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    return F.conv2d(torch.roll(x, shifts=shift, dims=(2, 3)), weight, bias, padding=1) + mask


torch.fx.wrap("shifted_mix")


class _Shifted(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(shifted_mix(x, self.weight, [1, 1]))


class Windowed(nn.Module):
    """A user's module whose blocks call :func:`shifted_mix`, at two resolutions."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.a = _Shifted(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b = _Shifted(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(F.relu(self.stem(x)))
        x = self.b(F.relu(self.down(x)))
        return self.fc(x.mean(dim=(2, 3)))


def windowed(*, input_shape, num_classes):
    return Windowed(input_shape[0], num_classes)


@pytest.mark.parametrize(
    "name,params",
    [
        ("exits", {"points": "stages", "count": 2, "head": "avgpool", "pool": 2, "training": "frozen", "thresholds": "direct", "threshold_0": 0.6, "threshold_1": 0.6}),
        # The glance and the patch differ in size: every stage is called at two sizes.
        ("glance", {"scale": 0.5, "crop": 0.75, "thresholds": "direct", "threshold": 0.6}),
    ],
    ids=["exits", "glance"],
)
def test_branches_hold_parts_captured_alone_so_in_place_writes_and_wrapped_functions_export(name, params, tmp_path, monkeypatch):
    """Inside a ``torch.cond`` branch, a function ``torch.fx.wrap`` keeps whole breaks the export
    (as Swin's attention does); each part captured alone first exports, and ONNX Runtime gives
    the eager model's logits at batch 1 and on a batch routed both ways."""
    import onnxruntime as ort

    shape = (3, 32, 32)
    torch.manual_seed(0)
    base = build_model("tests.automl.test_onnx:windowed", input_shape=shape, num_classes=5).eval()
    method = searchspace.get_method(name)()
    assert method.supports(base) is None, method.supports(base)
    ctx = random_context(shape, base, seed=2)
    model = method.apply(base, params, context=ctx).eval()
    x = torch.cat([b for b, _ in ctx.calibration()])[:16]
    with torch.no_grad():
        conf = model.confidences(x)[:, 0]
        model.thresholds[0] = conf.median()
    assert 0 < int((conf >= model.thresholds[0]).sum()) < len(x), "the batch must be routed both ways"
    own = [id(model.get_submodule(n)) for n in model.export_parts()]
    pair = x[:1].expand(2, *shape).contiguous()
    with torch.no_grad():
        assert sorted(_onnx._captured_parts(model, pair)) == sorted(model.export_parts()), "every part captures and reproduces its calls"

    with monkeypatch.context() as patched:
        patched.setattr(_onnx, "_captured_parts", lambda model, pair: {})
        with pytest.raises(Exception):  # noqa: B017 - Dynamo's error on the patched function; its type is torch's
            to_onnx(export_program(model, x[:1]), x[:1], tmp_path / "whole.onnx", keep=onnx_initializers(model))

    to_onnx(export_program(model, x[:1]), x[:1], tmp_path / "model.onnx", keep=onnx_initializers(model))
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):
        with torch.no_grad():
            ref = model(batch).numpy()
        got = sess.run(None, {"input": batch.numpy()})[0]
        assert float(np.abs(got - ref).max()) <= ATOL * max(1.0, float(np.abs(ref).max())), f"{name} (batch {len(batch)}): ONNX differs by {np.abs(got - ref).max()}"
    assert [id(model.get_submodule(n)) for n in model.export_parts()] == own, "the model keeps its own parts after export"


def test_the_torchlib_list_is_built_once_per_process_and_the_file_is_the_same(tmp_path, monkeypatch):
    """Exports reuse onnxscript's torchlib function list: the second export reads it from the cache
    (counted), and writes the same bytes as the first, which built the list afresh."""
    from automl._onnx import _torchlib_api_modules

    modules = _torchlib_api_modules()
    assert modules, "onnxscript names no get_torchlib_ops: the exporter's translation table comes from elsewhere"
    # onnxscript's own functions, as a process that has not exported yet has them
    for module in modules:
        monkeypatch.setattr(module, "get_torchlib_ops", getattr(module.get_torchlib_ops, "__wrapped__", module.get_torchlib_ops))
    torch.manual_seed(0)
    model = make_base("digits_cnn", (1, 8, 8))
    x = torch.randn(1, 1, 8, 8)
    to_onnx(model, x, tmp_path / "first.onnx")
    to_onnx(model, x, tmp_path / "second.onnx")
    calls = {(i.misses, i.hits) for i in (m.get_torchlib_ops.cache_info() for m in modules) if i.misses or i.hits}
    assert calls == {(1, 1)}, f"the exporter must build the list once and then reuse it, got (misses, hits) {calls}"
    assert (tmp_path / "first.onnx").read_bytes() == (tmp_path / "second.onnx").read_bytes(), "the cached list changed the exported file"


def test_thresholds_edited_in_the_onnx_file_move_the_exits(tmp_path):
    """The exit thresholds are a named initializer: setting them in the file (no re-export) makes
    every sample leave at the first exit, i.e. the file's routing reads them at run time."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    method = searchspace.get_method("exits")()
    base = make_base("digits_cnn", (1, 8, 8))
    ctx = random_context((1, 8, 8), base, seed=3)
    params = {"points": "stages", "count": 1, "head": "avgpool", "pool": 1, "training": "frozen", "thresholds": "direct", "threshold_0": 1.0}
    model = method.apply(base, params, context=ctx).eval()
    x = torch.cat([b for b, _ in ctx.calibration()])[:8]
    to_onnx(model, x[:1], tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    (init,) = [i for i in m.graph.initializer if i.name.split(".")[-1] == "thresholds"]
    values = numpy_helper.to_array(init).copy()
    values[0] = 0.0  # every softmax maximum is >= 0: everyone leaves at exit 0
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(m, str(tmp_path / "edited.onnx"))
    got = ort.InferenceSession(str(tmp_path / "edited.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x[:1].numpy()})[0]
    with torch.no_grad():
        first = model.exits[0].head(model.exits[0].segment(x[:1])).numpy()
        full = model(x[:1]).numpy()
    assert np.abs(got - first).max() <= ATOL, "with threshold 0 the edited file must return the first exit's logits"
    assert np.abs(full - first).max() > 1e-3, "the case must distinguish the exits (threshold 1.0: the final exit)"


def test_convolutions_after_an_exit_get_the_kernels_the_static_base_gets(tmp_path):
    """ONNX Runtime gives a convolution its blocked layout and fusions only when the weights are
    initializers of the convolution's own graph: the weights the stages after an exit read are
    initializers of the If branch holding them, so ONNX Runtime's optimised exits model runs
    exactly the convolution kernels of the optimised base; the thresholds stay in the main graph."""
    import collections

    import onnx
    import onnxruntime as ort

    base = make_base("digits_cnn", (1, 8, 8))
    ctx = random_context((1, 8, 8), base, seed=3)
    params = {"points": "stages", "count": 1, "head": "avgpool", "pool": 1, "training": "frozen", "thresholds": "direct", "threshold_0": 1.0}
    model = searchspace.get_method("exits")().apply(base, params, context=ctx).eval()
    x = torch.cat([b for b, _ in ctx.calibration()])[:1]

    def graphs(g):
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(a.g)

    convs = {}
    for label, m in (("base", base), ("exits", model)):
        to_onnx(m, x, tmp_path / f"{label}.onnx")
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{label}.opt.onnx")
        ort.InferenceSession(str(tmp_path / f"{label}.onnx"), opts, providers=["CPUExecutionProvider"])
        optimised = onnx.load(str(tmp_path / f"{label}.opt.onnx")).graph
        convs[label] = collections.Counter(f"{n.domain}:{n.op_type}" for g in graphs(optimised) for n in g.node if "Conv" in n.op_type)
    assert convs["exits"] == convs["base"], f"the exits model's convolutions must run the base's kernels: {dict(convs['exits'])} vs {dict(convs['base'])}"

    main = onnx.load(str(tmp_path / "exits.onnx")).graph
    branch_inits = {i.name for g in list(graphs(main))[1:] for i in g.initializer}
    main_inits = {i.name for i in main.initializer}
    read_in_main = {i for n in main.node for i in n.input}
    branches = [a.g for n in main.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    read_by = {name: sum(any(name in n.input for g in graphs(b) for n in g.node) for b in branches) for name in main_inits - read_in_main}
    later_weights = {f"exits.1.segment.{name}.weight" for name, m in model.exits[1].segment.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert later_weights and later_weights <= branch_inits, f"the later stages' weights must live in the If branch: {sorted(later_weights - branch_inits)}"
    assert all(n != 1 for n in read_by.values()), f"main-graph initializers that one branch alone reads: {sorted(k for k, n in read_by.items() if n == 1)}"
    assert any(n.rsplit(".", 1)[-1] == "thresholds" for n in main_inits), "the thresholds stay a main-graph initializer"


def test_dynamic_int8_linear_is_integer_arithmetic_and_exact(tmp_path):
    """The legacy exporter (a TorchScript torch.ao int8 model, the one case kept on it): dynamic int8
    Linear becomes QuantizeLinear + MatMulInteger with PyTorch's own arithmetic (reduce_range
    activation scale), so ONNX Runtime reproduces fbgemm to float rounding."""
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(32, 40) * 3
    torch.jit.script(q).save(str(tmp_path / "q.ts"))
    ts = _jit_load(tmp_path / "q.ts")
    assert is_quantized(ts)
    info = to_onnx(ts, x[:1], tmp_path / "q.onnx")
    assert info["exporter"].startswith("torchscript (legacy") and info["reason"] == LEGACY_REASON, f"a ScriptModule must say why it is legacy: {info}"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 2 and "QuantizeLinear" in ops, f"expected integer matmuls, got {ops}"
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = ts(x).numpy()
        fp = model(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4, f"dynamic int8 ONNX differs from PyTorch's int8 by {np.abs(got - ref).max()}"
    assert np.abs(got - fp).max() > 1e-4, "the ONNX model must compute in int8, not reproduce the float model"
