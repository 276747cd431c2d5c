"""Filter pruning: physically smaller models, and each criterion's choice on a case with a known answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import searchspace
from automl._measure import param_count, state_dict_bytes
from searchspace import ApplyContext
from searchspace._surgery import clone
from searchspace.methods.prune import CRITERIA, APoZ, CriticalPathGates, ThiNet, _gate_layers, _OneGroup
from tests.conftest import BASE_MODELS, make_base


def _context(x: torch.Tensor, base: nn.Module | None = None, fit=None) -> ApplyContext:
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
    half = len(x) // 2
    return ApplyContext(
        example_input=x[:1],
        calibration=lambda: iter([(x[:half], y[:half]), (x[half:], y[half:])]),
        fit=fit,
        base=base,
    )


@pytest.mark.parametrize("model_name,shape", BASE_MODELS, ids=[m for m, _ in BASE_MODELS])
def test_pruned_model_is_physically_smaller_and_runs(model_name, shape):
    base = make_base(model_name, shape)
    x = torch.randn(8, *shape)
    ctx = _context(x, base)
    out = searchspace.get_method("prune")().apply(base, {"criterion": "l1", "ratio": 0.5, "per_stage": False}, context=ctx)
    assert param_count(out) < 0.5 * param_count(base), f"{model_name}: {param_count(out)} params after 50% pruning vs {param_count(base)}"
    assert state_dict_bytes(out) < 0.5 * state_dict_bytes(base), f"{model_name}: {state_dict_bytes(out)} bytes after pruning vs {state_dict_bytes(base)}"
    assert ctx.notes["prune.channels"], f"{model_name}: notes list no pruned layer"
    with torch.no_grad():
        y = out.eval()(x)
    assert y.shape == (8, 10), f"{model_name}: pruned output shape {tuple(y.shape)} != (8, 10)"


@pytest.mark.parametrize("criterion", ["l1", "thinet"])  # thinet: the layer-by-layer path
def test_per_stage_ratios_prune_stages_differently(criterion):
    base = make_base("digits_cnn", (1, 8, 8))
    params = {"criterion": criterion, "per_stage": True, "stage_ratio_0": 0.0, "stage_ratio_1": 0.5, "stage_ratio_2": 0.0, "stage_ratio_3": 0.0}
    ctx = _context(torch.randn(8, 1, 8, 8), base)
    searchspace.get_method("prune")().apply(base, params, context=ctx)
    changed = ctx.notes["prune.channels"]
    assert changed and all(n.startswith("stages.1.") for n in changed), f"only stage 1 should shrink, got {changed}"


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    ).eval()


def _removed_channel(before: nn.Module, after: nn.Module) -> set[int]:
    """Which output channels of the first conv are gone (matched by filter direction: gates rescale)."""
    unit = lambda w: w.flatten(1) / (w.flatten(1).norm(dim=1, keepdim=True) + 1e-12)  # noqa: E731
    kept, orig = unit(after[0].weight.detach()), unit(before[0].weight.detach())
    return {c for c in range(len(orig)) if not any(torch.allclose(orig[c], k, atol=1e-5) for k in kept)}


def _prune_one(model: nn.Module, criterion: str, ctx: ApplyContext, **extra) -> nn.Module:
    return searchspace.get_method("prune")().apply(model, {"criterion": criterion, "ratio": 0.25, "per_stage": False, **extra}, context=ctx)


def test_l1_prunes_the_zeroed_filter_first():
    model = _toy()
    with torch.no_grad():
        model[0].weight[2].zero_()
    out = _prune_one(model, "l1", _context(torch.rand(16, 1, 8, 8)))
    assert _removed_channel(model, out) == {2}, f"l1 removed {_removed_channel(model, out)}, expected the zeroed filter 2"


def test_apoz_prunes_the_always_dead_channel_first():
    model = _toy()
    with torch.no_grad():
        model[0].weight[1].mul_(10)  # the largest filter: l1 would keep it
        model[0].bias[1] = -1e3  # ...but ReLU zeroes it on every input
    x = torch.rand(16, 1, 8, 8)
    out = _prune_one(model, "apoz", _context(x))
    assert _removed_channel(model, out) == {1}, f"apoz removed {_removed_channel(model, out)}, expected dead channel 1"
    assert _removed_channel(model, _prune_one(model, "l1", _context(x))) != {1}, "the case must separate apoz from l1"


def test_thinet_prunes_the_channel_the_next_layer_ignores():
    model = _toy()
    with torch.no_grad():
        model[0].weight[3].mul_(10)  # large filter, large activations...
        model[2].weight[:, 3].zero_()  # ...that the next layer never reads
    x = torch.rand(16, 1, 8, 8)
    out = _prune_one(model, "thinet", _context(x))
    assert _removed_channel(model, out) == {3}, f"thinet removed {_removed_channel(model, out)}, expected ignored channel 3"


def _algorithm1_by_running_the_layer(conv: nn.Conv2d, x: torch.Tensor) -> list[int]:
    """ThiNet's Algorithm 1 taken literally: grow the removed set T one channel at a time, each time
    the channel i minimising ||sum_{j in T+{i}} x_j||^2, where that sum is measured by running the
    layer (no bias) on the input with every channel but T+{i} zeroed, at every output position."""
    c = x.shape[1]
    removed: list[int] = []
    while len(removed) < c:
        def value(i: int) -> float:
            mask = torch.zeros(1, c, 1, 1, dtype=torch.float64)
            mask[0, removed + [i]] = 1
            y = F.conv2d(x.double() * mask, conv.weight.detach().double(), None, conv.stride, conv.padding)
            return float(y.square().sum())
        removed.append(min((i for i in range(c) if i not in removed), key=value))
    return removed


def test_thinet_greedy_order_equals_algorithm_1_run_on_the_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 3, 3, padding=1)
    x = torch.randn(2, 6, 5, 5) * torch.tensor([1.0, 0.2, 3.0, 0.7, 1.5, 0.05]).view(1, 6, 1, 1)
    thinet = ThiNet(positions=10**6, rows=10**6)  # every (position, filter) row: no sampling
    a = thinet.contributions(conv, x, torch.Generator().manual_seed(0))
    assert a.shape == (2 * 25 * 3, 6), f"one row per position and filter expected, got {tuple(a.shape)}"
    greedy = ThiNet.greedy_order(a).argsort().tolist()
    brute = _algorithm1_by_running_the_layer(conv, x)
    assert greedy == brute, f"greedy removal order {greedy} != Algorithm 1 run on the layer {brute}"


def test_thinet_least_squares_is_the_normal_equation_solution_and_lowers_the_error():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(300, 1, generator=gen, dtype=torch.float64)
    kept = [0, 2, 3, 5]
    w = ThiNet.scaling(a, kept)
    y, xk = a.sum(1), a[:, kept]
    residual = y - xk @ w
    assert (xk.T @ residual).abs().max() < 1e-8, f"X^T r must vanish at the least-squares solution, got {(xk.T @ residual).tolist()}"
    before, after = float((y - xk.sum(1)).square().sum()), float(residual.square().sum())
    assert after < before, f"least squares must lower the reconstruction error: {after} >= {before} with unit weights"


def _thinet_first_group(model: nn.Module, x: torch.Tensor, least_squares: bool) -> nn.Module:
    work = clone(model)
    crit = ThiNet(positions=10**6, rows=10**6, least_squares=least_squares)
    crit.prepare(work, _context(x), {})
    pruner = tp.pruner.MetaPruner(work, x[:1], importance=_OneGroup(crit, work[0]), pruning_ratio=0.5, ignored_layers=[work[6]])
    for group in pruner.step(interactive=True):
        crit.before_prune(group)
        group.prune()
    return work


def test_thinet_rescaling_lowers_the_next_layers_reconstruction_error():
    model = _toy()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        target = model[2](model[1](model[0](x)))
    errors = {}
    for ls in (False, True):
        work = _thinet_first_group(model, x, ls)
        assert work[2].in_channels == 2, f"conv 2 should read 2 of 4 channels after pruning, got {work[2].in_channels}"
        with torch.no_grad():
            errors[ls] = float((work[2](work[1](work[0](x))) - target).square().sum())
    assert errors[True] < errors[False], f"least-squares rescaling must lower conv 2's output error: {errors}"


def test_thinet_scores_each_layer_on_the_network_pruned_before_it(monkeypatch):
    model = _toy()
    x = torch.rand(16, 1, 8, 8)
    crit = ThiNet()
    seen: dict[nn.Module, torch.Tensor] = {}
    inputs = crit._inputs

    def spy(layers):
        out = inputs(layers)
        seen.update(out)
        return out

    monkeypatch.setattr(crit, "_inputs", spy)
    monkeypatch.setitem(CRITERIA, "thinet", lambda: crit)
    out = searchspace.get_method("prune")().apply(model, {"criterion": "thinet", "ratio": 0.5, "per_stage": False}, context=_context(x))
    linear_input = next(v for m, v in seen.items() if isinstance(m, nn.Linear))
    with torch.no_grad():
        pruned_features, dense_features = out[:6](x), model[:6](x)
    # The linear layer's group is scored after conv 1's: its inputs must be the features of the
    # network with conv 1 already pruned (conv 2's kept filters are unchanged by the second cut).
    match = lambda col, mat: any(torch.allclose(col, mat[:, k], atol=1e-5) for k in range(mat.shape[1]))  # noqa: E731
    assert all(match(pruned_features[:, j], linear_input) for j in range(pruned_features.shape[1])), "the second group was not scored on the network with the first group pruned"
    assert not all(match(dense_features[:, j], linear_input) for j in range(dense_features.shape[1])), "the second group was scored on the unpruned network"


def _routing_toy() -> nn.Sequential:
    """Channel 0 carries sample A's class, channel 1 sample B's, channel 2 is always zero."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).view(3, 2, 1, 1))
        model[3].weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]))
        model[3].bias.zero_()
    return model.eval()


