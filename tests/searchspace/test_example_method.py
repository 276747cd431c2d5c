"""The README's example method (``tests.fixtures.fold_bn``), and registering a method for a while.

The example runs through the registry-driven checks in ``test_methods.py``; these tests add what
folding must give by construction (the same outputs in eval mode, a closed-form parameter count)
and check that ``searchspace.registered`` leaves nothing behind.
"""

from __future__ import annotations

import optuna
import pytest
import torch

import searchspace
from searchspace import ApplyContext, CompressionMethod
from tests.conftest import make_base, random_context
from tests.fixtures.fold_bn import FoldBatchNorm, foldable


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_is_scoped_even_when_the_block_fails():
    assert FoldBatchNorm.name not in searchspace.list_methods()
    with pytest.raises(RuntimeError, match="inside"):
        with searchspace.registered(FoldBatchNorm):
            assert searchspace.get_method("fold_bn") is FoldBatchNorm
            assert "fold_bn" in searchspace.list_methods(searchspace.Stage.STRUCTURE)
            raise RuntimeError("inside")
    assert FoldBatchNorm.name not in searchspace.list_methods()
    with pytest.raises(KeyError, match="unknown method 'fold_bn'"):
        searchspace.get_method("fold_bn")


def test_registered_refuses_a_built_in_name_and_unregister_lists_the_allowed():
    clash = type("Clash", (FoldBatchNorm,), {"name": "tucker"})
    with pytest.raises(ValueError, match="'tucker' is registered twice"):
        with searchspace.registered(clash):
            pass
    assert searchspace.get_method("tucker") is not clash, "a refused registration must not replace the built-in"
    with pytest.raises(KeyError, match="allowed: .*tucker"):
        searchspace.unregister_method("fold_bn")


@pytest.mark.parametrize("model_name,shape,pairs", [("digits_cnn", (1, 8, 8), 4), ("resnet18", (3, 32, 32), 4)])
def test_folded_model_computes_what_the_base_computes(model_name, shape, pairs):
    base = make_base(model_name, shape)
    # Non-trivial statistics, so a wrong fold cannot pass by luck.
    gen = torch.Generator().manual_seed(1)
    for m in base.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    ctx = random_context(shape, base)
    out = FoldBatchNorm().apply(base, {"grouped": True}, context=ctx)
    assert len(ctx.notes["fold_bn.converted"]) == pairs, ctx.notes
    x = torch.randn(8, *shape, generator=gen)
    with torch.no_grad():
        diff = (out.eval()(x) - base.eval()(x)).abs().max().item()
    assert diff < 1e-4, f"{model_name}: folded outputs differ from the base by {diff:.2e}"
    # Closed form: each fold removes the BatchNorm's weight and bias (2C) and adds a conv bias (C)
    # where the conv had none.
    removed = 0
    for conv_name, bn_name in foldable(base):
        conv, bn = base.get_submodule(conv_name), base.get_submodule(bn_name)
        removed += 2 * bn.num_features - (conv.out_channels if conv.bias is None else 0)
    assert _params(base) - _params(out) == removed, f"{model_name}: {_params(base)} - {_params(out)} != {removed}"
    assert not foldable(out), "every pair was folded: none may be left"


def test_grouped_false_keeps_depthwise_pairs_and_says_why():
    base = make_base("mobilenet_v2", (3, 32, 32))
    grouped = [c for c, _ in foldable(base) if base.get_submodule(c).groups > 1]
    ctx = random_context((3, 32, 32), base)
    FoldBatchNorm().apply(base, {"grouped": False}, context=ctx)
    assert grouped and sorted(ctx.notes["fold_bn.skipped"]) == sorted(grouped), ctx.notes["fold_bn.skipped"]
    assert len(ctx.notes["fold_bn.converted"]) == len(foldable(base)) - len(grouped)


def test_converted_nothing_reads_the_methods_own_key():
    """The notes key is the method's (``converted_key``); only an empty record there is a no-op."""
    assert FoldBatchNorm.converted_key() == "fold_bn.converted"
    assert FoldBatchNorm.converted_nothing({"fold_bn.converted": [], "fold_bn.skipped": {"a": "b"}})
    assert not FoldBatchNorm.converted_nothing({"fold_bn.converted": ["stages.0.0.0"]})
    assert not FoldBatchNorm.converted_nothing({}), "a method that records nothing is never a no-op"
    assert not FoldBatchNorm.converted_nothing({"tucker.converted": []}), "another method's key does not count"
    assert searchspace.get_method("tnet").converted_key() == "tnet.groups"
    assert searchspace.get_method("prune").converted_key() == "prune.channels"


@pytest.mark.parametrize("name", searchspace.list_methods())
def test_each_method_writes_its_converted_key_or_none_at_all(name):
    """A method's notes hold its ``converted_key`` or no ``<name>.converted``-like key of another
    spelling, so the dry run's no-op detection reads what the method writes."""
    method = searchspace.get_method(name)()
    base = make_base("digits_cnn", (1, 8, 8))
    if method.supports(base) is not None:
        pytest.skip(method.supports(base))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    ctx: ApplyContext = random_context((1, 8, 8), base)
    method.apply(base, method.space(trial), context=ctx)
    others = {f"{name}.{k}" for k in ("converted", "channels", "groups")} - {method.converted_key()}
    assert not others & set(ctx.notes), f"{name} writes {others & set(ctx.notes)}, but its converted_key is {method.converted_key()!r}"
    assert isinstance(method, CompressionMethod)
