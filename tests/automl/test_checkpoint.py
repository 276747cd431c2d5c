"""Checkpoint = plan + weights, registry-driven: for every method on the two built-in CNNs, the
model :func:`automl.load_model` rebuilds from a saved checkpoint computes what the saved model
computed, and nothing in the folder needs unpickling."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import searchspace
from automl import load_model
from automl._checkpoint import FLOAT_FOLDER, WEIGHTS, CheckpointError, save_checkpoint, variant_folder, weights_only_state
from automl._measure import Metrics
from automl._trial import TrialOutcome, Variant, apply_chain
from searchspace import Calibrated, Plan
from tests.conftest import make_base, random_context, sample_params

SMALL = [("digits_cnn", (1, 8, 8)), ("mnist1d_cnn", (40,))]
#: The tolerance of a rebuilt float model's outputs (the brief's 1e-5; in practice they are equal).
ATOL = 1e-5


def _perturb(seed: int):
    """Stands in for training: every float tensor moves by a distinct amount, so a weight that is
    not loaded (left at its initial value) shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)

    def fit(module, **_):
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_floating_point() and t.numel() and torch.isfinite(t).all():
                    t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.05)
        return module

    return fit


def _int8(v) -> bool:
    """A quantised tensor, packed weights, or a (dynamic int8) tuple holding one."""
    if isinstance(v, (tuple, list)):
        return any(_int8(e) for e in v)
    return isinstance(v, torch.ScriptObject) or (isinstance(v, torch.Tensor) and v.is_quantized)


def _metrics() -> Metrics:
    # Not under test here: the checkpoint stores them as given.
    return Metrics(accuracy=math.nan, params=0, size_bytes=0, macs=None, latency_ms=math.nan, latency_iqr_ms=math.nan)


def _ref(model_name, shape):
    return {"model": model_name, "options": {}, "input_shape": list(shape), "num_classes": 10}


def _forbid_unpickling(monkeypatch):
    """Any unrestricted ``torch.load`` or ``pickle.load`` during the rebuild fails the test."""
    import pickle

    real = torch.load

    def guarded(*args, **kwargs):
        assert kwargs.get("weights_only", True) is True, "load_model must not unpickle without weights_only"
        return real(*args, **kwargs)

    def no_pickle(*_a, **_k):
        raise AssertionError("load_model must not unpickle")

    monkeypatch.setattr(torch, "load", guarded)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)


@pytest.mark.parametrize("model_name,shape", SMALL, ids=[m for m, _ in SMALL])
@pytest.mark.parametrize("name", searchspace.list_methods())
def test_every_method_round_trips_through_its_checkpoint(name, model_name, shape, tmp_path, monkeypatch):
    method = searchspace.get_method(name)()
    # A trained base, as in a study: its weights are not those a fresh build starts from, so a
    # weight the rebuild does not load (a post-training stage's packed int8 weights too) shows.
    base = _perturb(3)(make_base(model_name, shape))
    if method.supports(base) is not None:
        pytest.skip(f"{name} does not apply to {model_name}")
    ctx = random_context(shape, base, seed=5)
    params = sample_params(method, seed=5)[0]
    # Post-training stages follow a fine-tuned structure stage in a study; alone, they start from the base.
    plan = Plan(chain=((name, params),))
    kept: dict = {}
    model, _ = apply_chain(plan, base, example=ctx.example_input, calibration=ctx.calibration, train=_perturb(7), keep=kept)
    if model is base:
        model = _perturb(8)(base)
    model = model.cpu().eval()
    x = torch.cat([b for b, _ in ctx.calibration()])
    variants = []
    if isinstance(model, Calibrated):
        y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
        options = model.calibrate(x, y)
        assert len(options) > 1, f"{name}: fixture needs a second operating point"
        model.use_setting(options[-1])
        variants.append(Variant(dict(options[-1]["params"]), dict(options[-1]["state"]), _metrics(), tmp_path / "none", copy.deepcopy(weights_only_state(model))))
        with torch.no_grad():
            variant_out = model(x)
        model.use_setting(options[0])
    with torch.no_grad():
        expected = model(x)
    outcome = TrialOutcome(
        plan=plan, metrics=_metrics(), model=model, folder=tmp_path / "artifact", input_shape=shape, variants=variants,
        float_model=kept.get("float"), float_stages=kept.get("stages", 0),
    )
    folder = save_checkpoint(outcome, tmp_path / "checkpoint", base=_ref(model_name, shape))

    files = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".pickle"))], f"{name}: pickled files in the checkpoint: {files}"
    _forbid_unpickling(monkeypatch)
    rebuilt = load_model(folder)
    with torch.no_grad():
        got = rebuilt(x)
    quantized = any(_int8(v) for v in model.state_dict().values())
    if quantized:
        assert torch.equal(got.argmax(1), expected.argmax(1)), f"{name} on {model_name}: rebuilt int8 model predicts differently"
    diff = float((got - expected).abs().max())
    assert diff <= ATOL, f"{name} on {model_name}: rebuilt model differs by max |diff| {diff:.3g} (allowed {ATOL:g})"
    assert (folder / FLOAT_FOLDER).is_dir() == (not method.finetune), f"{name}: float/ must exist exactly for post-training stages"
    if not method.finetune:
        # The float model the post-training stage started from (what finalize fine-tunes).
        with torch.no_grad():
            diff_f = float((load_model(folder / FLOAT_FOLDER)(x) - kept["float"](x)).abs().max())
        assert diff_f <= ATOL, f"{name} on {model_name}: rebuilt float model differs by {diff_f:.3g}"
    for k, _v in enumerate(variants):
        with torch.no_grad():
            got_v = load_model(folder / variant_folder(k))(x)
        diff_v = float((got_v - variant_out).abs().max())
        assert diff_v <= ATOL, f"{name} on {model_name}: rebuilt variant {k} differs by {diff_v:.3g}"
        assert diff_v < float((got - variant_out).abs().max()) or torch.equal(variant_out, expected), f"{name}: variant {k} must carry its own thresholds"


