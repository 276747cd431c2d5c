"""The numbers a study records, against references computed another way.

- ``params``: for every registered method on every base model, equal to the elements of the
  parameter tensors the model stores (for int8: those of the float model it packs), and for WSNet
  equal to its closed form;
- latency of a dynamic (early-exit) model is timed on real test inputs: a model whose exits differ
  for zeros and for real inputs is timed on the real ones;
- the artifact a study times is the file it writes (ONNX through ONNX Runtime by default).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import searchspace
from automl._artifact import load_artifact, state_dict_bytes
from automl._latency import LatencySettings
from automl._measure import latency_inputs, measure, param_count
from tests.conftest import BASE_MODELS, make_base, random_context, sample_params

METHODS = searchspace.list_methods()
FAST = LatencySettings(warmup=1, repeats=3, max_attempts=1, isolate=False)


def bn_folded_params(model: nn.Module) -> int:
    """Parameters after folding each BatchNorm into the convolution just before it (closed form):
    the BN's scale and shift (2C) go, a bias of C appears where the convolution had none."""
    n = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        kids = list(module.children())
        for conv, bn in zip(kids, kids[1:]):
            if isinstance(conv, (nn.Conv1d, nn.Conv2d)) and isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n -= 2 * bn.num_features
                n += bn.num_features if conv.bias is None else 0
    return n


@pytest.mark.parametrize("model_name,shape", BASE_MODELS, ids=[m for m, _ in BASE_MODELS])
@pytest.mark.parametrize("name", METHODS)
def test_params_equal_the_stored_parameter_elements(name, model_name, shape):
    method = searchspace.get_method(name)()
    base = make_base(model_name, shape)
    reason = method.supports(base)
    if reason is not None:
        pytest.skip(f"{name} does not apply to {model_name}: {reason}")
    params, _ = sample_params(method, seed=3)
    out = method.apply(base, params, context=random_context(shape, base)).eval()
    recipe = searchspace.artifact_quantization(out)
    if recipe is not None:
        # Quantised at artifact time: what it stores is its quantised form (what measure counts).
        out = recipe.quantize_torch(out)
    if method.stage == searchspace.Stage.QUANTIZE:
        # int8 stores every weight once, packed: the parameter count of the float model it quantises,
        # with BatchNorm folded into the convolution before it where the mode fuses (static).
        expected = bn_folded_params(base) if params.get("mode") == "static" else sum(p.numel() for p in base.parameters())
    else:
        # Every stored weight is a Parameter (a computed kernel, e.g. WSNet's, is not stored).
        expected = sum(p.numel() for p in out.parameters())
    assert param_count(out) == expected, f"{name} on {model_name}: params {param_count(out)} != stored parameter elements {expected}"


@pytest.mark.parametrize("stride,repeat", [(1, 1), (1, 8), (2, 4)])
def test_wsnet_model_params_follow_the_closed_form(stride, repeat):
    """The issue's case: a 128-channel MNIST-1D CNN under WSNet counts the compact stored weights
    (closed form per layer), never the materialised kernel on top."""
    from searchspace.methods.wsnet import WSConv, wsnet_param_count

    torch.manual_seed(0)
    base = make_base("mnist1d_cnn", (40,))
    method = searchspace.get_method("wsnet")()
    ctx = random_context((40,), base)
    out = method.apply(base, {"stride": stride, "repeat": repeat, "init": "random"}, context=ctx).eval()
    layers = [m for m in out.modules() if isinstance(m, WSConv)]
    assert layers, f"wsnet converted no layer: {ctx.notes}"
    expected = param_count(base)
    for layer in layers:
        conv = nn.Conv1d(layer.in_channels, layer.out_channels, layer.kernel_size[-1], bias=layer.bias is not None)
        expected += wsnet_param_count(conv, layer.sample_stride, layer.repeat) - sum(p.numel() for p in conv.parameters())
    assert param_count(out) == expected, f"S={stride} C={repeat}: params {param_count(out)} != closed form {expected}"
    assert param_count(out) < param_count(base), f"WSNet must store fewer parameters than the base: {param_count(out)} >= {param_count(base)}"


class _ZerosTakeTheLastExit(nn.Module):
    """A two-exit model: samples whose mean input is positive leave at exit 0 (cheap), the rest run
    a long second stage. Zeros never leave early; real digits (pixel values >= 0) always do."""

    def __init__(self) -> None:
        super().__init__()
        self.cheap = nn.Linear(64, 10)
        self.expensive = nn.Sequential(*[nn.Linear(64, 64) for _ in range(40)], nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        out = torch.empty(flat.shape[0], 10)
        early = flat.mean(dim=1) > 0
        for i in range(flat.shape[0]):
            if bool(early[i]):
                out[i] = self.cheap(flat[i : i + 1])[0]
            else:
                out[i] = self.expensive(flat[i : i + 1])[0]
        return out

    def exit_indices(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).mean(dim=1) <= 0).long()

    def exit_paths(self) -> list[nn.Module]:
        return [nn.Sequential(nn.Flatten(), self.cheap), nn.Sequential(nn.Flatten(), self.expensive)]

    def export_parts(self) -> list[str]:
        return []


