"""The base's sensitivity profile and the per-layer allocations read from it.

- :func:`searchspace._profile.allocate` on a hand-made table (closed-form answer);
- ``global`` counts equal Torch-Pruning's own ``global_pruning=True`` on the same scores;
- a net whose first layer is made redundant (each channel duplicated by a copy 100x smaller that
  the next layer does not read) and whose second carries the signal alone: the profile sees the
  redundant layer's channels as free, ``sensitivity`` removes them first (the pruned net computes
  what the base computed), ``uniform`` cuts the signal layer too;
- the dry run's params, size and MACs equal the trained model's for every allocation, and the
  checkpoint (which keeps the profile) rebuilds the trained structure;
- the profile is measured once per study, in a Ray task with the trial resources: preparing it
  again (what ``resume`` does) reads it back.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch_pruning as tp
from torch import nn

import searchspace
from automl._checkpoint import save_checkpoint
from automl._config import StudyConfig
from automl._measure import param_count
from automl._prescreen import dry_run
from automl._rebuild import load_model
from automl._sensitivity import PROFILE, PROFILE_FILE, compute_profile, merge_parts, profiled_methods
from automl._train import TrainOptions, fit
from automl._trial import run_trial
from searchspace import ApplyContext, LayerLevel, Plan, SensitivityProfile
from searchspace._profile import allocate, global_counts
from searchspace.methods.prune import MAX_GLOBAL_RATIO, L1Filter, prunable_output_layers
from tests.automl.test_prescreen import SETTINGS
from tests.conftest import make_base

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Compute with one thread, as a study's processes do by default (``resources.cpus: 1``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OPEN = {"prune": {"allocation": ["uniform", "global", "sensitivity"]}, "tucker": {"allocation": ["uniform", "sensitivity"]}, "int8": {"keep_float": [0, 2]}}


def opened() -> dict[str, searchspace.CompressionMethod]:
    """prune and tucker with every allocation open, int8 with keep_float (the defaults: uniform, 0)."""
    return {n: searchspace.get_method(n)(ranges=searchspace.get_method(n).narrowed(o)) for n, o in OPEN.items()}


def test_allocation_defaults_to_uniform_and_a_uniform_plan_is_written_as_before():
    prune, tucker = searchspace.get_method("prune")(), searchspace.get_method("tucker")()
    assert not prune.needs_profile() and not tucker.needs_profile(), "a config that does not name allocation must not need a profile"
    fixed = optuna_fixed({"prune.criterion": "l1", "prune.per_stage": False, "prune.ratio": 0.3})
    assert prune.space(fixed) == {"criterion": "l1", "per_stage": False, "ratio": 0.3}
    assert prune.ranges["ratio"].high == 0.7, "a config that does not name prune.ratio samples it up to 0.7"
    wide = searchspace.get_method("prune").narrowed({"ratio": [0.1, 0.9]})["ratio"]
    assert wide.high == 0.9, "a config may open prune.ratio to 0.9, as deep as the profile's levels and a share near 1 reach"
    opened_prune = opened()["prune"]
    assert opened_prune.needs_profile()
    sens = opened_prune.space(optuna_fixed({"prune.criterion": "l1", "prune.allocation": "sensitivity", "prune.share": 0.8}))
    assert sens == {"criterion": "l1", "allocation": "sensitivity", "share": 0.8}, sens


def optuna_fixed(params):
    import optuna

    return optuna.trial.FixedTrial(params)


def test_allocate_picks_the_least_loss_per_parameter_one_level_at_a_time():
    rows = {
        # a: cheap to compress, b: costly; c saves nothing per accuracy point until its second level
        "a": (LayerLevel(0.25, 0.90, 100, 0), LayerLevel(0.5, 0.89, 200, 0)),
        "b": (LayerLevel(0.25, 0.80, 100, 0), LayerLevel(0.5, 0.70, 200, 0)),
        "c": (LayerLevel(0.25, 0.88, 50, 0), LayerLevel(0.5, 0.88, 400, 0)),
    }
    # Slopes from the start: a 0/100, b 0.1/100, c 0.02/50. a first (0), then a->0.5 (0.01/100 = 1e-4)
    # vs c (4e-4): a again; then c (4e-4), then c->0.5 (0/350): 650 saved.
    levels, saved = allocate(rows, base_accuracy=0.90, target_saved=600)
    assert levels == {"a": 0.5, "c": 0.5} and saved == 600, (levels, saved)
    levels, saved = allocate(rows, base_accuracy=0.90, target_saved=150)
    assert levels == {"a": 0.5} and saved == 200, (levels, saved)
    levels, saved = allocate(rows, base_accuracy=0.90, target_saved=10_000)
    assert levels == {"a": 0.5, "b": 0.5, "c": 0.5} and saved == 800, "an unreachable target compresses everything to its last level"
    assert allocate(rows, base_accuracy=0.90, target_saved=0) == ({}, 0)

    # Layers that share parameters (a pruned layer and the next one both shrink the weights
    # between them): the exact saving is less than the sum, so more moves are taken. Moves in
    # order: a0.25, a0.5, c0.25, c0.5, b0.25, b0.5; a and c share level_a * level_c * 160
    # parameters, so the exact savings are 100, 200, 230, 560, 660, 760 (the sums: ..., 600, 700, 800).
    def shared(levels):
        own = sum(next(e.params_saved for e in rows[n] if e.level == lv) for n, lv in levels.items())
        return own - int(levels.get("a", 0) * levels.get("c", 0) * 160)

    calls = []
    levels, saved = allocate(rows, base_accuracy=0.90, target_saved=600, saved_by=lambda lv: calls.append(dict(lv)) or shared(lv))
    assert levels == {"a": 0.5, "b": 0.25, "c": 0.5} and saved == 660, (levels, saved, "c at 0.5 saves 560 < 600 exactly: b at 0.25 must be taken too")
    assert len(calls) <= 4, f"the count is found by bisection over 6 moves, not move by move: {calls}"
    levels, saved = allocate(rows, base_accuracy=0.90, target_saved=10_000, saved_by=shared)
    assert levels == {"a": 0.5, "b": 0.5, "c": 0.5} and saved == 760, (levels, saved)


def test_global_counts_equal_torch_prunings_global_ranking():
    base = make_base("digits_cnn", (1, 8, 8))
    example = torch.randn(1, 1, 8, 8)
    prune = opened()["prune"]
    scores = prune.profile_extra(base, example)["scores"]
    ratio = 0.3
    counts = global_counts(scores, ratio, max_ratio=MAX_GLOBAL_RATIO)
    assert all(k < len(scores[n]) * MAX_GLOBAL_RATIO for n, k in counts.items()), "the cap must not bind on this case"

    class Normalised(L1Filter):
        def __call__(self, group):
            imp = super().__call__(group)
            return None if imp is None else imp / imp.mean()

    reference = searchspace._surgery.clone(base)
    before = {n: m.out_channels for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)}
    ignored = prunable_output_layers(reference, example)
    tp.pruner.MetaPruner(reference, example, importance=Normalised(), pruning_ratio=ratio, global_pruning=True, ignored_layers=ignored).step()
    theirs = {n: before[n] - m.out_channels for n, m in reference.named_modules() if isinstance(m, nn.Conv2d) and n in scores}
    assert counts == theirs, f"global counts {counts} != Torch-Pruning's {theirs}"
    from automl._sensitivity import SensitivityProfile

    profile = SensitivityProfile(base_accuracy=0.0, base_params=param_count(base), base_macs=0, layers={"prune": {n: () for n in scores}}, extra={"prune": {"scores": scores}})
    ctx = ApplyContext(example_input=example, profile=profile)
    out = prune.apply(base, {"criterion": "l1", "allocation": "global", "ratio": ratio}, context=ctx)
    mine = {n: before[n] - m.out_channels for n, m in out.named_modules() if isinstance(m, nn.Conv2d) and n in scores}
    assert mine == theirs, f"prune allocation=global removed {mine}, Torch-Pruning {theirs}"


class TwoLayers(nn.Module):
    def __init__(self, c1: int = 8, c2: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * c2, 10))

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def redundant(model: TwoLayers, scale: float = 0.01) -> TwoLayers:
    """``model`` with conv1's channels duplicated: each copy is ``scale`` times the original and
    conv2 reads only the originals, so the net computes exactly what ``model`` computes, the copies
    carry nothing, and their filters have the smallest L1 norms (the criterion the profile uses)."""
    c1, c2 = model.conv1.out_channels, model.conv2.out_channels
    out = TwoLayers(2 * c1, c2)
    with torch.no_grad():
        out.conv1.weight.copy_(torch.cat([model.conv1.weight, scale * model.conv1.weight]))
        out.conv1.bias.copy_(torch.cat([model.conv1.bias, scale * model.conv1.bias]))
        out.conv2.weight.copy_(torch.cat([model.conv2.weight, torch.zeros_like(model.conv2.weight)], dim=1))
        out.conv2.bias.copy_(model.conv2.bias)
        out.head.load_state_dict(model.head.state_dict())
    return out.eval()


def test_sensitivity_removes_the_redundant_layer_first_and_uniform_does_not(digits):
    torch.manual_seed(0)
    small = TwoLayers()
    fit(small, digits, TrainOptions(epochs=8, lr=1e-2, batch_size=64))
    base = redundant(small.eval())
    x, y = digits.tensors("test")
    with torch.no_grad():
        assert torch.allclose(base(x), small(x), atol=1e-4), "the duplicated net must compute what the small one does"
        base_correct = int((base(x).argmax(1) == y).sum())
    prune = opened()["prune"]
    profile = compute_profile(base, digits, {"prune": prune}, batch_size=100, seed=0)
    rows = profile.rows("prune")
    assert set(rows) == {"conv1", "conv2"}, rows
    free = [e.level for e in rows["conv1"] if e.accuracy == profile.base_accuracy]
    # Torch-Pruning removes 16 - int(16 * (1 - level)) channels: 4 at 0.2, 7 at 0.4 (copies only), 14 at 0.9.
    assert free[:2] == [0.2, 0.4], f"removing only copies of conv1 must cost nothing on validation, got {rows['conv1']}"
    assert rows["conv1"][-1].accuracy < profile.base_accuracy, f"removing originals of conv1 must cost accuracy, got {rows['conv1']}"
    assert all(e.accuracy < profile.base_accuracy for e in rows["conv2"]), f"every level of conv2 (the signal) must cost accuracy, got {rows['conv2']}"

    # conv1 at 0.4 removes 7 copies and conv2's matching inputs: 7*9+7 + 6*7*9 = 448 parameters.
    share = 0.9 * 448 / profile.base_params
    def pruned(params):
        ctx = ApplyContext(example_input=x[:1], calibration=lambda: iter([(x[:64], y[:64])]), profile=profile)
        return prune.apply(base, params, context=ctx), ctx.notes

    model, notes = pruned({"criterion": "l1", "allocation": "sensitivity", "share": share})
    assert notes["prune.levels"] == {"conv1": 0.4} and notes["prune.channels"] == {"conv1": [16, 9]}, notes
    with torch.no_grad():
        assert int((model(x).argmax(1) == y).sum()) == base_correct, "removing the copies must keep every test prediction's correctness"
    assert param_count(base) - param_count(model) == 448 == notes["prune.allocated_saved"]
    uniform, notes = pruned({"criterion": "l1", "per_stage": False, "ratio": share})
    assert "conv2" in notes["prune.channels"], f"uniform cuts the signal layer as much as any: {notes['prune.channels']}"


@pytest.fixture(scope="module")
def digits_profile(digits):
    base = make_base("digits_cnn", digits.input_shape)
    methods = opened()
    return base, methods, compute_profile(base, digits, profiled_methods(methods), batch_size=100, seed=0, samples=200)


def test_a_profile_measured_in_parts_is_the_profile_measured_whole(digits, digits_profile):
    """The study splits the profile across its trial slots: each part measures every n-th (method,
    layer); joined, they give the whole profile, layer order and the pruning scores included."""
    base, methods, whole = digits_profile
    parts = [compute_profile(base, digits, profiled_methods(methods), batch_size=100, seed=0, samples=200, part=i, parts=3) for i in range(3)]
    measured = [[(m, layer) for m, rows in p.layers.items() for layer, entries in rows.items() if entries] for p in parts]
    assert all(measured) and sum(map(len, measured)) == sum(map(len, whole.layers.values())), f"every layer measured by exactly one part: {measured}"
    merged = merge_parts(parts, seconds=1.5)
    assert {m: list(rows) for m, rows in merged.layers.items()} == {m: list(rows) for m, rows in whole.layers.items()}, "the parts keep the whole profile's layer order"
    assert merged.layers == whole.layers and merged.extra == whole.extra and merged.extra["prune"]["scores"]
    assert (merged.base_accuracy, merged.base_params, merged.base_macs, merged.samples, merged.seconds) == (whole.base_accuracy, whole.base_params, whole.base_macs, whole.samples, 1.5)


def test_a_copy_runs_from_its_first_changed_block_with_the_accuracy_of_a_whole_pass(digits, digits_profile, monkeypatch):
    """The base's activations at block inputs are stored once; a copy compressed at one layer runs
    from the stored input before its first changed block. Its accuracy is the whole pass's, and the
    profile is the one measured without stored activations."""
    import automl._sensitivity as sensitivity

    base, methods, cached = digits_profile
    x, y = digits.tensors("val", limit=200)
    validation = sensitivity._Validation(base, x, y, "cpu")
    assert sorted(validation.stored) == list(range(1, len(sensitivity._blocks(base)))), "every block input but the image's fits the budget"
    tucker = methods["tucker"]
    last = tucker.profile_layers(base, x[:1])[-1]
    model = tucker.compress_layer(base, last, 0.25, context=ApplyContext(example_input=x[:1]))
    ran: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, b in enumerate(sensitivity._blocks(model))]
    got = validation.accuracy(model)
    for h in hooks:
        h.remove()
    assert min(ran) > 0, f"a copy changed in its last convolution must not run its first block, ran {sorted(set(ran))}"
    with torch.no_grad():
        assert got == int((model(x).argmax(1) == y).sum()) / len(y)
    monkeypatch.setattr(sensitivity, "CACHE_BYTES", 0)
    assert not sensitivity._Validation(base, x, y, "cpu").stored
    whole = compute_profile(base, digits, profiled_methods(methods), batch_size=100, seed=0, samples=200)
    assert whole.layers == cached.layers and whole.base_accuracy == cached.base_accuracy


def test_a_model_whose_forward_is_not_its_chain_of_blocks_runs_whole(digits):
    """A staged net whose forward does more than run its blocks in order (here: doubles the logits)
    stores nothing, since the rest of the base from a stored input would not give its logits."""
    import automl._sensitivity as sensitivity

    base = make_base("digits_cnn", digits.input_shape)

    class Doubled(type(base)):  # type: ignore[misc]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    base.__class__ = Doubled
    x, y = digits.tensors("val", limit=200)
    validation = sensitivity._Validation(base, x, y, "cpu")
    assert not validation.stored
    with torch.no_grad():
        assert validation.accuracy(base) == int((base.eval()(x).argmax(1) == y).sum()) / len(y)


#: Every allocation that reads the profile, on both pruning paths (all groups at once: apoz;
#: layer by layer: thinet), and a chain in which pruning follows a structure stage.
PLANS = {
    "prune-global-apoz": (("prune", {"criterion": "apoz", "allocation": "global", "ratio": 0.4}),),
    "tucker-sensitivity+prune-sensitivity-thinet": (("tucker", {"allocation": "sensitivity", "share": 0.3}), ("prune", {"criterion": "thinet", "allocation": "sensitivity", "share": 0.2})),
    # dynamic: static int8's ONNX file stores activation zero points as varints, whose size follows
    # the calibrated ranges (a byte apart between the dry run and the trained model, keep_float or not).
    "tucker+prune-global-l1": (("tucker", {"rank_out": 0.5, "rank_in": 0.5}), ("prune", {"criterion": "l1", "allocation": "global", "ratio": 0.4})),
    "prune-sensitivity+int8-keep_float": (("prune", {"criterion": "l1", "allocation": "sensitivity", "share": 0.3}), ("int8", {"mode": "dynamic", "keep_float": 2})),
}


@pytest.mark.slow
@pytest.mark.parametrize("plan_id", list(PLANS))
def test_dry_run_and_rebuild_equal_the_trained_model_for_every_allocation(plan_id, digits, digits_profile, tmp_path):
    base, methods, profile = digits_profile
    plan = Plan(chain=PLANS[plan_id], finetune={"distill": False})
    costs = dry_run(plan, base, digits, SETTINGS, folder=tmp_path / "dry", methods=methods, profile=profile).metrics
    outcome = run_trial(plan, base, digits, SETTINGS, folder=tmp_path / "trained", methods=methods, profile=profile)
    trained = outcome.metrics
    assert (costs.params, costs.size_bytes, costs.macs) == (trained.params, trained.size_bytes, trained.macs), (
        f"{plan_id}: dry run (params, size, MACs) {(costs.params, costs.size_bytes, costs.macs)} != trained {(trained.params, trained.size_bytes, trained.macs)}"
    )
    assert trained.params < param_count(base) or "int8" in plan.label, f"{plan_id}: nothing was removed"
    folder = save_checkpoint(outcome, tmp_path / "ckpt", base={"model": "digits_cnn", "options": {}, "input_shape": list(digits.input_shape), "num_classes": 10})
    assert json.loads((folder / "trial.json").read_text())["profile"] == profile.to_dict()
    rebuilt = load_model(folder, methods=methods)
    assert param_count(rebuilt) == param_count(outcome.model), f"{plan_id}: the checkpoint rebuilt {param_count(rebuilt)} params, trained {trained.params}"


def test_pruning_after_tucker_cuts_the_replaced_layers_outputs_as_the_base_ranking_says():
    """Tucker replaces a profiled conv by first/core/last convs; its ``last`` keeps the conv's
    output channels and stands in for it, so ``global`` removes from it what it removes from the
    base's conv (the counts of :func:`global_counts` on the base's scores)."""
    base = make_base("digits_cnn", (1, 8, 8))
    example = torch.randn(1, 1, 8, 8)
    prune = opened()["prune"]
    scores = prune.profile_extra(base, example)["scores"]
    decomposed = searchspace.get_method("tucker")().apply(base, {"rank_out": 0.5, "rank_in": 0.5}, context=ApplyContext(example_input=example))
    profile = SensitivityProfile(base_accuracy=0.0, base_params=param_count(base), base_macs=0, layers={"prune": {n: () for n in scores}}, extra={"prune": {"scores": scores}})
    ctx = ApplyContext(example_input=example, profile=profile)
    prune.apply(decomposed, {"criterion": "l1", "allocation": "global", "ratio": 0.4}, context=ctx)
    stand_ins = ctx.notes.get("prune.stand_ins", {})
    assert stand_ins and all(s == f"{n}.last" for n, s in stand_ins.items()), ctx.notes
    counts = global_counts(scores, 0.4, max_ratio=MAX_GLOBAL_RATIO)
    for n, s in stand_ins.items():
        width = len(scores[n])
        assert ctx.notes["prune.channels"].get(s, [width, width]) == [width, width - counts[n]], (n, s, counts, ctx.notes["prune.channels"])
    assert any(counts[n] for n in stand_ins), f"the case must prune a stood-in layer: {counts}"


def test_a_sensitivity_plan_without_a_profile_fails_with_the_rule():
    base = make_base("digits_cnn", (1, 8, 8))
    ctx = ApplyContext(example_input=torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="prune.allocation=sensitivity needs the base's sensitivity profile"):
        opened()["prune"].apply(base, {"criterion": "l1", "allocation": "sensitivity", "share": 0.3}, context=ctx)


@pytest.mark.slow  # starts a local Ray for the profile's task
def test_the_profile_is_measured_once_per_study_and_read_back_on_resume(tmp_path, ray_session):
    import os

    import optuna
    import ray

    from automl._cluster import trial_slots
    from automl._study import prepare_study

    cfg = StudyConfig.model_validate({
        "name": "profiled", "output_dir": str(tmp_path), "dataset": {"name": "digits"},
        "base": {"model": "digits_cnn", "epochs": 1}, "methods": {"none": {}, **OPEN},
        "latency": {"warmup": 1, "repeats": 3, "min_attempts": 1, "max_attempts": 1, "isolate": False},
    })
    lines: list[str] = []
    _, launched, _ = prepare_study(cfg, log=lines.append)  # what `automl launch` prepares
    where = optuna.load_study(study_name="profiled", storage=cfg.storage_url).user_attrs[PROFILE]["where"]
    assert where["pid"] != os.getpid() and where["device"] == "cpu" and where["torch_threads"] == 1, f"the profile must be measured in a Ray task with the trial resources (1 cpu), got {where}"
    slots = trial_slots(cfg, ray.cluster_resources())
    assert len(where["parts"]) == slots and all(p["seconds"] > 0 and p["torch_threads"] == 1 for p in where["parts"]), f"one part per trial slot ({slots}), got {where['parts']}"
    written = (tmp_path / "profiled" / PROFILE_FILE).read_text()
    _, resumed, _ = prepare_study(cfg, log=lines.append)  # what `automl resume` prepares
    measured = [ln for ln in lines if ln.startswith("profile: measuring")]
    assert len(measured) == 1, f"the profile must be measured once across launch and resume, log: {lines}"
    assert any(ln.startswith("profile: read") for ln in lines), lines
    assert (tmp_path / "profiled" / PROFILE_FILE).read_text() == written
    assert launched.profile == resumed.profile and set(resumed.profile.layers) == {"prune", "tucker", "int8"}
    study = optuna.load_study(study_name="profiled", storage=cfg.storage_url)
    assert study.user_attrs[PROFILE]["file"] == PROFILE_FILE and study.user_attrs[PROFILE]["layers"]["prune"] > 0
    assert study.user_attrs[PROFILE]["where"] == where, "resume keeps the record of where the profile was measured"


def test_int8_keep_float_leaves_the_most_sensitive_layers_float(tmp_path):
    from automl._onnx import to_onnx
    from searchspace import SensitivityProfile

    base = make_base("digits_cnn", (1, 8, 8))
    int8 = opened()["int8"]
    assert int8.needs_profile() and not searchspace.get_method("int8")().needs_profile()
    layers = int8.profile_layers(base, torch.empty(0))
    assert layers == ["stages.0.0.0", "stages.0.1.0", "stages.1.0.0", "stages.1.1.0", "head.fc"], layers
    # A constructed profile: int8 costs stages.1.0.0 the most, then head.fc.
    accuracy = {"stages.1.0.0": 0.5, "head.fc": 0.7}
    profile = SensitivityProfile(base_accuracy=0.9, base_params=param_count(base), base_macs=0, layers={"int8": {n: (LayerLevel(1.0, accuracy.get(n, 0.9), 0, 0),) for n in layers}})
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = ApplyContext(example_input=x[:1], calibration=lambda: iter([(x, torch.zeros(64, dtype=torch.long))]), profile=profile)
    out = int8.apply(base, {"mode": "static", "keep_float": 1}, context=ctx)
    recipe = out.artifact_quantization
    assert recipe.keep_float == ("stages.1.0.0",) and ctx.notes["int8.kept_float"] == ["stages.1.0.0"], recipe.keep_float
    notes: dict = {}
    quantised = recipe.quantize_torch(out, notes)
    kinds = {n: type(quantised.get_submodule(n)).__module__ for n in layers if n.startswith("stages")}
    assert "quantized" not in kinds["stages.1.0.0"], f"the kept conv must stay a float module (fused with its BN and ReLU): {kinds}"
    assert all("quantized" in k for n, k in kinds.items() if n != "stages.1.0.0"), f"every other conv must be quantised: {kinds}"
    float_onnx, int8_onnx = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    to_onnx(out, x[:1], float_onnx)
    info = recipe.quantize_onnx(float_onnx, int8_onnx)
    import onnx

    graph = onnx.load(str(int8_onnx)).graph
    weight_of = {n.name: n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm")}
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    direct = sorted(w for w in weight_of.values() if w in floats)
    assert direct == ["stages.1.0.0.weight"], f"only the kept conv may read a float weight initializer, got {direct} ({info})"
    assert len(info["nodes_excluded"]) == 1, info
    with pytest.raises(ValueError, match="int8.keep_float=1 needs the base's sensitivity profile"):
        int8.apply(base, {"mode": "static", "keep_float": 1}, context=ApplyContext(example_input=x[:1]))


def test_global_and_sensitivity_prune_a_shufflenet_run_by_run():
    """ShuffleNetV2's channel shuffle keeps the whole dependency graph out: the profile's layers,
    the global scores and both allocations follow the runs that pruning uses (``prune.split``)."""
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    prune = opened()["prune"]
    layers = prune.profile_layers(base, example)
    assert layers and all(".branch" in n for n in layers), f"only convolutions inside a block's branches can be cut, got {layers}"
    scores = prune.profile_extra(base, example)["scores"]
    assert set(scores) == set(layers), (sorted(scores), layers)
    # A constructed table: one layer is free to halve, every other costs accuracy.
    free = layers[len(layers) // 2]
    rows = {n: (LayerLevel(0.5, 0.9 if n == free else 0.5, 1, 0),) for n in layers}
    profile = SensitivityProfile(base_accuracy=0.9, base_params=param_count(base), base_macs=0, layers={"prune": rows}, extra={"prune": {"scores": scores}})
    want = tuple(base(example).shape)
    for params in ({"criterion": "l1", "allocation": "global", "ratio": 0.5}, {"criterion": "l1", "allocation": "sensitivity", "share": 0.001}):
        ctx = ApplyContext(example_input=example, profile=profile)
        out = prune.apply(base, params, context=ctx)
        assert "prune.split" in ctx.notes and ctx.notes["prune.unprofiled"] == [], ctx.notes
        with torch.no_grad():
            assert tuple(out(example).shape) == want
        cut = {n.rsplit(".", 1)[0] for n in ctx.notes["prune.channels"]}
        if params["allocation"] == "global":
            assert len(ctx.notes["prune.levels"]) > 1 and param_count(out) < param_count(base), ctx.notes["prune.levels"]
        else:
            assert ctx.notes["prune.levels"] == {free: 0.5}, ctx.notes["prune.levels"]
            assert cut == {free.rsplit(".", 1)[0]}, f"only the free layer's branch may lose channels, got {ctx.notes['prune.channels']}"
            assert param_count(base) - param_count(out) == ctx.notes["prune.allocated_saved"] >= 0.001 * param_count(base)
