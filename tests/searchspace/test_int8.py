"""int8: a quarter of the float size, under one point of accuracy lost on digits, saves as TorchScript."""

from __future__ import annotations

import copy

import pytest
import torch

import searchspace
from automl import build_model
from automl._measure import param_count, size_bytes
from automl._train import TrainOptions, evaluate, fit
from automl import load_model
from automl._checkpoint import load_checkpoint
from searchspace import ApplyContext


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


def test_static_int8_is_a_quarter_of_float_and_keeps_accuracy(trained_digits, digits):
    float_acc = evaluate(trained_digits, digits)
    assert float_acc > 0.9, f"the float base must be trained first, got accuracy {float_acc}"
    ctx = _context(digits)
    q = searchspace.get_method("int8")().apply(trained_digits, {"mode": "static"}, context=ctx)
    ratio = size_bytes(q) / size_bytes(trained_digits)
    assert 0.2 < ratio < 0.35, f"int8 saved size is {ratio:.3f} of float, expected about 0.25"
    drop = float_acc - evaluate(q, digits)
    assert drop < 0.01, f"int8 lost {drop * 100:.2f} accuracy points (float {float_acc:.4f})"
    assert param_count(q) > 0.9 * param_count(trained_digits), f"packed int8 weights must still count: {param_count(q)}"
    assert ctx.notes["int8.quantised"], "notes must say which parts were quantised"


def test_dynamic_int8_notes_the_float_convolutions(trained_digits, digits):
    ctx = _context(digits)
    q = searchspace.get_method("int8")().apply(trained_digits, {"mode": "dynamic"}, context=ctx)
    assert ctx.notes["int8.float"], "dynamic mode keeps convolutions float and must say so"
    assert evaluate(q, digits) > evaluate(trained_digits, digits) - 0.01, "dynamic int8 lost more than a point"


def test_quantised_model_survives_the_checkpoint(trained_digits, digits, tmp_path):
    from automl._checkpoint import save_checkpoint
    from automl._measure import LatencySettings, count_macs, measure
    from automl._trial import TrialOutcome
    from searchspace import Plan

    q = searchspace.get_method("int8")().apply(trained_digits, {"mode": "static"}, context=_context(digits))
    metrics, _ = measure(q, digits, LatencySettings(warmup=1, repeats=3), folder=tmp_path / "artifact", macs=count_macs(trained_digits, digits.x_test[:1]))
    plan = Plan(chain=(("none", {}), ("int8", {"mode": "static"})))
    ref = {"model": "digits_cnn", "options": {}, "input_shape": list(digits.input_shape), "num_classes": 10}
    save_checkpoint(TrialOutcome(plan=plan, metrics=metrics, model=q, folder=tmp_path / "artifact", input_shape=digits.input_shape), tmp_path / "checkpoint", base=ref)
    record = load_checkpoint(tmp_path / "checkpoint").record
    x = digits.x_test
    with torch.no_grad():
        # Rebuilt with random calibration inputs: the stored scales, not the recalibrated ones, must count.
        got = load_model(tmp_path / "checkpoint")(x)
        assert torch.equal(got, q(x)), f"the rebuilt int8 model must compute what the int8 model computes: max diff {float((got - q(x)).abs().max())}, {int((got.argmax(1) != q(x).argmax(1)).sum())} predictions differ"
        ts = torch.jit.load(str(tmp_path / "checkpoint" / "model.ts"))
        assert torch.allclose(ts(x), q(x)), "the TorchScript int8 model must compute what the int8 model computes"
    assert record["label"] == "none+int8", f"record label {record['label']!r}"


def test_apply_leaves_the_float_model_alone(trained_digits, digits):
    before = copy.deepcopy(trained_digits.state_dict())
    searchspace.get_method("int8")().apply(trained_digits, {"mode": "static"}, context=_context(digits))
    for k, v in trained_digits.state_dict().items():
        assert torch.equal(v, before[k]), f"int8 modified the float model's {k}"