def test_weights_that_do_not_fit_the_plan_and_old_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    shape = (40,)
    base = make_base("mnist1d_cnn", shape)
    plan = Plan(chain=(("prune", {"criterion": "l1", "ratio": 0.5, "per_stage": False}),))
    ctx = random_context(shape, base)
    model, _ = apply_chain(plan, base, example=ctx.example_input, calibration=ctx.calibration, train=_perturb(0))
    folder = save_checkpoint(TrialOutcome(plan=plan, metrics=_metrics(), model=model.eval(), folder=tmp_path / "a", input_shape=shape), tmp_path / "c", base=_ref("mnist1d_cnn", shape))
    record = json.loads((folder / "trial.json").read_text())
    # The plan says 50 % pruned; weights of another ratio have other shapes.
    record["plan"]["chain"][0]["params"]["ratio"] = 0.25
    (folder / "trial.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(folder)
    record["plan"]["chain"][0]["params"]["ratio"] = 0.5
    (folder / "trial.json").write_text(json.dumps(record))
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(folder / WEIGHTS))
    layout = json.loads(meta["automl.layout"])
    dropped = next(iter(layout))
    del layout[dropped]
    save_file(tensors, str(folder / WEIGHTS), metadata={**meta, "automl.layout": json.dumps(layout)})
    with pytest.raises(CheckpointError, match="1 entries missing"):
        load_model(folder)
    (folder / WEIGHTS).unlink()
    (folder / "weights.pt").write_bytes(b"old")
    with pytest.raises(CheckpointError, match="predates the checkpoint format"):
        load_model(folder)


def test_drift_check_of_the_eager_runtime_times_the_rebuilt_module(digits, tmp_path):
    """The eager runtime has no artifact file: the drift check re-times the module load_model rebuilds."""
    import optuna

    from automl._latency import LatencySettings
    from automl._records import write_trial
    from automl._search import check_drift
    from automl._study import Payload
    from automl._trial import TrialSettings

    shape = tuple(digits.input_shape)
    base = make_base("digits_cnn", shape)
    plan = Plan(chain=(("prune", {"criterion": "l1", "ratio": 0.5, "per_stage": False}),))
    ctx = random_context(shape, base)
    model, _ = apply_chain(plan, base, example=ctx.example_input, calibration=ctx.calibration, train=_perturb(0))
    folder = save_checkpoint(TrialOutcome(plan=plan, metrics=_metrics(), model=model.eval(), folder=tmp_path / "a", input_shape=shape), tmp_path / "checkpoints" / "trial_00000", base=_ref("digits_cnn", shape))
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["accuracy", "latency_ms"])
    # Recorded 1000 s per sample: the re-timed module (milliseconds) drifts by about -100 %.
    write_trial(study, None, state=optuna.trial.TrialState.COMPLETE, objectives=("accuracy", "latency_ms"), metrics={"accuracy": 0.5, "latency_ms": 1e6}, checkpoint="checkpoints/trial_00000")
    settings = TrialSettings(epochs=0, lr=0.0, batch_size=64, latency=LatencySettings(runtime="eager", warmup=1, repeats=3))
    payload = Payload(data=digits.head("test", 50), base=base, settings=settings, methods={}, cpus=1, gpus=0)
    lines: list[str] = []
    drift = check_drift(study, tmp_path, payload, log=lines.append)
    assert list(drift) == [0] and -1.0 < drift[0] < -0.99, f"expected the rebuilt module re-timed (drift ~ -1), got {drift} / {lines}"
    assert folder.is_dir()
