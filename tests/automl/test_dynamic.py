"""Dynamic models: a trial measures exits and their variants, each checkpointed as its own model.

How the searcher records the variants is tested in ``test_searcher.py``."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import searchspace
from automl._measure import LatencySettings
from automl._trial import TrialSettings, run_trial
from searchspace import Plan
from searchspace.methods.exits import VARIANTS as N_VARIANTS
from tests.conftest import make_base, random_context

EXITS = {"points": "stages", "count": 1, "head": "avgpool", "pool": 2, "training": "frozen", "thresholds": "budget", "q": 0.5}


@pytest.fixture(scope="module")
def small_mnist1d(mnist1d):
    # Full training split (it is small), a 120-sample test split so batch-1 timing stays quick.
    return mnist1d.head("test", 120)


def test_trial_measures_exits_and_variants(small_mnist1d, tmp_path):
    base = make_base("mnist1d_cnn", (40,))
    settings = TrialSettings(epochs=1, lr=1e-3, batch_size=100, latency=LatencySettings(warmup=1, repeats=3))
    plan = Plan(chain=(("exits", EXITS),), finetune={"distill": True, "distill.temperature": 2.0, "distill.weight": 0.5})
    out = run_trial(plan, base, small_mnist1d, settings, folder=tmp_path / "artifact")
    m = out.metrics
    assert m.exit_fractions is not None and sum(m.exit_fractions) == pytest.approx(1.0), f"exit fractions {m.exit_fractions} must sum to 1"
    expected = sum(f * c for f, c in zip(m.exit_fractions, m.exit_macs))
    assert m.macs == pytest.approx(expected, abs=1), f"expected MACs {m.macs} != sum(fraction x MACs to exit) = {expected}"
    assert m.exit_macs[0] < m.exit_macs[1], f"the first exit must cost less than the full path: {m.exit_macs}"
    assert m.latency_ms > 0 and m.latency_iqr_ms >= 0, f"latency {m.latency_ms} ms, IQR {m.latency_iqr_ms}"
    assert 0 < m.latency_p50_ms <= m.latency_p90_ms, f"per-sample p50 {m.latency_p50_ms} and p90 {m.latency_p90_ms} ms must be recorded, p50 <= p90"
    assert len(out.variants) in (N_VARIANTS - 1, N_VARIANTS), f"{len(out.variants)} variants for {N_VARIANTS} values of q"
    early = [v.metrics.exit_fractions[0] for v in out.variants]
    assert early[0] > early[-1], f"small q must send more samples out early than large q: {early}"
    assert out.notes["calibrated"]["thresholds"] == pytest.approx(out.model.thresholds[:-1].tolist()), "the model must end in the trial's own setting"

    # Every variant is checkpointed as its own model: its thresholds in its files, its accuracy
    # reproduced by its own ONNX artifact; the parent's files keep the parent's thresholds.
    import onnx
    from onnx import numpy_helper

    from automl._artifact import load_artifact
    from automl import load_model
    from automl._checkpoint import load_checkpoint, save_checkpoint, variant_folder
    from automl._measure import artifact_accuracy

    folder = save_checkpoint(out, tmp_path / "checkpoint", base={"model": "mnist1d_cnn", "options": {}, "input_shape": [40], "num_classes": 10})

    def thresholds_of(where) -> list[float]:
        ts = load_model(where).thresholds[:-1].tolist()
        init = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(where / "model.onnx")).graph.initializer}
        in_onnx = [v for k, v in init.items() if k.endswith("thresholds")]
        assert len(in_onnx) == 1 and list(in_onnx[0][:-1]) == pytest.approx(ts), f"{where.name}: ONNX thresholds {in_onnx} != TorchScript {ts}"
        return ts

    parent = thresholds_of(folder)
    assert parent == pytest.approx(out.notes["calibrated"]["thresholds"]), "the parent's checkpoint must hold the parent's thresholds"
    for k, variant in enumerate(out.variants):
        where = folder / variant_folder(k)
        record = load_checkpoint(where).record
        own = thresholds_of(where)
        assert own == pytest.approx(variant.state["thresholds"]), f"variant {k}: checkpoint thresholds {own} != its own {variant.state['thresholds']}"
        assert record["metrics"]["accuracy"] == variant.metrics.accuracy and record["notes"]["calibrated"] == variant.state, f"variant {k}: record {record['metrics']} / {record['notes']}"
        got = artifact_accuracy(load_artifact(where), small_mnist1d)
        assert got == variant.metrics.accuracy, f"variant {k}: its ONNX artifact gives accuracy {got} != its recorded {variant.metrics.accuracy}"
    assert any(v.state["thresholds"] != pytest.approx(parent) for v in out.variants), "fixture: some variant must differ from the parent"


def test_a_setting_rebound_from_anothers_files_is_what_a_fresh_export_writes(small_mnist1d, tmp_path):
    """build_artifact(like=...) copies another setting's files with the thresholds set: the same
    program, initializers and outputs as capturing and exporting that setting from scratch; a model
    that differs in anything else is exported afresh."""
    import onnx
    from onnx import numpy_helper

    from automl._artifact import build_artifact

    base = make_base("mnist1d_cnn", (40,))
    ctx = random_context((40,), base)
    model = searchspace.get_method("exits")().apply(base, {**EXITS, "thresholds": "direct", "threshold_0": 0.5}, context=ctx).eval()
    x = small_mnist1d.x_test
    example = x[:1]
    with torch.no_grad():
        # Setting a sends the more confident half of the samples out at the first exit, setting b none.
        model.thresholds[0] = float(model.confidences(x)[:, 0].median())
        first = build_artifact(model, example, tmp_path / "a")
        model.thresholds[0] = 1.5  # another setting: only the named-initializer buffer changes
    fresh = build_artifact(model, example, tmp_path / "fresh")
    rebound = build_artifact(model, example, tmp_path / "b", like=tmp_path / "a")
    assert rebound.info["onnx"].get("rebound") == ["thresholds"], f"the thresholds must be rebound, info {rebound.info['onnx']}"

    def initializers(folder):
        return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(folder / "model.onnx")).graph.initializer}

    got, want = initializers(tmp_path / "b"), initializers(tmp_path / "fresh")
    assert got.keys() == want.keys(), f"initializers {sorted(got)} != a fresh export's {sorted(want)}"
    assert all(np.array_equal(got[k], want[k]) for k in want), f"initializers differ: {[k for k in want if not np.array_equal(got[k], want[k])]}"
    assert got["thresholds"][0] == pytest.approx(1.5), f"rebound thresholds {got['thresholds']}"
    outputs = [torch.as_tensor(a(x)) for a in (fresh, rebound)]
    assert torch.equal(*outputs), f"rebound and fresh ONNX outputs differ by {(outputs[0] - outputs[1]).abs().max():.3e}"
    program = torch.export.load(str(tmp_path / "b" / "model.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(program(x), model(x), atol=1e-5), "the rebound model.pt2 must run the new setting"
    # The comparison has teeth: setting a's own files give other outputs (half its samples exit early).
    assert not torch.allclose(torch.as_tensor(first(x)), outputs[0]), "settings a and b must give different outputs"

    with torch.no_grad():
        model.exits[0].head.fc.bias += 1.0  # a weight differs: no rebinding, a fresh export
    other = build_artifact(model, example, tmp_path / "d", like=tmp_path / "a")
    assert "rebound" not in other.info["onnx"], f"a model differing in its weights must be exported afresh, info {other.info['onnx']}"


def test_a_setting_rebound_from_files_with_external_data_carries_its_data_file(small_mnist1d, tmp_path, monkeypatch):
    """A model too large for one ONNX file keeps its weights in ``model.onnx.data`` (torch's
    threshold lowered to 0 here): rebinding copies that file beside the new graph, and the rebound
    artifact computes what a fresh export of the setting computes, its size counting both files."""
    from torch.onnx._internal.exporter import _onnx_program

    from automl._artifact import build_artifact, onnx_files

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    base = make_base("mnist1d_cnn", (40,))
    model = searchspace.get_method("exits")().apply(base, {**EXITS, "thresholds": "direct", "threshold_0": 0.5}, context=random_context((40,), base)).eval()
    x = small_mnist1d.x_test
    with torch.no_grad():
        model.thresholds[0] = float(model.confidences(x)[:, 0].median())
        build_artifact(model, x[:1], tmp_path / "a")
        model.thresholds[0] = 1.5
    fresh = build_artifact(model, x[:1], tmp_path / "fresh")
    rebound = build_artifact(model, x[:1], tmp_path / "b", like=tmp_path / "a")
    assert rebound.info["onnx"].get("rebound") == ["thresholds"], f"the thresholds must be rebound, info {rebound.info['onnx']}"
    graph = tmp_path / "b" / "model.onnx"
    assert onnx_files(graph) == [graph, tmp_path / "b" / "model.onnx.data"], f"the rebound graph must reference its own copy of the data: {onnx_files(graph)}"
    assert rebound.size_bytes == sum(f.stat().st_size for f in onnx_files(graph))
    assert torch.equal(torch.as_tensor(rebound(x)), torch.as_tensor(fresh(x))), "rebound and fresh ONNX outputs differ"
    (tmp_path / "a" / "model.onnx.data").unlink()  # the rebound artifact must not read setting a's data
    assert torch.equal(torch.as_tensor(build_artifact(model, x[:1], tmp_path / "c", like=tmp_path / "b")(x)), torch.as_tensor(fresh(x)))
