"""int8 by the runtime that runs it: ONNX Runtime's quantiser on the exported ONNX (the measured
file is the shipped file), torch.ao's x86 kernels for the PyTorch runtimes; a quarter of the float
weights' bytes, under one point of accuracy lost on digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import searchspace
from automl import build_model
from automl._artifact import build_artifact, load_artifact
from automl._measure import LatencySettings, artifact_accuracy, count_macs, measure, param_count
from automl._onnx import LEGACY_REASON
from automl._train import TrainOptions, evaluate, fit
from searchspace import ApplyContext, artifact_quantization

FAST = LatencySettings(warmup=1, repeats=3, max_attempts=1, isolate=False)


@pytest.fixture(scope="module")
def trained_digits(digits):
    torch.manual_seed(0)
    model = build_model("digits_cnn", input_shape=digits.input_shape, num_classes=10)
    return fit(model, digits, TrainOptions(epochs=8, lr=3e-3, batch_size=64)).eval()


def _context(data) -> ApplyContext:
    return ApplyContext(
        example_input=data.x_train[:1],
        calibration=lambda: data.batches("train", 100, shuffle=True, seed=0),
    )


def _int8(model, data, mode):
    ctx = _context(data)
    return searchspace.get_method("int8")().apply(model, {"mode": mode}, context=ctx), ctx


def test_int8_declares_artifact_time_quantisation_and_leaves_the_float_model_alone(trained_digits, digits):
    before = copy.deepcopy(trained_digits.state_dict())
    q, ctx = _int8(trained_digits, digits, "static")
    assert searchspace.get_method("int8").quantizes_artifact, "int8 must declare that it quantises at artifact time"
    recipe = artifact_quantization(q)
    assert recipe is not None and recipe.describe()["mode"] == "static", f"the applied model must carry its recipe: {recipe}"
    # Calibration comes from the training split only: 8 batches of 100.
    assert recipe.describe()["calibration_samples"] == 800, recipe.describe()
    assert param_count(q) == param_count(trained_digits), "the stored parameters are the float model's until the artifact quantises them"
    for k, v in trained_digits.state_dict().items():
        assert torch.equal(v, before[k]), f"int8 modified the float model's {k}"


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_onnxruntime_int8_is_the_measured_file_smaller_and_accurate(trained_digits, digits, tmp_path, mode):
    """The measured int8 model IS model.onnx: a fresh ONNX Runtime session on the file gives the
    same predictions on every test sample and logits within 1e-4 of what the trial measured; the
    file is much smaller than the float model's ONNX file and loses under a point of accuracy."""
    import onnx
    import onnxruntime as ort

    float_acc = evaluate(trained_digits, digits)
    assert float_acc > 0.9, f"the float base must be trained first, got accuracy {float_acc}"
    fm, _ = measure(trained_digits, digits, FAST, folder=tmp_path / "float")
    q, _ = _int8(trained_digits, digits, mode)
    qm, artifact = measure(q, digits, FAST, folder=tmp_path / "int8", macs=fm.macs)
    path = tmp_path / "int8" / "model.onnx"
    assert artifact.path == path and qm.size_bytes == path.stat().st_size, "size_bytes must be the quantised file's bytes"
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    want = {"static": {"QuantizeLinear", "DequantizeLinear"}, "dynamic": {"DynamicQuantizeLinear"}}[mode]
    assert want <= ops, f"{mode} int8 ONNX must hold {want}, has {sorted(ops)}"
    assert artifact.info["onnx"]["quantization"]["quantizer"].startswith("onnxruntime.quantization"), artifact.info
    if mode == "static":
        from searchspace.methods.int8 import u8s8_saturates

        assert artifact.info["onnx"]["quantization"]["reduce_range"] is u8s8_saturates(), "the artifact must say whether its weights use 7 bits"
    ratio = qm.size_bytes / fm.size_bytes
    assert ratio < 0.5, f"int8 ONNX is {ratio:.3f} of the float ONNX file ({qm.size_bytes} vs {fm.size_bytes} bytes)"
    assert fm.accuracy - qm.accuracy < 0.01, f"{mode} int8 lost {(fm.accuracy - qm.accuracy) * 100:.2f} points"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = 0
    for x, _ in digits.batches("test", 500):
        fresh = sess.run(None, {"input": x.numpy()})[0]
        measured = artifact(x).numpy()
        assert np.array_equal(fresh.argmax(1), measured.argmax(1)), "a fresh session on model.onnx predicts differently from the measured model"
        assert np.abs(fresh - measured).max() <= 1e-4, f"logits differ by {np.abs(fresh - measured).max()}"
        n += len(x)
    assert n == len(digits.y_test)
    assert artifact_accuracy(load_artifact(tmp_path / "int8"), digits) == qm.accuracy, "the recorded accuracy is the file's"
    with torch.no_grad():
        float_logits = trained_digits(digits.x_test[:64]).numpy()
    assert np.abs(artifact(digits.x_test[:64]).numpy() - float_logits).max() > 1e-4, "the ONNX model must compute in int8, not reproduce the float model"


