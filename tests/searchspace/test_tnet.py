"""T-Net: exact at full ranks, parameters = core + factors, one shared tensor per group."""

from __future__ import annotations

import math

import torch

import searchspace
from automl import build_model
from automl._measure import param_count
from searchspace import ApplyContext
from searchspace.methods.tnet import TNetConv1d, TuckerTensor, group_convs
from tests.conftest import make_base

HALF = {"rank_layers": 0.5, "rank_out": 0.5, "rank_in": 0.5, "rank_kernel": 1.0}


def test_full_rank_reconstruction_equals_the_stacked_kernels():
    base = build_model("digits_cnn", input_shape=(1, 8, 8), num_classes=10, options={"depth": 2})
    groups, _ = group_convs(base)
    assert groups, "a depth-2 digits CNN has repeated same-shaped convolutions"
    for names in groups:
        stacked = torch.stack([base.get_submodule(n).weight.detach() for n in names])
        tensor = TuckerTensor.from_tensor(stacked, list(stacked.shape)).eval()
        err = (tensor.full() - stacked).abs().max().item()
        assert err < 1e-4, f"group {names}: full-rank reconstruction differs by {err}"


def test_parameter_count_is_core_plus_factors():
    shape, ranks = (3, 16, 12, 3, 3), (2, 5, 4, 3, 2)
    t = TuckerTensor(shape=shape, ranks=ranks)
    expected = math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))
    assert t.param_count() == expected == param_count(t), f"{t.param_count()} / {param_count(t)} != {expected}"


def test_apply_shares_one_tensor_and_counts_it_once():
    base = make_base("mnist1d_cnn", (40,))
    ctx = ApplyContext(example_input=torch.randn(1, 40))
    out = searchspace.get_method("tnet")().apply(base, HALF, context=ctx)
    layers = [m for m in out.modules() if isinstance(m, TNetConv1d)]
    assert len(layers) == 2, f"the two 25->25 convs must be converted, got {len(layers)}"
    assert layers[0].tensor is layers[1].tensor, "layers of a group must share one tensor"
    (group,) = ctx.notes["tnet.groups"].values()
    dense = sum(base.get_submodule(n).weight.numel() for n in group["layers"])
    expected = param_count(base) - dense + layers[0].tensor.param_count()
    assert param_count(out) == expected, f"params {param_count(out)} != base - dense kernels + core + factors = {expected}"


def test_trains_end_to_end_and_eval_cache_follows_updates():
    base = make_base("mnist1d_cnn", (40,))
    out = searchspace.get_method("tnet")().apply(base, HALF, context=ApplyContext(example_input=torch.randn(1, 40)))
    tensor = next(m for m in out.modules() if isinstance(m, TNetConv1d)).tensor
    x = torch.randn(8, 40)
    out.train()
    out(x).square().mean().backward()
    assert tensor.core.grad is not None and tensor.core.grad.abs().sum() > 0, "no gradient reaches the shared core"
    out.eval()
    with torch.no_grad():
        before = out(x)
        tensor.core.mul_(2)
        after = out(x)
    assert not torch.allclose(before, after), "the eval-mode kernel cache must notice a changed core"


def test_supports_names_what_is_missing():
    reason = searchspace.get_method("tnet")().supports(make_base("digits_cnn", (1, 8, 8)))
    assert reason and "share a weight shape" in reason, f"unexpected reason {reason!r}"


def test_search_domain_compresses_the_layer_mode_of_a_two_layer_group():
    import optuna

    method = searchspace.get_method("tnet")()
    low = method.ranges["rank_layers"].low
    params = method.space(optuna.trial.FixedTrial({"tnet.rank_layers": low, "tnet.rank_out": 1.0, "tnet.rank_in": 1.0, "tnet.rank_kernel": 1.0}))
    base = make_base("mnist1d_cnn", (40,))
    ctx = ApplyContext(example_input=torch.randn(1, 40))
    out = method.apply(base, params, context=ctx)
    (group,) = ctx.notes["tnet.groups"].values()
    assert len(group["layers"]) == 2 and group["ranks"][0] == 1, f"the search's lowest rank_layers={low} must cut a 2-layer group to layer rank 1, got {group}"
    layers = [m for m in out.eval().modules() if isinstance(m, TNetConv1d)]
    stacked = torch.stack([m.weight.detach().flatten() for m in layers])
    s = torch.linalg.svdvals(stacked)
    assert s[1] < 1e-4 * s[0], f"at layer rank 1 the two kernels must be multiples of one kernel, singular values {s.tolist()}"
    assert param_count(out) < param_count(base), f"layer rank 1 must save parameters: {param_count(out)} >= {param_count(base)}"