def test_gates_are_per_sample_closed_where_a_sample_never_needs_the_channel():
    model = _routing_toy()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)  # sample A, sample B
    crit = CriticalPathGates(steps=40, l1=0.01)
    layers = _gate_layers(model, x[:1])
    assert list(layers.values()) == [model[0]], f"the conv (no BN after it) must carry the gates, got {list(layers)}"
    g = crit.sample_gates(model, layers, x)[model[0]]
    assert g.shape == (2, 3), f"one gate per sample and channel expected, got {tuple(g.shape)}"
    assert (g >= 0).all(), f"gates must be non-negative, got {g.tolist()}"
    assert g[0, 0] > 0.5 and g[1, 1] > 0.5, f"each sample's gate on the channel it needs must stay open, got {g.tolist()}"
    assert g[1, 0] < 1e-3 and g[0, 1] < 1e-3, f"each sample's gate on the channel it never uses must close, got {g.tolist()}"
    assert (g[:, 2] < 1e-3).all(), f"the always-zero channel's gates must close on every sample, got {g.tolist()}"
    assert all(p.requires_grad for p in model.parameters()), "the network must be released after gating"
    assert torch.equal(model[0].weight.view(3, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])), "the network must stay frozen"


def test_gates_importance_is_the_mean_gate_and_prunes_the_channel_no_path_uses():
    model = _routing_toy()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1).repeat(4, 1, 1, 1)
    ctx = ApplyContext(example_input=x[:1], calibration=lambda: iter([(x, torch.zeros(len(x), dtype=torch.long))]))
    crit = CriticalPathGates()
    crit.prepare(clone(model), ctx, {"gate_steps": 40, "gate_l1": 0.01})
    mean = next(iter(crit.gates.values()))
    assert mean[2] < 1e-3 and min(mean[0], mean[1]) > 0.25, f"mean gates should be about [0.5, 0.5, 0], got {mean.tolist()}"
    assert ctx.notes["prune.gates_unused"] == 1, f"one channel is on no sample's path, notes say {ctx.notes['prune.gates_unused']}"
    out = _prune_one(model, "gates", ctx, gate_steps=40, gate_l1=0.01)
    assert out[0].out_channels == 2 and torch.equal(out[0].weight.view(2, 2), torch.eye(2)), f"the unused channel 2 must go, kept {out[0].weight.view(-1, 2).tolist()}"