def test_pytorch_runtimes_get_torch_int8_kernels(trained_digits, digits, tmp_path):
    """torchscript / eager: torch.ao's x86 int8 (torchao's PT2E runs reference ops without
    inductor, see searchspace.methods.int8); model.ts about a quarter of the float one, accurate."""
    q, _ = _int8(trained_digits, digits, "static")
    fa = build_artifact(trained_digits, digits.x_test[:1], tmp_path / "f", runtime="torchscript")
    qa = build_artifact(q, digits.x_test[:1], tmp_path / "q", runtime="torchscript")
    ratio = qa.size_bytes / fa.size_bytes
    assert ratio < 0.5, f"int8 model.ts is {ratio:.3f} of float"
    assert "quantized::" in str(torch.jit.load(str(tmp_path / "q" / "model.ts")).inlined_graph), "model.ts must run quantised kernels"
    assert artifact_accuracy(fa, digits) - artifact_accuracy(qa, digits) < 0.01
    eager = build_artifact(q, digits.x_test[:1], tmp_path / "e", runtime="eager")
    assert eager.size_bytes < 0.5 * build_artifact(trained_digits, digits.x_test[:1], tmp_path / "fe", runtime="eager").size_bytes
    assert qa.info["pt2"]["file"] is None and qa.info["pt2"]["reason"].startswith(f"int8 has no torch.export program here: {LEGACY_REASON}"), f"int8 says why it has no model.pt2: {qa.info['pt2']}"


def test_dynamic_torch_int8_notes_the_float_convolutions(trained_digits, digits):
    q, _ = _int8(trained_digits, digits, "dynamic")
    notes: dict = {}
    tq = artifact_quantization(q).quantize_torch(q, notes)
    assert notes["int8.float"], "dynamic mode keeps convolutions float in PyTorch and must say so"
    assert evaluate(tq, digits) > evaluate(trained_digits, digits) - 0.01, "dynamic int8 lost more than a point"


def test_quantised_model_survives_the_checkpoint(trained_digits, digits, tmp_path):
    from automl._checkpoint import load_checkpoint, save_checkpoint
    from automl._trial import TrialOutcome
    from searchspace import Plan

    q, _ = _int8(trained_digits, digits, "static")
    metrics, artifact = measure(q, digits, FAST, folder=tmp_path / "artifact", macs=count_macs(trained_digits, digits.x_test[:1]))
    plan = Plan(chain=(("none", {}), ("int8", {"mode": "static"})))
    ref = {"model": "digits_cnn", "options": {}, "input_shape": list(digits.input_shape), "num_classes": 10}
    save_checkpoint(TrialOutcome(plan=plan, metrics=metrics, model=q, folder=tmp_path / "artifact", input_shape=digits.input_shape), tmp_path / "checkpoint", base=ref)
    ckpt = load_checkpoint(tmp_path / "checkpoint")
    from automl import load_model

    with torch.no_grad():
        # Rebuilt with random calibration inputs: the stored weights, not recalibrated ones, must count.
        got, want = load_model(tmp_path / "checkpoint")(digits.x_test), q(digits.x_test)
    assert torch.equal(got, want), f"the rebuilt int8 model must compute what the int8 model computes: max diff {float((got - want).abs().max())}"
    assert (tmp_path / "checkpoint" / "model.onnx").read_bytes() == (tmp_path / "artifact" / "model.onnx").read_bytes(), "the checkpoint holds the measured file byte for byte"
    assert artifact_accuracy(load_artifact(tmp_path / "checkpoint"), digits) == metrics.accuracy
    assert ckpt.record["label"] == "none+int8", f"record label {ckpt.record['label']!r}"


@pytest.mark.parametrize(
    "machine,flags,saturates",
    [
        ("x86_64", "fpu sse2 avx avx2 fma", True),  # AVX2 only (AMD EPYC here): VPMADDUBSW clamps to int16
        ("x86_64", "fpu avx2 avx512f avx512_vnni", False),
        ("x86_64", "fpu avx2 avx_vnni", False),
        ("x86_64", "fpu avx2 amx_int8 amx_tile", False),
        ("aarch64", "fp asimd", False),  # ARM kernels do not take that path
    ],
)
def test_reduce_range_only_where_u8s8_kernels_saturate(monkeypatch, machine, flags, saturates):
    import platform
    from pathlib import Path

    from searchspace.methods import int8

    monkeypatch.setattr(platform, "machine", lambda: machine)
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"processor\t: 0\nflags\t\t: {flags}\n" if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
    assert int8.u8s8_saturates() is saturates, f"{machine} with flags {flags!r}"
