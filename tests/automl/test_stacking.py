"""Chains end to end through the real trial: tucker -> prune -> int8 and tnet -> int8 on digits."""

from __future__ import annotations

import optuna
import torch

import searchspace
from automl import build_model, load_model
from automl._checkpoint import save_checkpoint
from automl._latency import LatencySettings
from automl._train import TrainOptions, evaluate, fit
from automl._trial import TrialSettings, run_trial
from searchspace import Plan, SearchSpace

SETTINGS = TrialSettings(epochs=3, lr=3e-3, batch_size=100, latency=LatencySettings(warmup=1, repeats=3))


def _base(digits, **options):
    torch.manual_seed(0)
    model = build_model("digits_cnn", input_shape=digits.input_shape, num_classes=10, options=options)
    return fit(model, digits, TrainOptions(epochs=8, lr=3e-3, batch_size=64)).eval()


def test_tucker_prune_int8_chain(digits, tmp_path):
    base = _base(digits)
    plan = Plan(
        chain=(
            ("tucker", {"rank_out": 0.5, "rank_in": 0.5}),
            ("prune", {"criterion": "l1", "ratio": 0.3, "per_stage": False}),
            ("int8", {"mode": "static"}),
        )
    )
    out = run_trial(plan, base, digits, SETTINGS, folder=tmp_path / "artifact")
    assert out.notes["tucker.converted"] and out.notes["prune.channels"] and out.notes["int8.recipe"], f"a stage did nothing: {sorted(out.notes)}"
    import onnx

    from automl._artifact import build_artifact

    # Both sizes are the measured ONNX files (int8: ONNX Runtime's QDQ file, which also holds
    # per-channel scales and zero points and the exporter's node metadata).
    base_bytes = build_artifact(base, digits.x_test[:1], tmp_path / "base").size_bytes
    assert out.metrics.size_bytes < 0.25 * base_bytes, f"tucker+prune+int8 is {out.metrics.size_bytes} bytes vs base {base_bytes}"
    inits = onnx.load(str(tmp_path / "artifact" / "model.onnx")).graph.initializer
    int8_bytes = sum(i.ByteSize() for i in inits if i.data_type == onnx.TensorProto.INT8)
    assert int8_bytes > 0.7 * sum(i.ByteSize() for i in inits), "the weights in the measured file must be int8"
    assert out.metrics.accuracy > 0.5, f"the chain collapsed to accuracy {out.metrics.accuracy}"
    assert out.metrics.macs and out.metrics.macs > 0, "MACs of the float graph before int8 must be recorded"
    ref = {"model": "digits_cnn", "options": {}, "input_shape": list(digits.input_shape), "num_classes": 10}
    save_checkpoint(out, tmp_path / "checkpoint", base=ref)
    loaded = load_model(tmp_path / "checkpoint")
    with torch.no_grad():
        assert torch.equal(loaded(digits.x_test), out.model(digits.x_test)), "the model rebuilt from the checkpoint differs from the trial's model"
    # int8 is quantised by ONNX Runtime when the artifact is built: the checkpoint's model.onnx is
    # the measured model, and it reproduces the recorded accuracy.
    from automl._artifact import load_artifact
    from automl._measure import artifact_accuracy

    assert artifact_accuracy(load_artifact(tmp_path / "checkpoint"), digits) == out.metrics.accuracy, "checkpoint's ONNX differs from the measured model"


def test_tnet_int8_chain(digits, tmp_path):
    base = _base(digits, depth=2)
    plan = Plan(chain=(("tnet", {"rank_layers": 1.0, "rank_out": 0.6, "rank_in": 0.6, "rank_kernel": 1.0}), ("int8", {"mode": "static"})))
    out = run_trial(plan, base, digits, SETTINGS, folder=tmp_path)
    tnet_layers = sorted(layer for group in out.notes["tnet.groups"].values() for layer in group["layers"])
    assert tnet_layers and sorted(out.notes["int8.frozen"]) == tnet_layers, f"exactly the tnet layers must be frozen before int8: {out.notes.get('int8.frozen')} vs {tnet_layers}"
    assert out.metrics.accuracy > evaluate(base, digits) - 0.1, f"tnet+int8 accuracy {out.metrics.accuracy} far below base"


def test_space_never_samples_prune_after_tnet():
    methods = {n: searchspace.get_method(n)() for n in ("none", "tnet", "tucker", "prune", "int8")}
    space = SearchSpace(methods)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    labels = set()
    for _ in range(80):
        t = study.ask()
        labels.add(space.sample(t).label)
        study.tell(t, 0.0)
    assert not any(label.startswith("tnet+prune") for label in labels), f"invalid chains sampled: {sorted(labels)}"
    assert {"tucker+prune+int8", "tnet+int8"} & labels, f"stacked chains never sampled: {sorted(labels)}"