def test_apoz_falls_back_to_l1_on_a_bn_without_relu_and_notes_it():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),  # no ReLU after this BN: no APoZ
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    ).eval()
    with torch.no_grad():
        model[0].weight[1].mul_(10)
        model[0].bias[1] = -1e3  # all negative: the old count of "zeros" at the BN would drop channel 1 first
        model[0].weight[2].zero_()  # the smallest filter: the l1 fallback drops channel 2 first
    x = torch.rand(16, 1, 8, 8)
    ctx = _context(x)
    out = _prune_one(model, "apoz", ctx)
    assert _removed_channel(model, out) == {2}, f"apoz must follow the l1 fallback on the BN without ReLU, removed {_removed_channel(model, out)}"
    assert ctx.notes["prune.apoz_fallback"] == {"0": "l1"}, f"the trial must note the fallback layer, got {ctx.notes['prune.apoz_fallback']}"
    keep = APoZ(fallback="keep")
    keep.prepare(clone(model), _context(x), {})
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, list(range(4)))
    assert keep(group) is None, "fallback='keep' must leave the group unpruned (no score)"


def test_apoz_counts_at_the_real_relus_of_a_resnet():
    base = make_base("resnet18", (3, 32, 32))
    crit = APoZ(batches=1)
    work = clone(base)
    crit.prepare(work, _context(torch.randn(8, 3, 32, 32)), {})
    names = {m: n for n, m in work.named_modules()}
    scored = {names[m] for m in crit.zeros}
    bn1 = {n for n in names.values() if n.endswith(".bn1")}
    bn2 = {n for n in names.values() if n.endswith(".bn2") or n.endswith("downsample.1")}
    assert bn1 <= scored, f"every block's bn1 feeds the block's ReLU directly: {sorted(bn1 - scored)} not scored"
    assert not (bn2 & scored), f"bn2 and shortcut BNs feed the residual add, not a ReLU, but were scored: {sorted(bn2 & scored)}"


def test_prune_refuses_computed_weights_and_tnet_chains():
    prune = searchspace.get_method("prune")()
    assert not prune.accepts(("tnet",)), "prune must not follow tnet (its kernels are computed from shared factors)"
    assert prune.accepts(("tucker",)), "prune must accept tucker's plain convolutions"
    base = make_base("mnist1d_cnn", (40,))
    tnet = searchspace.get_method("tnet")().apply(
        base, {"rank_layers": 0.5, "rank_out": 0.5, "rank_in": 0.5, "rank_kernel": 1.0}, context=ApplyContext(example_input=torch.randn(1, 40))
    )
    assert prune.supports(tnet) is not None, "prune must refuse a model whose conv weights are computed"


def test_unknown_criterion_is_a_clear_error():
    with pytest.raises(ValueError, match="prune.criterion must be one of"):
        _prune_one(_toy(), "random", _context(torch.rand(4, 1, 8, 8)))


