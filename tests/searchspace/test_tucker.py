"""Tucker-2 (Kim et al., ICLR 2016): exact at full ranks, parameters = the closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import searchspace
from automl._measure import param_count
from searchspace import ApplyContext
from searchspace.methods.tucker import Tucker2Conv, tucker2_param_count, tucker_ranks
from tests.conftest import make_base


@pytest.mark.parametrize(
    "conv,x_shape",
    [
        (nn.Conv2d(8, 12, 3, padding=1, bias=True), (2, 8, 7, 7)),
        (nn.Conv2d(6, 5, (3, 1), stride=2, padding=(1, 0), dilation=1, bias=False), (2, 6, 9, 8)),
        (nn.Conv1d(7, 9, 5, stride=2, padding=2), (3, 7, 20)),
    ],
)
def test_tucker2_is_exact_at_full_rank(conv, x_shape):
    torch.manual_seed(0)
    layer = Tucker2Conv.from_conv(conv, r_out=conv.out_channels, r_in=conv.in_channels)
    x = torch.randn(*x_shape)
    with torch.no_grad():
        diff = (layer(x) - conv(x)).abs().max().item()
    assert diff < 1e-4, f"full-rank Tucker-2 of {conv} differs from the dense layer by max abs {diff:.3e}"


def test_tucker2_truncation_loses_something():
    # The exactness test has teeth: one rank short, the layer is no longer the dense one.
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    layer = Tucker2Conv.from_conv(conv, r_out=11, r_in=8)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        diff = (layer(x) - conv(x)).abs().max().item()
    assert diff > 1e-3, f"a random 12-filter kernel at out-rank 11 should not be reproduced, max abs diff {diff:.3e}"


@pytest.mark.parametrize("r_out,r_in,bias", [(3, 2, True), (12, 8, False), (1, 1, True)])
def test_tucker2_parameter_count_is_the_formula(r_out, r_in, bias):
    conv = nn.Conv2d(8, 12, (3, 5), padding=1, bias=bias)
    layer = Tucker2Conv(conv=conv, r_out=r_out, r_in=r_in)
    # first 1x1 (in -> r_in) + core (r_in -> r_out, 3x5) + last 1x1 (r_out -> out) + the original bias
    formula = 8 * r_in + r_in * r_out * 15 + r_out * 12 + (12 if bias else 0)
    assert param_count(layer) == formula, f"ranks ({r_out}, {r_in}): {param_count(layer)} params != formula {formula}"
    assert tucker2_param_count(conv, r_out, r_in) == formula, f"tucker2_param_count {tucker2_param_count(conv, r_out, r_in)} != {formula}"


def test_tucker_method_replaces_each_eligible_conv_with_the_formula_count():
    base = make_base("digits_cnn", (1, 8, 8))
    ctx = ApplyContext(example_input=torch.randn(1, 1, 8, 8))
    out = searchspace.get_method("tucker")().apply(base, {"rank_out": 0.5, "rank_in": 0.25}, context=ctx)
    converted = ctx.notes["tucker.converted"]
    assert converted, f"the digits CNN has convolutions to decompose, notes {ctx.notes}"
    for name, (r_out, r_in) in converted.items():
        dense = base.get_submodule(name)
        assert (r_out, r_in) == tucker_ranks(dense, 0.5, 0.25), f"{name}: ranks {(r_out, r_in)} != {tucker_ranks(dense, 0.5, 0.25)}"
        got = param_count(out.get_submodule(name))
        assert got == tucker2_param_count(dense, r_out, r_in), f"{name}: {got} params != formula {tucker2_param_count(dense, r_out, r_in)}"
    saved = sum(param_count(base.get_submodule(n)) - param_count(out.get_submodule(n)) for n in converted)
    assert param_count(base) - param_count(out) == saved, "only the converted convolutions may change the parameter count"
