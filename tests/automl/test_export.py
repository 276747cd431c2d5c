"""Export: every method family the small study trained is exported, then loaded in fresh processes
holding only torch (the ``torch.export`` program, model.pt2) and only onnxruntime (ONNX), reproducing
the card's accuracy; TorchScript ships only with --torchscript (or the torchscript runtime); bad
checkpoints fail with exit 2 writing nothing; the steps of an export on constructed inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from typer.testing import CliRunner

from automl._cli import app
from automl._data import dataset_from_config
from automl._pareto import load_view
from tests.automl.conftest import applicable_methods, copy_study
from tests.fixtures.models import EarlyExitFixture

TORCH_ONLY = r"""
import json, sys
import numpy as np
import torch
folder, data = sys.argv[1], sys.argv[2]
x, y = torch.from_numpy(np.load(data + "/x.npy")), torch.from_numpy(np.load(data + "/y.npy"))
model = torch.export.load(folder + "/model.pt2").module()
correct = 0
with torch.no_grad():
    for i in range(0, len(y), 500):  # the batch size trials evaluate with
        correct += int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum())
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("automl", "searchspace", "onnxruntime", "optuna", "ray"))
print(json.dumps({"accuracy": correct / len(y), "project_modules": ours}))
"""

ORT_ONLY = r"""
import json, sys
import numpy as np
import onnxruntime as ort
folder, data = sys.argv[1], sys.argv[2]
x, y = np.load(data + "/x.npy"), np.load(data + "/y.npy")
sess = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
correct = 0
for i in range(0, len(y), 500):
    correct += int((sess.run(None, {name: x[i:i + 500]})[0].argmax(1) == y[i:i + 500]).sum())
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "automl", "searchspace"))
print(json.dumps({"accuracy": correct / len(y), "project_modules": ours}))
"""


def _fresh(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, f"fresh process failed: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def test_split(small_study, tmp_path_factory):
    data = dataset_from_config(small_study.dataset, download=False)
    folder = tmp_path_factory.mktemp("testsplit")
    np.save(folder / "x.npy", data.x_test.numpy())
    np.save(folder / "y.npy", data.y_test.numpy())
    return folder


@pytest.mark.parametrize("method", applicable_methods())
def test_export_each_method_family_reloads_in_fresh_processes(method, small_study, test_split, tmp_path):
    view = load_view(optuna.load_study(study_name=small_study.name, storage=small_study.storage_url))
    # The shortest chain holding the method first: it is that family's own export.
    rows = sorted((r for r in view.trials if method in r.method.split("+")), key=lambda r: len(r.method.split("+")))
    if not rows:
        failed = [f"trial {r.number}: {r.fail_reason}" for r in view.failed if method in r.method.split("+")]
        pytest.fail(f"the small study has no finished trial of {method!r} to export; its trials failed: {failed or 'none ran'}")
    row = rows[0]
    out = tmp_path / f"export_{method}"
    result = CliRunner().invoke(app, ["export", str(small_study.study_dir), "--trial", str(row.number), "--out", str(out)])
    assert result.exit_code == 0, f"export of trial {row.number} ({row.method}) failed: {result.output}"
    card = json.loads((out / "card.json").read_text())
    assert card["trial"] == row.number and card["method"] == row.method, f"card names the wrong trial: {card['trial']} {card['method']}"
    assert [s["method"] for s in card["chain"]] == row.method.split("+"), f"card chain differs from the trial's: {card['chain']}"
    for key in ("versions", "cpu", "latency", "python"):
        assert key in card["environment"], f"card.environment lacks {key!r}: {sorted(card['environment'])}"
    recorded = card["metrics"]["recorded"]["accuracy"]
    assert card["metrics"]["exported"]["accuracy"] == pytest.approx(recorded, abs=1e-12), "card's verified accuracy must equal the recorded one"
    assert card["metrics"]["exported"]["latency_ms"] is not None, f"latency was not re-measured: {card['metrics']['exported']}"
    assert (out / card["files"]["weights"]).is_file(), f"weights file {card['files']['weights']} is missing"
    # The study's runtime is ONNX Runtime: no TorchScript unless asked for (--torchscript).
    assert not (out / "model.ts").exists() and card["files"]["torchscript"] is None, f"{row.method}: model.ts shipped without --torchscript: {card['files']}"
    # Plan + weights ship too: the module rebuilt from the export computes what model.pt2 computes.
    from automl import load_model

    from searchspace import artifact_quantization

    module = load_model(out)
    if "skipped" in card["rebuild"]:
        # int8 quantised when the artifact was built: the module is the float one with its recipe,
        # and ONNX Runtime's int8 model.onnx the only runnable file (no .pt2, see artifact.json).
        assert artifact_quantization(module) is not None, f"{row.method}: a float model must ship model.pt2 (int8 alone has none): {card['rebuild']} {card['files'].get('pt2_reason')}"
        assert card["files"]["pytorch_artifact"] is None and not (out / "model.pt2").exists(), f"{row.method}: int8 for ONNX Runtime has no PyTorch program: {card['files']}"
        assert card["onnx"]["status"] == "measured", f"{row.method}: without a PyTorch artifact ONNX is only the measured file: {card['onnx']}"
    else:
        assert card["files"]["pytorch_artifact"] == "model.pt2" == card["rebuild"]["pytorch_artifact"], f"{row.method}: a float model is verified against model.pt2: {card['files']} {card['rebuild']}"
        x = dataset_from_config(small_study.dataset, download=False).x_test[:200]
        with torch.no_grad():
            rebuilt, shipped = module(x), torch.export.load(str(out / "model.pt2")).module()(x)
        assert torch.equal(rebuilt.argmax(1), shipped.argmax(1)) and float((rebuilt - shipped).abs().max()) <= 1e-5, (
            f"{row.method}: automl.load_model(export) differs from the shipped model.pt2 by {float((rebuilt - shipped).abs().max()):.3g}"
        )
        pt = _fresh(TORCH_ONLY, str(out), str(test_split))
        assert pt["project_modules"] == [], f"the model.pt2 check must run with torch only, but imported {pt['project_modules']}"
        # The recorded accuracy is the measured artifact's (ONNX Runtime); model.pt2's is on the card.
        assert pt["accuracy"] == pytest.approx(card["onnx"]["accuracy_pytorch_artifact"], abs=1e-12), f"model.pt2 in a fresh process: accuracy {pt['accuracy']} != card {card['onnx']}"
        assert card["onnx"]["status"] == "ok", f"{row.method}: ONNX does not match model.pt2: {card['onnx'].get('reason')}"
    assert not list(tmp_path.glob(".*partial*")), "a .partial folder was left behind"

    assert (out / "model.onnx").is_file(), "card says ONNX is ok but model.onnx is missing"
    ox = _fresh(ORT_ONLY, str(out), str(test_split))
    assert ox["project_modules"] == [], f"ONNX check must run with onnxruntime only, but imported {ox['project_modules']}"
    assert ox["accuracy"] == pytest.approx(recorded, abs=1e-12), f"ONNX Runtime in a fresh process: accuracy {ox['accuracy']} != card {recorded}"


def _damage_missing(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder)


def _damage_model(folder: Path) -> None:
    (folder / "model.pt2").write_bytes(b"not a torch.export archive")


def _damage_weights(folder: Path) -> None:
    data = (folder / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(data[: len(data) // 2])


def _damage_record(folder: Path) -> None:
    (folder / "trial.json").write_text("{ truncated")


@pytest.mark.parametrize("damage,words", [(_damage_missing, "is missing"), (_damage_model, "model.pt2 does not load"), (_damage_weights, "weights.safetensors does not load"), (_damage_record, "trial.json")], ids=["missing", "model", "weights", "record"])
def test_export_of_bad_checkpoint_exits_2_writing_nothing(damage, words, small_study, tmp_path):
    cfg = copy_study(small_study, tmp_path)
    view = load_view(optuna.load_study(study_name=cfg.name, storage=cfg.storage_url))
    assert cfg.storage_url != small_study.storage_url, "the copy must have its own database"
    # A float trial: its checkpoint holds model.pt2 (int8 for ONNX Runtime has none to damage).
    row = next(r for r in view.trials if (cfg.study_dir / r.checkpoint / "model.pt2").is_file())
    damage(cfg.study_dir / row.checkpoint)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["export", str(cfg.study_dir), "--trial", str(row.number)])
    assert result.exit_code == 2, f"expected exit 2, got {result.exit_code}: {result.output}"
    lines = [l for l in result.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and words in lines[0] and f"trial {row.number}" in lines[0], f"expected one clear error line mentioning {words!r}: {result.output}"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, f"a failed export must write nothing, new paths: {sorted(set(after) - set(before))}"


def test_pick_with_constraint_and_bad_selection(small_study, tmp_path):
    view = load_view(optuna.load_study(study_name=small_study.name, storage=small_study.storage_url))
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(small_study.study_dir), "--pick", "best-accuracy", "--max-latency", "1e-9"])
    assert r.exit_code == 2 and "meets latency_ms <= 1e-09" in r.output, f"an impossible bound must exit 2 naming it: {r.output}"
    r = runner.invoke(app, ["export", str(small_study.study_dir), "--trial", "999"])
    assert r.exit_code == 2 and "no finished trial 999" in r.output, f"unknown trial must exit 2: {r.output}"
    r = runner.invoke(app, ["export", str(small_study.study_dir)])
    assert r.exit_code == 2 and "exactly one of --trial" in r.output, f"no selection must exit 2: {r.output}"
    out = tmp_path / "knee"
    r = runner.invoke(app, ["export", str(small_study.study_dir), "--pick", "knee", "--out", str(out)])
    assert r.exit_code == 0, f"--pick knee failed: {r.output}"
    from automl._pareto import review_knee

    knee = review_knee(view, small_study.review.max_drop)
    assert json.loads((out / "card.json").read_text())["trial"] == knee, "--pick knee must export the knee within review.max_drop"
    r = runner.invoke(app, ["export", str(small_study.study_dir), "--pick", "knee", "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output, f"an existing destination must not be overwritten silently: {r.output}"


@pytest.mark.parametrize("threshold", [0.0, 1.5], ids=["always-exit", "never-exit"])
def test_export_keeps_data_dependent_control_flow(threshold, small_study, tmp_path):
    """Both branches of a user's early-exit forward (Python control flow on a tensor value, which
    torch.export cannot capture, so no model.pt2 and ONNX through the legacy exporter) survive
    export: TorchScript (--torchscript) and ONNX (as an ``If``) give the PyTorch outputs whichever
    way the threshold sends the batch."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from automl._export import export_trial
    from automl._measure import LatencySettings

    cfg = copy_study(small_study, tmp_path)
    view, row, data = _checkpoint_trial(cfg, "early_exit_fixture", {"kind": "early_exit", "threshold": threshold})
    out = tmp_path / "ee"
    card = export_trial(view, row, out, study_dir=cfg.study_dir, load_data=lambda: data, latency=LatencySettings(warmup=1, repeats=3), measure_latency=False, torchscript=True)
    assert card["onnx"]["status"] == "ok", f"ONNX export of a scripted early exit failed: {card['onnx']}"
    assert not (out / "model.pt2").exists() and "torch.export failed" in card["files"]["pt2_reason"], f"the card must say why there is no model.pt2: {card['files']}"
    assert card["torchscript"]["written_by_export"] and card["rebuild"]["predictions_equal"] == card["rebuild"]["n"], f"model.ts must be verified against the rebuilt module: {card['rebuild']}"
    m = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert "If" in ops, f"the ONNX graph must keep the data-dependent branch as an If node, has {sorted(ops)}"
    exported = getattr(torch.jit.load(str(out / "model.ts")).stages, "0")  # the fixture inside its StagedNet
    assert float(exported.threshold) == pytest.approx(threshold), f"threshold {float(exported.threshold)} != {threshold} in the exported TorchScript"
    # The other branch too: flip the threshold in the exported TorchScript and in the ONNX initializer.
    flipped = 1.5 if threshold == 0.0 else 0.0
    exported.threshold.fill_(flipped)
    inits = [i for i in m.graph.initializer if i.name.endswith("threshold")]
    assert len(inits) == 1, f"the threshold must be one ONNX initializer, found {[i.name for i in m.graph.initializer]}"
    inits[0].CopyFrom(numpy_helper.from_array(np.array(flipped, dtype=np.float32), inits[0].name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = data.x_test[:64]
    with torch.no_grad():
        ref = exported(x).numpy()
        eager = EarlyExitFixture(flipped)(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(ref - eager).max() <= 1e-5, "the flipped TorchScript must take the other branch like the eager model"
    assert np.abs(got - ref).max() <= 1e-4, f"after flipping the threshold ONNX and TorchScript differ by {np.abs(got - ref).max()}"


def _checkpoint_trial(cfg, name: str, options: dict, *, chain: tuple = (("none", {}),)):
    """A trial checkpoint of the study ``cfg`` whose plan is ``chain`` on the base
    ``tests.fixtures.models:export_fixture(**options)``, measured and saved as a trial is (the same
    ``apply_chain``, ``measure`` and ``save_checkpoint``); return (view, row, data)."""
    import dataclasses

    from automl import build_model
    from automl._checkpoint import save_checkpoint
    from automl._latency import LatencySettings
    from automl._measure import measure
    from automl._trial import TrialOutcome, apply_chain
    from searchspace import Plan

    view = load_view(optuna.load_study(study_name=cfg.name, storage=cfg.storage_url))
    data = dataset_from_config(cfg.dataset, download=False)
    ref = {"model": "tests.fixtures.models:export_fixture", "options": dict(options), "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    base = build_model(ref["model"], input_shape=ref["input_shape"], num_classes=ref["num_classes"], options=ref["options"]).eval()
    plan = Plan(chain=tuple(chain))
    model, macs = apply_chain(
        plan, base, example=data.x_train[:1], calibration=lambda: iter(data.batches("train", 256, shuffle=True, seed=0)), train=lambda m, **_: m
    )
    work = cfg.study_dir / "work" / name
    metrics, _ = measure(model.eval(), data, LatencySettings(warmup=1, repeats=3), folder=work, macs=macs)
    outcome = TrialOutcome(plan=plan, metrics=metrics, model=model, folder=work, input_shape=tuple(data.input_shape))
    save_checkpoint(outcome, cfg.study_dir / "checkpoints" / name, base=ref)
    row = dataclasses.replace(view.trials[0], method=plan.label, metrics=metrics.as_dict(), attrs={"checkpoint": f"checkpoints/{name}"})
    return view, row, data


def test_export_of_int8_model_verifies_onnx_and_torchscript_when_asked(small_study, tmp_path):
    """An int8 (static) model quantised by ONNX Runtime: model.onnx, the measured artifact, is
    re-verified on the recorded accuracy and ships alone (int8 has no .pt2). With torchscript=True a
    PyTorch int8 model.ts, quantised from the rebuilt module, ships too; ONNX is compared with it
    (same accuracy, same prediction on >= 99 % of the test samples, else the card says why)."""
    from automl._export import export_trial
    from automl._measure import LatencySettings

    cfg = copy_study(small_study, tmp_path)
    view, row, data = _checkpoint_trial(cfg, "int8_fixture", {"kind": "conv"}, chain=(("none", {}), ("int8", {"mode": "static"})))
    out = tmp_path / "int8"
    card = export_trial(view, row, out, study_dir=cfg.study_dir, load_data=lambda: data, latency=LatencySettings(warmup=1, repeats=3), measure_latency=False)
    assert card["metrics"]["exported"]["accuracy"] == pytest.approx(row.metrics["accuracy"], abs=1e-12), "the measured int8 artifact's accuracy must be re-verified"
    assert (out / "weights.safetensors").is_file() and not list(out.glob("*.pt")), f"weights must be safetensors, nothing pickled: {sorted(p.name for p in out.iterdir())}"
    assert not (out / "model.ts").exists() and not (out / "model.pt2").exists(), f"int8 for ONNX Runtime ships no PyTorch artifact unless asked: {sorted(p.name for p in out.iterdir())}"
    assert "skipped" in card["rebuild"] and card["files"]["pytorch_artifact"] is None, f"nothing to compare the rebuilt float module with: {card['rebuild']} {card['files']}"
    onnx = card["onnx"]
    assert onnx["status"] == "measured" and onnx["quantized"] and onnx["reason"].startswith("no PyTorch artifact to compare with"), f"the card must say ONNX is the measured int8 file with no PyTorch reference: {onnx}"
    assert (out / "model.onnx").is_file() and card["files"]["onnx"] == "model.onnx", f"the measured ONNX must ship: {card['files']}"
    assert onnx["accuracy"] == pytest.approx(row.metrics["accuracy"], abs=1e-12), f"ONNX accuracy differs from the recorded one: {onnx}"

    out_ts = tmp_path / "int8_ts"
    card = export_trial(view, row, out_ts, study_dir=cfg.study_dir, load_data=lambda: data, latency=LatencySettings(warmup=1, repeats=3), measure_latency=False, torchscript=True)
    assert card["files"]["torchscript"] == card["files"]["pytorch_artifact"] == "model.ts" and card["torchscript"]["written_by_export"], f"torchscript=True must ship model.ts: {card['files']} {card['torchscript']}"
    shipped = torch.jit.load(str(out_ts / "model.ts"))
    assert "quantized::" in str(shipped.inlined_graph), "model.ts of an int8 model must run PyTorch's int8 kernels"
    assert card["rebuild"]["predictions_equal"] == card["rebuild"]["n"] == len(data.y_test), f"model.ts must predict what the quantised rebuilt module predicts: {card['rebuild']}"
    onnx = card["onnx"]
    assert onnx["pytorch_artifact"] == "model.ts" and onnx["quantized"], f"ONNX is compared with model.ts: {onnx}"
    with torch.no_grad():
        correct = sum(int((shipped(x).argmax(1) == y).sum()) for x, y in data.batches("test", 500))
    assert onnx["accuracy_pytorch_artifact"] == pytest.approx(correct / len(data.y_test), abs=1e-12), f"card's model.ts accuracy {onnx['accuracy_pytorch_artifact']} != {correct / len(data.y_test)}"
    # Two quantisers' int8 forms of the same float weights: compared for information, never rejected.
    assert onnx["status"] == "ok" and "independent" in onnx["criterion"], f"int8 ONNX vs a requested model.ts is information: {onnx}"
    agree = sum(int((shipped(x).argmax(1) == torch.as_tensor(onnx_export_session(out_ts)(x)).argmax(1)).sum()) for x, _ in data.batches("test", 500))
    assert onnx["predictions_equal"] == agree, f"card says {onnx['predictions_equal']} equal predictions, counted {agree}"
    if agree < len(data.y_test) or onnx["accuracy"] != onnx["accuracy_pytorch_artifact"]:
        assert onnx.get("pytorch_artifact_differs"), f"the card must say how model.ts differs: {onnx}"


def onnx_export_session(folder: Path):
    """The shipped model.onnx as a callable (the runtime's own session)."""
    from automl._artifact import load_artifact

    return load_artifact(folder, runtime="onnxruntime")


def test_torchscript_flag_adds_a_verified_model_ts(small_study, tmp_path):
    """Without --torchscript a float trial of an ONNX Runtime study ships model.pt2 and model.onnx and
    no model.ts; with it, model.ts ships too, verified against the rebuilt module, computing what
    model.pt2 computes, and the README says how to load it."""
    view = load_view(optuna.load_study(study_name=small_study.name, storage=small_study.storage_url))
    row = next(r for r in view.trials if (small_study.study_dir / r.checkpoint / "model.pt2").is_file() and r.attrs.get("derived_from") is None)
    assert not (small_study.study_dir / row.checkpoint / "model.ts").exists(), "trials of an onnxruntime study must not write model.ts"
    plain, with_ts = tmp_path / "plain", tmp_path / "with_ts"
    r = CliRunner().invoke(app, ["export", str(small_study.study_dir), "--trial", str(row.number), "--out", str(plain)])
    assert r.exit_code == 0, f"export failed: {r.output}"
    r = CliRunner().invoke(app, ["export", str(small_study.study_dir), "--trial", str(row.number), "--out", str(with_ts), "--torchscript"])
    assert r.exit_code == 0, f"export --torchscript failed: {r.output}"
    names = {p.name for p in plain.iterdir()}
    assert {"model.pt2", "model.onnx"} <= names and "model.ts" not in names, f"default export ships {sorted(names)}"
    assert "torch.jit.load" not in (plain / "README.md").read_text() and "torch.export.load" in (plain / "README.md").read_text(), "README must say how to load model.pt2 and not mention a model.ts it lacks"
    assert {p.name for p in with_ts.iterdir()} == names | {"model.ts"}, f"--torchscript must add exactly model.ts: {sorted(p.name for p in with_ts.iterdir())}"
    card = json.loads((with_ts / "card.json").read_text())
    ts_info = card["torchscript"]
    assert ts_info["written_by_export"] and ts_info["pytorch_artifact"] == "model.ts" and ts_info["predictions_equal"] == ts_info["n"] > 0, f"model.ts must be verified: {ts_info}"
    assert card["files"]["pytorch_artifact"] == "model.pt2" and card["files"]["torchscript"] == "model.ts", f"{card['files']}"
    assert "torch.jit.load" in (with_ts / "README.md").read_text(), "README must say how to load model.ts"
    x = dataset_from_config(small_study.dataset, download=False).x_test[:200]
    with torch.no_grad():
        ts_out = torch.jit.load(str(with_ts / "model.ts"))(x)
        pt2_out = torch.export.load(str(with_ts / "model.pt2")).module()(x)
    assert float((ts_out - pt2_out).abs().max()) <= 1e-5, f"model.ts and model.pt2 differ by {float((ts_out - pt2_out).abs().max()):.3g}"
    for name in ("model.pt2", "model.onnx", "weights.safetensors", "trial.json"):
        assert (plain / name).read_bytes() == (with_ts / name).read_bytes(), f"--torchscript must not change {name}"


def test_failed_verification_exits_1_writing_nothing(small_study, tmp_path):
    """A checkpoint whose model does not reproduce the recorded accuracy is refused, nothing written."""
    import dataclasses

    cfg = copy_study(small_study, tmp_path)
    view, row, _ = _checkpoint_trial(cfg, "mismatch_fixture", {"kind": "linear"})
    wrong = dataclasses.replace(row, metrics={**row.metrics, "accuracy": row.metrics["accuracy"] + 0.1})
    from automl._export import ExportError, export_trial
    from automl._measure import LatencySettings

    out = tmp_path / "exports" / "mismatch"
    with pytest.raises(ExportError, match=r"verification failed: the exported onnxruntime model's test accuracy .* != recorded") as info:
        export_trial(view, wrong, out, study_dir=cfg.study_dir, load_data=lambda: dataset_from_config(cfg.dataset, download=False), latency=LatencySettings(warmup=1, repeats=3), measure_latency=False)
    assert info.value.code == 1, f"a failed verification exits 1, got {info.value.code}"
    assert not (tmp_path / "exports").exists(), f"nothing may be written, found {list((tmp_path / 'exports').rglob('*'))}"


def test_export_of_a_derived_exit_setting_ships_its_own_thresholds_and_numbers(small_study, tmp_path):
    """A derived trial (another threshold setting of an early-exit model) exports its own model:
    its thresholds in model.pt2 and model.onnx, its accuracy re-verified, its own latency recorded."""
    import onnx
    from onnx import numpy_helper

    view = load_view(optuna.load_study(study_name=small_study.name, storage=small_study.storage_url))
    derived = [r for r in view.trials if r.attrs.get("derived_from") is not None]
    assert derived, f"the small study's exits trial recorded no derived setting: {[(r.number, r.method) for r in view.trials]}"
    parent = {r.number: r for r in view.trials}
    row = next((r for r in derived if r.attrs["state"]["thresholds"] != parent[r.attrs["derived_from"]].attrs.get("notes")), derived[0])
    own = row.attrs["state"]["thresholds"]
    parent_row = parent[row.attrs["derived_from"]]
    out = tmp_path / "derived"
    result = CliRunner().invoke(app, ["export", str(small_study.study_dir), "--trial", str(row.number), "--out", str(out)])
    assert result.exit_code == 0, f"export of derived trial {row.number} failed: {result.output}"
    card = json.loads((out / "card.json").read_text())
    assert card["derived_from"] == parent_row.number, f"card must name the parent: {card['derived_from']}"
    assert card["notes"]["calibrated"]["thresholds"] == pytest.approx(own), f"card thresholds {card['notes']['calibrated']} != the variant's {own}"
    ts = _program_thresholds(out)
    init = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    in_onnx = [v[:-1].tolist() for k, v in init.items() if k.endswith("thresholds")]
    assert ts == pytest.approx(own) and in_onnx == [pytest.approx(own)], f"shipped thresholds model.pt2 {ts} / ONNX {in_onnx} != the variant's {own}"
    assert card["metrics"]["exported"]["accuracy"] == pytest.approx(row.metrics["accuracy"], abs=1e-12), "the variant's accuracy must be re-verified on its own model"
    assert card["metrics"]["recorded"]["latency_ms"] == row.metrics["latency_ms"] != parent_row.metrics["latency_ms"], (
        f"the variant's latency {row.metrics['latency_ms']} must be its own, not the parent's {parent_row.metrics['latency_ms']}"
    )
    parent_ts = _program_thresholds(small_study.study_dir / parent_row.checkpoint)
    if parent_ts != pytest.approx(own):
        assert ts != pytest.approx(parent_ts), "the export must not carry the parent's thresholds"


def _program_thresholds(folder: Path) -> list[float]:
    """The exit thresholds (all but the last, which always exits) in ``folder/model.pt2``."""
    buffers = [v for k, v in torch.export.load(str(folder / "model.pt2")).module().named_buffers() if k.endswith("thresholds")]
    assert len(buffers) == 1, f"{folder}/model.pt2 must hold one thresholds buffer, has {len(buffers)}"
    return buffers[0][:-1].tolist()


# --- the steps of an export, on constructed inputs ------------------------------------------


def _row(metrics, number=3):
    from automl._pareto import FrontRow

    return FrontRow(number=number, method="none", params={}, metrics=metrics)


def test_recorded_metrics_prefer_the_study_and_need_an_accuracy():
    from automl._export import ExportError, _recorded_metrics

    got = _recorded_metrics(_row({"accuracy": 0.9, "latency_ms": None}), {"metrics": {"accuracy": 0.1, "latency_ms": 2.0, "macs": 7}})
    assert got == {"accuracy": 0.9, "latency_ms": 2.0, "macs": 7}, "the study's value wins; the record fills what the study lacks"
    with pytest.raises(ExportError, match="trial 3 has no recorded accuracy to verify against") as raised:
        _recorded_metrics(_row({"accuracy": None}), {"metrics": {}})
    assert raised.value.code == 2


@pytest.mark.parametrize(
    "record,files,runtime",
    [({"runtime": "eager"}, ["model.onnx"], "eager"), ({}, ["model.onnx", "model.ts"], "onnxruntime"), ({}, ["model.ts"], "torchscript"), ({}, [], "eager")],
)
def test_checkpoint_runtime_is_the_records_else_the_files(tmp_path, record, files, runtime):
    from automl._export import _checkpoint_runtime

    for name in files:
        (tmp_path / name).write_bytes(b"")
    assert _checkpoint_runtime(tmp_path, record) == runtime


def test_accuracy_matches_counts_correct_samples():
    from automl._export import _accuracy_matches

    # 360 samples: one sample is 1/360 of accuracy; equal counts match, one sample apart does not.
    assert _accuracy_matches(300 / 360, 300 / 360 + 1e-12, 360)
    assert not _accuracy_matches(300 / 360, 301 / 360, 360)


def test_staging_renames_into_place_or_leaves_nothing(tmp_path):
    from automl._export import _staging

    out = tmp_path / "new" / "export"
    with pytest.raises(RuntimeError, match="check failed"):
        with _staging(out) as tmp:
            (tmp / "card.json").write_text("{}")
            raise RuntimeError("check failed")
    assert not (tmp_path / "new").exists(), "a failed export removes its staging folder and the parent it made"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stale.txt").write_text("x")
    with _staging(tmp_path / "old") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".old.partial-")
        (tmp / "card.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["card.json"], "a finished export replaces the old folder whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "no staging folder is left"


def test_copy_checkpoint_files_copies_what_exists_readable_by_all(tmp_path):
    import stat

    from automl._checkpoint import RECORD, WEIGHTS
    from automl._export import _copy_checkpoint_files

    src, dst = tmp_path / "ckpt", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    for name in (WEIGHTS, RECORD, "model.pt2"):
        (src / name).write_bytes(name.encode())
        (src / name).chmod(0o600)
    _copy_checkpoint_files(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == sorted([WEIGHTS, RECORD, "model.pt2"])
    assert all((dst / n).read_bytes() == n.encode() and stat.S_IMODE((dst / n).stat().st_mode) == 0o644 for n in (WEIGHTS, RECORD, "model.pt2"))


ORT_RUN = r"""
import json, sys
import numpy as np
import onnxruntime as ort
folder, x = sys.argv[1], np.load(sys.argv[2])
sess = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
np.save(sys.argv[3], sess.run(None, {sess.get_inputs()[0].name: x})[0])
print(json.dumps({"torch_loaded": "torch" in sys.modules}))
"""


def test_a_checkpoint_with_onnx_external_data_exports_every_file_and_runs_fresh(tmp_path, monkeypatch):
    """A model too large for one ONNX file (torch's threshold lowered to 0 here) checkpoints and
    exports its weights file too: the exported folder alone runs in a fresh ONNX Runtime process
    and computes the model, and the card and README name the data file."""
    from torch.onnx._internal.exporter import _onnx_program

    from automl._artifact import build_artifact, onnx_files
    from automl._checkpoint import RECORD, WEIGHTS, _write
    from automl._export import _copy_checkpoint_files, _usage
    from tests.conftest import make_base

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    model = make_base("digits_cnn", (1, 8, 8))
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    work, ckpt, out = tmp_path / "work", tmp_path / "ckpt", tmp_path / "out"
    artifact = build_artifact(model, x[:1], work)
    _write(ckpt, model.state_dict(), work, {"format": 1})
    out.mkdir()
    _copy_checkpoint_files(ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, RECORD, "model.pt2", "model.onnx", "model.onnx.data"]), "export must carry the ONNX weights file"
    assert all((out / n).read_bytes() == (work / n).read_bytes() for n in ("model.onnx", "model.onnx.data")), "byte for byte what the trial measured"
    assert sum(f.stat().st_size for f in onnx_files(out / "model.onnx")) == artifact.size_bytes, "the exported files are the bytes the trial recorded"

    np.save(tmp_path / "x.npy", x.numpy())
    alone = tmp_path / "alone"
    out.rename(alone)  # the folder alone, moved: nothing may point back at the checkpoint
    assert _fresh(ORT_RUN, str(alone), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")) == {"torch_loaded": False}
    with torch.no_grad():
        diff = np.abs(np.load(tmp_path / "y.npy") - model(x).numpy()).max()
    assert diff < 1e-4, f"the exported ONNX differs from the model by {diff:.2e}"

    env = {"latency": {"runtime": "onnxruntime", "device": "cpu", "batch_size": 1, "threads": 1}}
    card = {
        "trial": 0, "study": "s", "method": "none", "input_shape": [1, 8, 8], "onnx": {}, "environment": env, "metrics": {"recorded": {}, "exported": {}},
        "files": {"weights": WEIGHTS, "onnx": "model.onnx", "onnx_external_data": ["model.onnx.data"], "pt2": "model.pt2"},
    }
    assert "`model.onnx.data`" in _usage(card).split("## ONNX Runtime", 1)[1], "the README must say the weights file stays beside model.onnx"
    card["files"]["onnx_external_data"] = []
    assert "external data" not in _usage(card), "a one-file ONNX model needs no note"


def test_an_onnx_file_made_at_export_ships_with_its_data_or_not_at_all(digits, tmp_path, monkeypatch):
    """Where the trial did not time ONNX Runtime, export makes model.onnx from model.pt2: written
    with its external data (threshold lowered to 0), and removed with it when it does not match."""
    from torch.onnx._internal.exporter import _onnx_program

    from automl._export import _Rebuilt, _verify_onnx
    from automl._onnx import export_program
    from tests.conftest import make_base

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    model = make_base("digits_cnn", tuple(digits.input_shape))
    torch.export.save(export_program(model, digits.example()), str(tmp_path / "model.pt2"))
    reference = torch.export.load(str(tmp_path / "model.pt2")).module()
    info = _verify_onnx(tmp_path, _Rebuilt(model), reference, "model.pt2", digits, onnx_measured=False, quantized=False, log=lambda _m: None)
    assert info["status"] == "ok" and info["max_abs_diff_vs_torch"] <= 1e-4, info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "model.pt2"], "the ONNX file and its data, nothing else"

    info = _verify_onnx(tmp_path, _Rebuilt(model), lambda x: reference(x) + 1.0, "model.pt2", digits, onnx_measured=False, quantized=False, log=lambda _m: None)
    assert info["status"] == "rejected", info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"], "an ONNX file that is not shipped leaves no data file behind"
