"""``supports()`` tells the truth, for every registered method on a fixed list of architectures.

Where a method's ``supports()`` is None, the method at its middle settings must apply (no training),
keep the base's output shape, export through the trial's artifact path and run in ONNX Runtime
within :func:`automl._coverage.ort_tolerance` of the eager model relative to its largest logit
(1e-4, or 10 times the base's own difference at the same inputs where that is larger; int8's
quantised artifact: exported and finite, its quantisation error recorded, not judged),
on inputs whose logits really depend on the input. Where it is not None, the reason is a sentence:
the study leaves the method out with it (automl._study.left_out_methods). Cells are judged by
:func:`automl._coverage.check_cell`, the function the coverage benchmark uses.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from automl._coverage import SPREAD, check_cell, input_dependent, ort_rel_diff, variants
from automl._models import build_model

IMAGE = (3, 32, 32)


#: (model, one sample's shape). The fast list runs unmarked; the functional module (a user's
#: forward with torch.cat of branches, F.relu and x.view, from test_layout) is marked slow. The library zoo
#: (torchvision, timm) is swept by benchmarks/method_coverage.py, which takes too long for the suite.
FAST = [("digits_cnn", (1, 8, 8))]
LIBRARY = [
    ("tests.automl.test_layout:functional", IMAGE),  # torch.cat of branches, F.relu, x.view(x.size(0), -1)
]
VARIANTS = variants()


@functools.lru_cache(maxsize=2)
def _base(name: str, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor, float, float]:
    """The base, its inputs, the spread of its logits and its own ONNX Runtime difference."""
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=10)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    spread = input_dependent(model, x)
    return model, x, spread, ort_rel_diff(model, x)[2]


def _check(model_name: str, shape: tuple[int, ...], label: str, method: str, fixed: dict) -> None:
    base, x, spread, base_diff = _base(model_name, shape)
    assert spread >= SPREAD, f"{model_name}: the logits barely depend on the input (spread {spread:.2g} < {SPREAD})"
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cell = check_cell(model_name, base, x, label, method, fixed, base_diff=base_diff)
    if cell.status == "n/a":
        reason = cell.reason.strip()
        assert len(reason.split()) >= 3, f"{label} on {model_name}: supports() must say why in a sentence, got {cell.reason!r}"
    else:
        assert cell.status == "works", f"{label} on {model_name}: supports() is None but {cell.step} failed: {cell.reason}"
    after = base.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"{label} edited the base in place: {changed[:3]}"


@pytest.mark.parametrize("label,method,fixed", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("model_name,shape", FAST, ids=[m.rsplit(":", 1)[-1] for m, _ in FAST])
def test_supports_none_means_the_method_applies_and_exports(model_name, shape, label, method, fixed):
    _check(model_name, shape, label, method, fixed)


@pytest.mark.slow
@pytest.mark.parametrize("label,method,fixed", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("model_name,shape", LIBRARY, ids=[m for m, _ in LIBRARY])
def test_supports_none_means_the_method_applies_and_exports_on_library_models(model_name, shape, label, method, fixed):
    _check(model_name, shape, label, method, fixed)


def test_mid_settings_are_the_middle_of_each_domain():
    """The middle choice of a categorical, the midpoint of a float range, replayed through Optuna."""
    import searchspace
    from automl._coverage import mid_params

    tucker = mid_params(searchspace.get_method("tucker")())
    assert tucker == pytest.approx({"rank_out": 0.525, "rank_in": 0.525})
    prune = mid_params(searchspace.get_method("prune")(), {"prune.criterion": "thinet"})
    assert prune["criterion"] == "thinet" and prune["per_stage"] is True, prune  # (False, True): the second
    assert prune["stage_ratio_0"] == pytest.approx(0.35), prune
    assert mid_params(searchspace.get_method("wsnet")())["stride"] == 2
    assert [v[0] for v in variants(["prune"])] == [f"prune:{c}" for c in ("apoz", "gates", "l1", "slimming", "thinet")]


def test_ort_tolerance_is_the_floor_or_k_times_the_base_difference():
    """1e-4 of the largest logit, unless the base itself differs by more than a tenth of that."""
    from automl._coverage import ORT_FACTOR, ORT_RTOL, ort_tolerance

    assert (ORT_RTOL, ORT_FACTOR) == (1e-4, 10.0)
    assert ort_tolerance(0.0) == 1e-4 and ort_tolerance(5e-6) == 1e-4
    assert ort_tolerance(1.8e-4) == pytest.approx(1.8e-3), "MobileNetV2's own float reordering at 32 px"


def test_ort_verdict_measures_an_ill_conditioned_model_against_its_float64_logits():
    """Known answers: ONNX Runtime beyond the plain tolerance passes only when it is as close to the
    float64 logits as PyTorch's float32 ones are (within ORT_FACTOR); a wrong result fails either way."""
    from automl._coverage import ORT_FACTOR, ort_verdict

    exact = torch.tensor([[10.0, -4.0, 2.0], [1.0, 3.0, -10.0]], dtype=torch.float64)
    noise = torch.tensor([[1.0, -1.0, 0.5], [0.0, 1.0, -0.5]], dtype=torch.float64)
    ref = (exact + 0.05 * noise).float()  # PyTorch's float32: 0.05 / 10 = 0.005 of the largest logit off
    # Well conditioned (float32 within 1e-7): the plain tolerance is all there is.
    assert ort_verdict(exact.float(), exact.float() + 5e-5, exact, 0.0) == (None, None)
    why, own = ort_verdict(exact.float(), (exact + 0.01).float(), exact, 0.0)
    assert why is not None and "from the float64 logits" in why and own == pytest.approx(0.0, abs=1e-7)
    # Ill conditioned: ONNX Runtime 3x as far from float64 as float32 is passes, 30x fails.
    close = exact - 3 * 0.05 * noise
    why, own = ort_verdict(ref, close.float(), exact, 0.0)
    assert why is None and own == pytest.approx(0.005, rel=1e-5)
    far = exact - 3 * ORT_FACTOR * 0.05 * noise
    why, own = ort_verdict(ref, far.float(), exact, 0.0)
    assert why is not None and own == pytest.approx(0.005, rel=1e-5), why
    # No float64 reference (a model that does not run in float64): the plain rule decides.
    why, own = ort_verdict(ref, close.float(), None, 0.0)
    assert why is not None and own is None and "> 0.0001" in why


