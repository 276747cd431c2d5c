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


@pytest.mark.parametrize("shape,ranks,modes", [((24, 16, 3, 3), (9, 5), (0, 1)), ((3, 12, 10, 3), (2, 5, 4, 2), (0, 1, 2, 3))])
def test_hooi_reaches_tensorlys_partial_tucker_error(shape, ranks, modes):
    """Our HOOI (Gram-matrix subspaces) against tensorly's reference HOOI (SVDs of the unfoldings):
    the same reconstruction error, orthonormal factors, and the modes left out untouched."""
    from tensorly import backend_context
    from tensorly.decomposition import partial_tucker
    from tensorly.tenalg import multi_mode_dot

    from searchspace._decompose import hooi

    torch.manual_seed(0)
    # Low-rank signal plus noise, so the truncated subspaces are well defined and HOOI has work to do.
    x = torch.randn(*shape, dtype=torch.float64)
    x = x + 3 * torch.einsum("a,b,c,d->abcd", *(torch.randn(n, dtype=torch.float64) for n in shape))
    core, factors = hooi(x, ranks, modes=modes, n_iter=20)
    with backend_context("pytorch"):
        ours = multi_mode_dot(core, factors, modes=list(modes))
        (ref_core, ref_factors), _ = partial_tucker(x, rank=list(ranks), modes=list(modes), init="svd", n_iter_max=20, tol=0, random_state=0)
        ref = multi_mode_dot(ref_core, ref_factors, modes=list(modes))
    err, ref_err = float((ours - x).norm() / x.norm()), float((ref - x).norm() / x.norm())
    assert err <= ref_err * (1 + 1e-6), f"HOOI error {err:.6f} is above tensorly's {ref_err:.6f}"
    assert 0.05 < err, f"the truncation must lose something (error {err:.2e}), or the comparison is empty"
    for m, f in zip(modes, factors):
        assert f.shape == (shape[m], ranks[modes.index(m)]), f"mode {m}: factor shape {tuple(f.shape)}"
        assert torch.allclose(f.T @ f, torch.eye(f.shape[1], dtype=f.dtype), atol=1e-10), f"mode {m}: factor columns not orthonormal"
    untouched = [d for d in range(len(shape)) if d not in modes]
    assert [core.shape[d] for d in untouched] == [shape[d] for d in untouched], f"modes {untouched} must keep their size, core {tuple(core.shape)}"
