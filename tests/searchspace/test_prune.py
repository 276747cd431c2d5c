"""Filter pruning: physically smaller models, and each criterion's choice on a case with a known answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import searchspace
from automl._measure import param_count, size_bytes
from searchspace import ApplyContext
from searchspace.methods.prune import CRITERIA, ThiNet
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
    assert size_bytes(out) < 0.5 * size_bytes(base), f"{model_name}: {size_bytes(out)} bytes after pruning vs {size_bytes(base)}"
    assert ctx.notes["prune.channels"], f"{model_name}: notes list no pruned layer"
    with torch.no_grad():
        y = out.eval()(x)
    assert y.shape == (8, 10), f"{model_name}: pruned output shape {tuple(y.shape)} != (8, 10)"


def test_per_stage_ratios_prune_stages_differently():
    base = make_base("digits_cnn", (1, 8, 8))
    params = {"criterion": "l1", "per_stage": True, "stage_ratio_0": 0.0, "stage_ratio_1": 0.5, "stage_ratio_2": 0.0, "stage_ratio_3": 0.0}
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


def test_thinet_greedy_order_matches_exhaustive_best_single():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=gen)
    a[:, 4] *= 0.01
    order = ThiNet.greedy_order(a)
    assert int(order.argmin()) == 4, f"the smallest contribution (channel 4) must go first, order {order.tolist()}"
    assert sorted(order.tolist()) == list(range(6)), f"scores must be a removal order, got {order.tolist()}"


def _real_fit(x: torch.Tensor, y: torch.Tensor):
    """A genuine training loop (Adam on whatever requires grad), as the trial's ``fit`` does."""

    def fit(module: nn.Module, *, epochs: int = 1, extra_loss=None):
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=0.02)
        module.train()
        for _ in range(epochs * 150):
            loss = F.cross_entropy(module(x), y) + (extra_loss(module) if extra_loss else 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return module.eval()

    return fit


def test_gates_close_the_gate_of_the_channel_nothing_reads():
    model = _toy()
    with torch.no_grad():
        model[0].weight[0].mul_(10)  # the largest filter: l1 would keep it
        model[2].weight[:, 0].zero_()  # but nothing reads channel 0: only the L1 penalty acts on its gate
    x = torch.rand(32, 1, 8, 8)
    y = model(x).argmax(1)
    crit = CRITERIA["gates"]()
    work = searchspace._surgery.clone(model)
    crit.prepare(work, _context(x, base=model, fit=_real_fit(x, y)), {"gate_epochs": 1, "gate_l1": 0.01})
    gates = crit.gates[work[0]]
    assert gates[0] < 1e-3, f"the unread channel's gate must close, got {gates.tolist()}"
    assert gates.max() > 0.5, f"the channels the output depends on must keep an open gate, got {gates.tolist()}"
    assert int(gates.argmin()) == 0 or gates[int(gates.argmin())] == gates[0], f"channel 0 must rank lowest, got {gates.tolist()}"


def test_gates_are_non_negative_and_release_the_weights():
    model = _toy()
    x = torch.rand(32, 1, 8, 8)
    y = model(x).argmax(1)
    ctx = _context(x, base=model, fit=_real_fit(x, y))
    crit = CRITERIA["gates"]()
    work = searchspace._surgery.clone(model)
    crit.prepare(work, ctx, {"gate_epochs": 1, "gate_l1": 0.01})
    assert all((g >= 0).all() for g in crit.gates.values()), "gates must be non-negative"
    assert not any(p.requires_grad is False for p in work.parameters()), "weights must be trainable again after gating"


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