def _squeezenet() -> nn.Module:
    """torchvision's SqueezeNet 1.0: its classifier is a 1x1 convolution, ReLU and global pooling."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.squeezenet1_0(num_classes=10).eval()


def test_the_output_layers_are_the_ones_whose_channels_are_the_logits():
    from searchspace.methods.prune import prunable_output_layers

    net = _squeezenet()
    assert prunable_output_layers(net, torch.randn(1, 3, 64, 64)) == [net.classifier[1]], "SqueezeNet: the output layer is the classifier's conv"
    toy = _toy()
    assert prunable_output_layers(toy, torch.randn(1, 1, 8, 8)) == [toy[-1]], "a final Linear is the output layer, and nothing before it"


@pytest.mark.parametrize("criterion", ["l1", "apoz", "slimming"])  # the cheap ones; thinet/gates take 10-20 s here
def test_pruning_never_changes_the_output_of_a_convolutional_classifier(criterion):
    net = _squeezenet()
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ctx = _context(x, net, fit=lambda m, **_: m)
    out = searchspace.get_method("prune")().apply(net, {"criterion": criterion, "ratio": 0.5, "per_stage": False, "gate_epochs": 1, "gate_l1": 0.01}, context=ctx)
    assert ctx.notes["prune.channels"], f"{criterion}: nothing was pruned"
    assert "classifier.1" not in ctx.notes["prune.channels"], f"{criterion}: the classifier conv was pruned: {ctx.notes['prune.channels']['classifier.1']}"
    with torch.no_grad():
        assert out.eval()(x).shape == (8, 10), f"{criterion}: the pruned SqueezeNet predicts {out(x).shape[-1]} classes"


def _shuffle_net() -> nn.Module:
    """Two ShuffleNetV2 blocks (torchvision's): each ends in a channel shuffle of its two branches,
    through which Torch-Pruning cannot map channels. In every ``branch2``, the first convolution's
    filters of the first half of its channels are zero, and the BatchNorms after it and after the
    depthwise convolution map 0 to 0 there (mean and shift 0), so those channels carry exactly 0 to
    the branch's last convolution: removing them leaves the function as it is."""
    from torchvision.models.shufflenetv2 import InvertedResidual

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2), m.bias.normal_(0, 0.5)
        for block in (net[3], net[4]):
            half = block.branch2[0].out_channels // 2
            block.branch2[0].weight[:half] = 0
            for bn in (block.branch2[1], block.branch2[4]):
                bn.running_mean[:half], bn.bias[:half] = 0, 0
    return net.eval()