def test_float64_logits_drop_the_float32_kernels_cached_for_inference():
    """WSNet keeps its materialised kernel once built in inference; the float64 copy rebuilds it in
    float64 (else conv2d would mix dtypes) and gives the float64 result of the same function."""
    from automl._coverage import float64_logits
    from searchspace.methods.wsnet import WSConv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    layer = WSConv.from_conv(conv, stride=1, repeat=2).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        ref = layer(x)  # builds the float32 cache
    assert layer.frozen is not None and layer.frozen.dtype == torch.float32
    exact = float64_logits(layer, x)
    assert exact is not None and exact.dtype == torch.float64
    want = torch.nn.functional.conv2d(layer.channel_sum(x.double()), layer.weight().double(), layer.bias.double(), 1, 1)
    assert torch.allclose(exact, want, rtol=0, atol=1e-12) and torch.allclose(exact.float(), ref, atol=1e-5)


def test_ort_without_nchwc_runs_the_same_file_on_the_plain_kernels(tmp_path):
    """The diagnosis a failed ONNX Runtime cell carries: the artifact's file with ONNX Runtime's
    NCHWc layout optimiser off computes the same function (within float error of PyTorch), and on a
    machine where that optimiser rewrites the convolutions (ONNX Runtime's profile runs NCHWc
    kernels), with other kernels: the logits are not bit for bit the artifact's."""
    from automl._artifact import build_artifact
    from automl._coverage import NCHWC, ort_without

    from tests.conftest import ort_kernel_counts

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    artifact = build_artifact(model, x[:1], tmp_path / "art")
    shipped = artifact(x)
    plain = ort_without(model, x)
    scale = ref.abs().max()
    assert float((plain - ref).abs().max() / scale) < 1e-5 and float((shipped - ref).abs().max() / scale) < 1e-5
    nchwc_kernels = sum(n for op, n in ort_kernel_counts(artifact.path, x[:1]).items() if "Nchwc" in op or "Reorder" in op)
    if nchwc_kernels:
        assert not torch.equal(plain, shipped), f"{NCHWC} off changed no kernel: the optimiser name is not ONNX Runtime's"
    else:
        assert torch.equal(plain, shipped)


def test_a_cell_re_estimates_batchnorm_statistics_as_fine_tuning_would():
    """A fresh layer whose output mean is not the base's: with the base's statistics in eval mode the
    next BatchNorm and ReLU zero every position (constant logits, as dwsep on DenseNet-121's stem);
    a trial's fine-tuning re-estimates them, and so does the cell before judging the model."""
    import searchspace
    from automl._coverage import _logit_spread, mid_params

    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    with torch.no_grad():
        base[0].bias.fill_(50.0)  # the base's first BatchNorm learns a mean of ~50
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert input_dependent(base, x) >= SPREAD
    method = searchspace.get_method("dwsep")()
    params = mid_params(method)
    assert params["init"] == "random" and params["first_layer"] is True, params
    stale = method.apply(base, params, context=searchspace.ApplyContext(example_input=x[:1])).eval()
    assert _logit_spread(stale, x) == 0.0, "the constructed case: the base's statistics zero the fresh layer's output"
    cell = check_cell("toy", base, x, "dwsep", "dwsep")
    assert (cell.status, cell.step) == ("works", "ort"), cell
    assert cell.params_after < cell.params_base