def test_dynamic_model_is_timed_on_real_test_inputs_not_zeros(digits, tmp_path):
    model = _ZerosTakeTheLastExit().eval()
    settings = LatencySettings(runtime="torchscript", warmup=1, repeats=5, max_samples=40, max_attempts=1, isolate=False)
    inputs = latency_inputs(digits, settings, dynamic=True)
    assert torch.equal(inputs, digits.x_test[:40]), "latency inputs must be the first test samples"
    assert (model.exit_indices(inputs) == 0).all() and (model.exit_indices(torch.zeros_like(inputs)) == 1).all(), "fixture: zeros and digits must take different exits"
    metrics, artifact = measure(model, digits, settings, folder=tmp_path)
    assert metrics.exit_fractions == [1.0, 0.0], f"every real test sample leaves at exit 0: {metrics.exit_fractions}"
    from automl._measure import time_artifact

    zeros_ms = time_artifact(artifact, torch.zeros_like(inputs), settings, per_sample=True).median_ms
    assert metrics.latency_ms < zeros_ms / 2, (
        f"recorded latency {metrics.latency_ms:.4f} ms must be the early exit's, far below the zeros' path {zeros_ms:.4f} ms"
    )


def test_the_default_runtime_times_the_onnx_file_it_writes(digits, tmp_path):
    torch.manual_seed(0)
    model = make_base("digits_cnn", (1, 8, 8))
    metrics, artifact = measure(model, digits, FAST, folder=tmp_path)
    assert metrics.runtime == "onnxruntime" and artifact.path == tmp_path / "model.onnx", f"{metrics.runtime} {artifact.path}"
    assert metrics.size_bytes == (tmp_path / "model.onnx").stat().st_size, "size_bytes must be the ONNX file's bytes"
    assert metrics.state_dict_bytes == state_dict_bytes(model), "state_dict_bytes must be the saved state dict's bytes"
    reloaded = load_artifact(tmp_path, runtime="onnxruntime")
    x = digits.x_test[:16]
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model(x), atol=1e-4), "the ONNX artifact must compute the model"


@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript", "eager"])
def test_every_runtime_gives_the_same_accuracy_for_a_float_model(digits, tmp_path, runtime):
    torch.manual_seed(0)
    model = make_base("digits_cnn", (1, 8, 8))
    from automl._train import evaluate

    metrics, _ = measure(model, digits, LatencySettings(runtime=runtime, warmup=1, repeats=3, isolate=False), folder=tmp_path)
    assert metrics.accuracy == evaluate(model, digits), f"{runtime}: accuracy {metrics.accuracy} != eager {evaluate(model, digits)}"
    expected_file = {"onnxruntime": "model.onnx", "torchscript": "model.ts"}.get(runtime)
    expected = (Path(tmp_path) / expected_file).stat().st_size if expected_file else state_dict_bytes(model)
    assert metrics.size_bytes == expected, f"{runtime}: size_bytes {metrics.size_bytes} != artifact bytes {expected}"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript", "eager"])
def test_cuda_latency_without_cuda_fails_with_the_reason(digits, tmp_path, runtime):
    from automl._artifact import ArtifactError

    model = make_base("digits_cnn", (1, 8, 8))
    with pytest.raises(ArtifactError, match="latency.device is 'cuda'"):
        measure(model, digits, LatencySettings(runtime=runtime, device="cuda", warmup=1, repeats=3), folder=tmp_path)


def test_macs_count_inference_even_before_a_first_forward():
    """T-Net builds its kernels from the shared tensor once and caches them for inference; the MAC
    count of a fresh model must be that of inference (the convolutions), not of building the cache."""
    torch.manual_seed(0)
    base = make_base("mnist1d_cnn", (40,))
    out = searchspace.get_method("tnet")().apply(base, {"rank_layers": 1.0, "rank_out": 1.0, "rank_in": 1.0, "rank_kernel": 1.0}, context=random_context((40,), base)).eval()
    from automl._measure import count_macs

    x = torch.randn(1, 40)
    first = count_macs(out, x)
    assert first == count_macs(base, x), f"T-Net at full rank runs the base's convolutions: {first} MACs != base {count_macs(base, x)}"