@pytest.mark.parametrize("criterion", ["l1", "thinet"])
def test_a_channel_shuffle_keeps_its_channels_and_the_branches_inside_are_pruned(criterion):
    """Torch-Pruning's graph of the whole net would map the shuffle as a flatten (and break the
    net); instead the runs of layers inside each branch are pruned on their own, their interface
    kept: the zero channels go, the blocks' output channels stay, and the function is unchanged."""
    base = _shuffle_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = _context(x, base)
    out = searchspace.get_method("prune")().apply(base, {"criterion": criterion, "ratio": 0.5, "per_stage": False}, context=ctx)
    assert "(1, 8, 8, 8) -> (1, 2, 4, 8, 8)" in ctx.notes["prune.split"]["reason"], ctx.notes
    assert ctx.notes["prune.split"]["parts"] == ["3.branch2.0..3.branch2.5", "4.branch1.0..4.branch1.2", "4.branch2.0..4.branch2.5"], ctx.notes
    for i, width in ((3, 4), (4, 8)):
        assert out[i].branch2[0].out_channels == width // 2, f"block {i}: branch2's inner channels {out[i].branch2[0].out_channels} != {width // 2}"
        assert out[i].branch2[5].out_channels == width, f"block {i}: the branch's output (shuffled) must keep {width} channels"
    assert torch.equal(out[4].branch2[0].weight, base[4].branch2[0].weight[4:]), "the zero filters (channels 0-3) are the ones removed"
    assert out[0].out_channels == 8 and out[-1].out_features == 10, "layers outside the branches keep their channels"
    assert param_count(out) < param_count(base)
    with torch.no_grad():
        want, got = base(x), out.eval()(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"pruning zero channels changed the output by {float((got - want).abs().max()):.3g}"


def test_a_whole_model_pruning_that_breaks_the_forward_is_redone_run_by_run(monkeypatch):
    """Where a regrouping goes unseen (here: its detection switched off), Torch-Pruning's graph maps
    the shuffle as a flatten and the net pruned as a whole no longer runs: it is pruned again run
    by run, with the same known answer as when the regrouping is seen (the zero channels go)."""
    from searchspace.methods import prune

    monkeypatch.setattr(prune, "channel_moves", lambda model, example: [])
    base = _shuffle_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = _context(x, base)
    out = searchspace.get_method("prune")().apply(base, {"criterion": "l1", "ratio": 0.5, "per_stage": False}, context=ctx)
    assert ctx.notes["prune.split"]["reason"].startswith("the model pruned as a whole does not run"), ctx.notes["prune.split"]
    assert out[4].branch2[0].out_channels == 4 and out[4].branch2[5].out_channels == 8
    with torch.no_grad():
        want, got = base(x), out.eval()(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"pruning zero channels changed the output by {float((got - want).abs().max()):.3g}"


def _random_bn_and_dead_half(net: nn.Module, dead: list[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> nn.Module:
    """Random BatchNorm statistics everywhere; for each (conv, bn) in ``dead``, the first half of the
    conv's filters are zero and the bn maps 0 to 0 there (mean and shift 0), so those channels
    carry exactly 0 (through the ReLU after them) and removing them leaves the function as it is."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2), m.bias.normal_(0, 0.5)
        for conv, bn in dead:
            half = conv.out_channels // 2
            conv.weight[:half] = 0
            bn.running_mean[:half], bn.bias[:half] = 0, 0
    return net.eval()


class _PartialResidual(nn.Module):
    """ReXNet's block (timm): the shortcut is added to the first ``cin`` of the ``cout`` output
    channels, the rest pass as they are."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cin = cin
        self.conv_exp, self.bn_exp, self.act = nn.Conv2d(cin, 2 * cout, 1, bias=False), nn.BatchNorm2d(2 * cout), nn.ReLU()
        self.conv_pwl, self.bn_pwl = nn.Conv2d(2 * cout, cout, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn_pwl(self.conv_pwl(self.act(self.bn_exp(self.conv_exp(x)))))
        return torch.cat([h[:, 0 : self.cin] + x, h[:, self.cin :]], dim=1)


def _partial_residual_net() -> nn.Module:
    """Three chained partial residuals (4 -> 6 -> 8 -> 10 channels); in each block the expansion's
    first half of channels carries exactly 0."""
    torch.manual_seed(0)
    blocks = [_PartialResidual(c, c + 2) for c in (4, 6, 8)]
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 10))
    return _random_bn_and_dead_half(net, [(b.conv_exp, b.bn_exp) for b in blocks])


def test_a_slice_of_part_of_the_channels_is_a_channel_move():
    """Torch-Pruning cannot change a slice's bounds in the model's code: a slice of part of a feature
    map's channels is reported; one of all channels, of another axis, or of a token sequence is not."""
    from searchspace.methods.prune import channel_moves

    class Slices(nn.Module):
        def __init__(self, take) -> None:
            super().__init__()
            self.take = take

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.take(x) * 1

    x = torch.randn(1, 5, 4, 4)
    assert channel_moves(Slices(lambda t: t[:, 1:3]), x) == ["slice [:, 1:3] of 5 channels"]
    assert channel_moves(Slices(lambda t: t[:, 2:]), x) == ["slice [:, 2:] of 5 channels"]
    assert channel_moves(Slices(lambda t: t.narrow(1, 0, 4)), x) == ["narrow(1, 0, 4) of 5 channels"]
    for name, take, inp in [
        ("all channels", lambda t: t[:, 0:5], x),
        ("a spatial slice", lambda t: t[:, :, 1:3], x),
        ("a spatial narrow", lambda t: t.narrow(2, 0, 2), x),
        ("a token sequence (N, L, C)", lambda t: t[:, 1:], torch.randn(1, 5, 8)),
    ]:
        assert channel_moves(Slices(take), inp) == [], f"{name} is not a channel move"


@pytest.mark.parametrize("criterion", ["l1", "thinet"])
def test_a_partial_residual_keeps_its_channels_and_the_runs_inside_are_pruned(criterion):
    """Partial residuals (ReXNet) slice the block output at a fixed channel: Torch-Pruning's graph
    of the whole net gets those slices' sizes wrong (and on a longer chain does not finish), and no
    pruning before the slice could move its bound. The runs inside the blocks are pruned instead:
    the zero expansion channels go, every block keeps its output channels, the function is unchanged."""
    base = _partial_residual_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = _context(x, base)
    out = searchspace.get_method("prune")().apply(base, {"criterion": criterion, "ratio": 0.5, "per_stage": False}, context=ctx)
    assert "slice [:, 0:4] of 6 channels" in ctx.notes["prune.split"]["reason"], ctx.notes
    assert ctx.notes["prune.split"]["parts"] == [f"{i}.conv_exp..{i}.conv_pwl" for i in (1, 2, 3)], ctx.notes
    for i, cout in ((1, 6), (2, 8), (3, 10)):
        assert out[i].conv_exp.out_channels == cout, f"block {i}: expansion {out[i].conv_exp.out_channels} channels, expected {cout} of {2 * cout}"
        assert torch.equal(out[i].conv_exp.weight, base[i].conv_exp.weight[cout:]), f"block {i}: the zero filters are the ones removed"
        assert out[i].conv_pwl.out_channels == cout, f"block {i}: the output sliced at {out[i].cin} must keep its {cout} channels"
    assert out[0].out_channels == 4 and out[-1].in_features == 10, "layers outside the runs keep their channels"
    with torch.no_grad():
        want, got = base(x), out.eval()(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"pruning zero channels changed the output by {float((got - want).abs().max()):.3g}"



def test_the_groups_of_a_part_whose_input_is_one_sample_of_one_pixel():
    """A part is traced on the one input it receives in the model's forward (a squeeze-excitation
    run: (1, C, 1, 1)). Torch-Pruning unpacks a bare tensor as the list of inputs, which would run
    the part on an unbatched (C, 1, 1) map where its convolutions are not recognised: the part's
    one internal group (rooted at the reduction) must be found."""
    from searchspace.methods.prune import _group_roots

    part = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(inplace=True), nn.Conv2d(4, 16, 1))
    roots = [g[0].dep.target.module for g in _group_roots(part, torch.randn(1, 16, 1, 1), [part[2]])]
    assert roots == [part[0]], f"groups rooted at {roots}, expected the reduction conv only"


class _FixedSplit(nn.Module):
    """MixNet's mixed depthwise convolution (timm's ``MixedConv2d``): the input is split into fixed
    sizes, each piece convolved with its own kernel size."""

    def __init__(self, splits: list[int]) -> None:
        super().__init__()
        self.splits = splits
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 2 * i + 3, padding=i + 1, groups=c, bias=False) for i, c in enumerate(splits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = torch.split(x, self.splits, 1)
        return torch.cat([self.convs[i](xs[i]) for i in range(len(self.splits))], 1)


def _fixed_split_net() -> nn.Module:
    """stem -> pointwise -> fixed split [4, 4] -> head; the stem's and the head's first half of
    channels carry exactly 0."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        _FixedSplit([4, 4]), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return _random_bn_and_dead_half(net, [(net[0], net[1]), (net[9], net[10])])


@pytest.mark.parametrize("criterion", ["l1", "thinet"])
def test_an_unseen_fixed_channel_split_is_pruned_run_by_run_by_every_criterion(criterion, monkeypatch):
    """Torch-Pruning does not change a split's sizes in the model's code. Where the split goes unseen
    (here: its detection switched off; seen, it is pruned run by run from the start, as CSPNet's
    below), the net pruned as a whole (through the pointwise layer's channels) stops running. The
    layer-by-layer pass (thinet) meets that mid-way, at its next group, and is redone run by run
    like the others: the same known answer (the zero channels of the stem and the head go, the
    split keeps its sizes, the function is unchanged)."""
    from searchspace.methods import prune

    monkeypatch.setattr(prune, "channel_moves", lambda model, example: [])
    base = _fixed_split_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = _context(x, base)
    out = searchspace.get_method("prune")().apply(base, {"criterion": criterion, "ratio": 0.5, "per_stage": False}, context=ctx)
    reason = ctx.notes["prune.split"]["reason"]
    assert reason.startswith("the model pruned as a whole" + (", layer by layer up to the group of " if criterion == "thinet" else " does not run")), reason
    assert "split_with_sizes" in reason, reason
    assert ctx.notes["prune.split"]["parts"] == ["0..3", "9..14"], ctx.notes
    assert out[0].out_channels == 4 and torch.equal(out[0].weight, base[0].weight[4:]), "the stem's zero filters are the ones removed"
    assert out[9].out_channels == 8 and torch.equal(out[9].weight, base[9].weight[8:]), "the head's zero filters are the ones removed"
    assert out[3].out_channels == 8 and out[6].splits == [4, 4], "the split's input keeps its channels"
    with torch.no_grad():
        want, got = base(x), out.eval()(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"pruning zero channels changed the output by {float((got - want).abs().max()):.3g}"


def test_the_layer_by_layer_pass_builds_each_group_a_fixed_number_of_times(monkeypatch):
    """ThiNet prunes one group at a time, each scored on the network pruned so far. Torch-Pruning's
    MetaPruner builds every group of the model when it starts and again when it prunes, so a pass per
    group built groups x groups of them (DenseNet-121's concatenations: over 300 s). Counted on a
    chain of 12 convolutions (12 groups): at most 6 builds per group, and the known answer (half of
    every layer's channels go) unchanged."""
    import torch_pruning as tp

    calls = [0]
    build = tp.DependencyGraph.get_pruning_group

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return build(self, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", counting)
    torch.manual_seed(0)
    layers, c = [], 3
    for _ in range(12):
        layers += [nn.Conv2d(c, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        c = 16
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = searchspace.get_method("prune")().apply(net, {"criterion": "thinet", "ratio": 0.5, "per_stage": False}, context=_context(x, net))
    assert [m.out_channels for m in out if isinstance(m, nn.Conv2d)] == [8] * 12
    assert calls[0] <= 6 * 12, f"{calls[0]} pruning groups built for 12 groups"


class _Tokens(nn.Module):
    """A ViT in small: the one convolution (patch embedding) feeds a reshape, no BatchNorm anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 4, stride=4)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.mlp(t)
        return self.head(t.mean(1))


@pytest.mark.parametrize("criterion", ["gates", "slimming"])
def test_gate_criteria_with_no_layer_to_gate_rank_by_l1_and_say_so(criterion):
    """torchvision's ViT gave gates nothing to optimise (an empty optimiser raised): with no layer to
    gate, the pruned model is exactly l1's, and the notes say why."""
    torch.manual_seed(0)
    model = _Tokens().eval()
    x = torch.rand(8, 1, 8, 8)
    assert _gate_layers(model, x[:1]) == {}

    def fit(module, **kw):  # what a trial's fit does first: an optimiser over what trains
        torch.optim.Adam([p for p in module.parameters() if p.requires_grad])

    ctx = _context(x, model, fit=fit)
    out = _prune_one(model, criterion, ctx)
    want = _prune_one(model, "l1", _context(x, model))
    assert "ranked by L1" in ctx.notes["prune.gates"]
    assert param_count(out) == param_count(want) < param_count(model)
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in out.state_dict().items())


class _BNAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in small: a BatchNorm subclass that holds its activation."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class _CrossStage(nn.Module):
    """CSPNet's stage (timm's ``CrossStage``): the expanded map split in two halves by a size written
    in the code, one half through the blocks, the halves joined again."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), _BNAct(16))
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), _BNAct(8), nn.Conv2d(8, 8, 3, padding=1, bias=False), _BNAct(8))
        self.transition = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), _BNAct(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, xb = self.expand(x).split(8, dim=1)
        return self.transition(torch.cat([xs, self.blocks(xb)], dim=1))


@pytest.mark.parametrize("criterion", ["l1", "thinet"])
def test_a_channel_split_is_pruned_run_by_run_through_batchnorms_that_hold_their_activation(criterion):
    """A split by a size in the code cannot follow pruned channels (cspresnet50 raised inside
    Torch-Pruning): it is recorded and the runs are pruned on their own. A BatchNorm subclass with
    its activation (timm's) stays one layer of a run, so the runs reach from convolution to
    convolution (traced through, it cut every run at its first BatchNorm and nothing was pruned).
    Known answer: the zero half of each run's inner channels goes and the function is unchanged."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _BNAct(8), _CrossStage(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    stage = base[2]
    base = _random_bn_and_dead_half(base, [(base[0], base[1]), (stage.blocks[0], stage.blocks[1]), (stage.transition[0], stage.transition[1])])
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = _context(x, base)
    out = searchspace.get_method("prune")().apply(base, {"criterion": criterion, "ratio": 0.5, "per_stage": False}, context=ctx)
    assert ctx.notes["prune.split"]["reason"] == "Torch-Pruning cannot map channels through split of 16 channels into [8, 8]", ctx.notes
    assert ctx.notes["prune.channels"] == {"0": [8, 4], "2.blocks.0": [8, 4], "2.transition.0": [16, 8]}, ctx.notes["prune.channels"]
    assert torch.equal(out[2].blocks[0].weight, base[2].blocks[0].weight[4:]), "the zero filters are the ones removed"
    with torch.no_grad():
        want, got = base(x), out.eval()(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"pruning zero channels changed the output by {float((got - want).abs().max()):.3g}"


def test_a_whole_model_pruning_that_raises_is_redone_run_by_run(monkeypatch):
    """Torch-Pruning itself can fail on an operation it maps wrongly (an index past a layer's
    channels, as on cspresnet50 before its split was recorded). Injected here into the first pass
    with the regrouping unseen: the net is pruned run by run, the reason noted, with the known answer."""
    from searchspace.methods import prune

    monkeypatch.setattr(prune, "channel_moves", lambda model, example: [])
    real = prune.Prune._prune_part
    passes: list[int] = []

    def failing_once(part, *args, **kwargs):
        passes.append(len(list(part.module.modules())))
        if len(passes) == 1:
            raise IndexError("index 8 is out of bounds for dimension 0 with size 8")
        return real(part, *args, **kwargs)

    monkeypatch.setattr(prune.Prune, "_prune_part", staticmethod(failing_once))
    base = _shuffle_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = _context(x, base)
    out = searchspace.get_method("prune")().apply(base, {"criterion": "l1", "ratio": 0.5, "per_stage": False}, context=ctx)
    assert ctx.notes["prune.split"]["reason"] == "pruning the model as a whole raised IndexError: index 8 is out of bounds for dimension 0 with size 8"
    assert len(passes) == 1 + 3, f"one whole pass, then the three runs: {passes}"
    assert out[4].branch2[0].out_channels == 4 and out[4].branch2[5].out_channels == 8
    with torch.no_grad():
        want, got = base(x), out.eval()(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), f"pruning zero channels changed the output by {float((got - want).abs().max()):.3g}"


class _ExpandDepthwiseGate(nn.Module):
    """ReXNet's block in small: a channel split elsewhere makes pruning go run by run; here the run
    expand (1x1) -> BatchNorm with activation -> depthwise 3x3 ends where a functional gate reads the
    depthwise output twice, so the depthwise layer's output channels are the run's interface."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.bn = _BNAct(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.project = nn.Conv2d(16, 8, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split(4, dim=1)
        h = self.dw(self.bn(self.expand(torch.cat([b, a], dim=1))))
        return self.project(h * h.mean((2, 3), keepdim=True).sigmoid())


def test_a_run_that_ends_in_a_depthwise_convolution_keeps_its_output_channels():
    """Pruning the expansion's channels would take the depthwise layer's with them (they are tied),
    changing what the functional gate after it reads: cut at the depthwise layer, the run is only the
    expansion, with no inner channel, and the other runs are pruned and the model runs (it raised
    'running_mean should contain 148 elements not 228' on rexnet_100)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _BNAct(8), nn.Conv2d(8, 8, 3, padding=1, bias=False), _BNAct(8),
                         _ExpandDepthwiseGate(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = _context(x, base)
    out = searchspace.get_method("prune")().apply(base, {"criterion": "l1", "ratio": 0.5, "per_stage": False}, context=ctx)
    assert ctx.notes["prune.split"]["parts"] == ["0..2", "4.project..7"], ctx.notes["prune.split"]
    assert ctx.notes["prune.channels"] == {"0": [8, 4], "4.project": [8, 4]}, ctx.notes["prune.channels"]
    assert out[4].dw.out_channels == 16 and out[4].expand.out_channels == 16
    with torch.no_grad():
        assert out.eval()(x).shape == (8, 10)


def test_aligned_keep_is_the_nearest_multiple_within_the_layer():
    """Closed-form counts: Torch-Pruning keeps int(c * (1 - ratio)); round_to keeps the nearest
    multiple of it (halves up), at least one multiple, at most c; a layer narrower than the multiple
    keeps the exact count."""
    from searchspace.methods.prune import aligned_keep

    assert aligned_keep(16, 0.4, 8) == 8  # 9 -> 8
    assert aligned_keep(16, 0.2, 8) == 16  # 12 -> 16 (half up)
    assert aligned_keep(32, 0.4, 8) == 16  # 19 -> 16
    assert aligned_keep(64, 0.4, 8) == 40  # 38 -> 40
    assert aligned_keep(64, 0.4, 16) == 32  # 38 -> 32
    assert aligned_keep(16, 0.9, 8) == 8, "at least one multiple"
    assert aligned_keep(10, 0.5, 8) == 8, "a width off the multiple is brought onto it"
    assert aligned_keep(4, 0.5, 8) == 2, "narrower than the multiple: the exact count"
    assert aligned_keep(64, 0.4, 1) == 38 and aligned_keep(64, 0.0, 8) == 64
    for c in range(8, 129):
        for r in (0.1, 0.25, 0.5, 0.7):
            k = aligned_keep(c, r, 8)
            exact = int(c * (1 - r))
            assert k % 8 == 0 or k == c, (c, r, k)
            # brute force: no multiple of 8 in [8, c] is nearer to the exact count (ties go up)
            assert all(abs(m - exact) > abs(k - exact) or (abs(m - exact) == abs(k - exact) and m <= k) for m in range(8, c + 1, 8)), (c, r, k)


@pytest.mark.parametrize("criterion", ["l1", "thinet"])  # thinet: the layer-by-layer path
@pytest.mark.parametrize("ratio", [0.3, 0.4, 0.6])
def test_round_to_keeps_every_pruned_layer_at_the_nearest_multiple(criterion, ratio):
    """digits_cnn (16, 32, 64, 64 channels): with round_to 8 every layer keeps aligned_keep of its
    channels, the count the same plan without round_to keeps rounded to the nearest multiple."""
    from searchspace.methods.prune import aligned_keep

    base = make_base("digits_cnn", (1, 8, 8))
    x = torch.randn(8, 1, 8, 8)
    widths = {}
    for round_to in (1, 8):
        params = {"criterion": criterion, "ratio": ratio, "per_stage": False, **({"round_to": round_to} if round_to > 1 else {})}
        out = searchspace.get_method("prune")().apply(base, params, context=_context(x, base))
        widths[round_to] = [m.out_channels for m in out.modules() if isinstance(m, nn.Conv2d)]
        assert out(x).shape == (8, 10)
    before = [m.out_channels for m in base.modules() if isinstance(m, nn.Conv2d)]
    assert widths[1] == [int(c * (1 - ratio)) for c in before], widths
    assert widths[8] == [aligned_keep(c, ratio, 8) for c in before], widths
    assert all(w % 8 == 0 for w in widths[8]), widths


def test_round_to_is_recorded_only_when_it_rounds_and_is_checked():
    from tests.automl.test_sensitivity import optuna_fixed

    prune = searchspace.get_method("prune")
    assert list(prune().ranges["round_to"].choices) == [1], "counts are exact unless a config names round_to"
    opened = prune(ranges=prune.narrowed({"round_to": [8, 16]}))
    fixed = {"prune.criterion": "l1", "prune.per_stage": False, "prune.ratio": 0.3}
    assert opened.space(optuna_fixed({**fixed, "prune.round_to": 8}))["round_to"] == 8
    assert "round_to" not in prune().space(optuna_fixed(fixed)), "an exact plan is written as without the setting"
    with pytest.raises(ValueError, match=r"prune.round_to must be one of \[1, 4, 8, 16, 32, 64\], got 3"):
        prune().apply(_toy(), {"criterion": "l1", "ratio": 0.5, "round_to": 3}, context=_context(torch.rand(4, 1, 8, 8)))
