"""iSQRT-COV: Newton-Schulz square root against an eigendecomposition, gradients, the head."""

from __future__ import annotations

import pytest
import torch

from searchspace import ApplyContext, get_method
from searchspace.methods.isqrtcov import ISqrtCovHead, covariance, newton_schulz_sqrt
from tests.conftest import make_base


def _eig_sqrt(s: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(s)
    return vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.transpose(-1, -2)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_newton_schulz_matches_eigendecomposition(d):
    gen = torch.Generator().manual_seed(d)
    # Covariances of random features: SPD with a spread of eigenvalues, as the head computes them.
    sigma = covariance(torch.randn(16, d, 64, generator=gen, dtype=torch.float64) * 3.0)
    exact = _eig_sqrt(sigma)
    approx = newton_schulz_sqrt(sigma, 5)
    rel = ((approx - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))).max().item()
    assert rel < 1e-3, f"d={d}: 5 Newton-Schulz iterations are {rel:.2e} (relative) from the eigendecomposition root"
    # More iterations never hurt: 3 is coarser than 5 (the search trades this for speed).
    rel3 = ((newton_schulz_sqrt(sigma, 3) - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))).max().item()
    assert rel3 > rel, f"d={d}: 3 iterations ({rel3:.2e}) should be coarser than 5 ({rel:.2e})"


def test_post_compensation_restores_scale():
    gen = torch.Generator().manual_seed(0)
    sigma = covariance(torch.randn(4, 3, 50, generator=gen, dtype=torch.float64))
    a = newton_schulz_sqrt(sigma, 5)
    b = newton_schulz_sqrt(sigma * 100.0, 5)
    assert torch.allclose(b, a * 10.0, rtol=1e-9), f"sqrt(100 S) must be 10 sqrt(S); max diff {float((b - a * 10).abs().max()):.2e}"


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_newton_schulz_gradcheck(iterations):
    gen = torch.Generator().manual_seed(iterations)
    x = torch.randn(2, 3, 20, generator=gen, dtype=torch.float64)
    sigma = covariance(x).requires_grad_(True)
    ok = torch.autograd.gradcheck(lambda s: newton_schulz_sqrt(s, iterations), (sigma,), eps=1e-6, atol=1e-5)
    assert ok, f"gradcheck failed at {iterations} iterations"


@pytest.mark.parametrize("shape", [(12, 7), (12, 5, 5), (12, 1)])
def test_head_shapes_scripting_and_single_position(shape):
    torch.manual_seed(0)
    head = ISqrtCovHead(in_channels=12, num_classes=10, dim=6, iterations=3).eval()
    x = torch.randn(3, *shape)
    y = head(x)
    assert y.shape == (3, 10), f"head output {tuple(y.shape)} != (3, 10) for features {shape}"
    assert torch.isfinite(y).all(), f"non-finite head output for features {shape} (a single position has a zero covariance)"
    scripted = torch.jit.script(head)
    assert torch.allclose(scripted(x), y, atol=1e-6), "TorchScript head differs from eager"


def test_isqrtcov_method_replaces_final_head():
    base = make_base("mnist1d_cnn", (40,))
    ctx = ApplyContext(example_input=torch.randn(1, 40))
    out = get_method("isqrtcov")().apply(base, {"dim": 8, "iterations": 5}, context=ctx)
    assert isinstance(out.head, ISqrtCovHead), f"final head is {type(out.head).__name__}, not ISqrtCovHead"
    assert not isinstance(base.head, ISqrtCovHead), "apply edited the base model's head"
    assert ctx.notes["isqrtcov.features"][0] == 25, f"head should read the 25-channel map, notes say {ctx.notes}"
    assert out(torch.randn(4, 40)).shape == (4, 10)


def test_isqrtcov_is_left_out_of_a_model_whose_stages_end_in_logits():
    """A module brought whole whose graph cannot be traced stays one stage ending in logits:
    supports() says so and why, instead of apply() raising. A library model gets its head from its
    traced graph (automl._layout) and is supported, as the built-in layouts are, where its last
    feature map has more than one position: ResNet-18 (the library's or the built-in staged one)
    reduces 32 px to 1 x 1 (a zero covariance for every input, refused) and 64 px to 2 x 2."""
    from automl import build_model

    untraceable = build_model("tests.fixtures.models:export_fixture", input_shape=(1, 8, 8), num_classes=10, options={"kind": "early_exit"})
    why = get_method("isqrtcov")().supports(untraceable)
    assert why is not None and "identity" in why and "torch.fx cannot trace" in why, why
    assert get_method("isqrtcov")().supports(build_model("torchvision:resnet18", input_shape=(3, 64, 64), num_classes=10)) is None
    why = get_method("isqrtcov")().supports(build_model("torchvision:resnet18", input_shape=(3, 32, 32), num_classes=10))
    assert why is not None and "[512, 1, 1] has a single position" in why, why
    # The built-in staged resnet18 records its feature map at build time too: the same rule.
    why = get_method("isqrtcov")().supports(build_model("resnet18", input_shape=(3, 32, 32), num_classes=10))
    assert why is not None and "[512, 1, 1] has a single position" in why, why
    assert get_method("isqrtcov")().supports(build_model("resnet18", input_shape=(3, 64, 64), num_classes=10)) is None


def test_isqrtcov_refuses_a_single_position_feature_map_in_apply():
    """Where the layout does not record the feature map's shape (a declared StagedNet), apply()
    finds it on the example and refuses one position rather than return constant logits."""
    from automl import build_model

    base = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)
    with pytest.raises(ValueError, match=r"at least 2 positions .* \[512, 1, 1\]"):
        get_method("isqrtcov")().apply(base, {"dim": 8, "iterations": 3}, context=ApplyContext(example_input=torch.randn(1, 3, 32, 32)))
