"""Glance and focus: the patch, the budget threshold, real skipping of the focus (eager and ONNX)."""

from __future__ import annotations

import math

import pytest
import torch

from searchspace import get_method
from searchspace.methods.exits import NEVER, VARIANTS
from searchspace.methods.glance import GlanceFocusNet, patch_origin
from tests.conftest import make_base, ort_kernel_counts, random_context

SHAPE = (1, 8, 8)
DIRECT = dict(scale=0.5, crop=0.5, thresholds="direct", threshold=0.5)


def _glance_net(**overrides) -> GlanceFocusNet:
    base = make_base("digits_cnn", SHAPE)
    return get_method("glance")().apply(base, {**DIRECT, **overrides}, context=random_context(SHAPE, base)).eval()


def _inputs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 3


def _glance_confidence(net: GlanceFocusNet, x: torch.Tensor) -> torch.Tensor:
    """Top softmax probability of the glance alone, computed as the glance path defines it."""
    with torch.no_grad():
        return torch.softmax(net.exit_paths()[0](x), dim=1).amax(dim=1)


def test_patch_origin_closed_form():
    # 4-long feature axis over 64 pixels: position i spans [16 i, 16 i + 16), centre 16 i + 8.
    got = patch_origin(torch.tensor([0, 1, 2, 3]), 4, 64, 32).tolist()
    assert got == [0, 8, 24, 32], f"32-pixel patches centred on 8, 24, 40, 56 and kept inside 64 px: {got}"
    got = patch_origin(torch.tensor([0, 1, 2]), 3, 10, 5).tolist()
    assert got == [0, 3, 5], f"3-long axis over 10 px (centres 1, 5, 8), 5-px patch: {got}"


def test_patch_is_the_full_resolution_window_at_the_peak():
    net = _glance_net()
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    gh, gw = net.grid
    saliency = torch.zeros(2, gh, gw)
    saliency[0, 0, gw - 1] = 1.0  # top right
    saliency[1, gh - 1, 0] = 1.0  # bottom left
    patch = net._patch(x, saliency)
    ch, cw = net.crop_size
    assert torch.equal(patch[0], x[0, :, :ch, 8 - cw :]), f"sample 0: patch {patch[0].tolist()} is not the top-right window"
    assert torch.equal(patch[1], x[1, :, 8 - ch :, :cw]), f"sample 1: patch {patch[1].tolist()} is not the bottom-left window"


def test_budget_threshold_known_answer():
    """With q, the glance keeps floor(N / (1 + q)) validation samples (MSDNet's plan for 2 exits):
    its threshold is that many-th highest glance confidence, and exactly those samples stop there."""
    net = _glance_net(thresholds="budget", q=1.0)
    assert net.thresholds[0] == NEVER, "before calibration nobody may stop at the glance"
    x = _inputs(300)
    conf = _glance_confidence(net, x)
    settings = net.calibrate(x, torch.zeros(300, dtype=torch.long))
    for setting in settings:
        q = setting["params"].get("glance.q", 1.0)
        keep = math.floor(300 * 1 / (1 + q))
        want = float(conf.sort(descending=True).values[keep - 1])
        assert setting["state"]["thresholds"] == [pytest.approx(want)], f"q={q}: threshold {setting['state']['thresholds']} != {keep}-th highest confidence {want}"
        net.use_setting(setting)
        stopped = int((net.exit_indices(x) == 0).sum())
        assert stopped == keep, f"q={q}: {stopped} samples stop at the glance, the plan is floor(300 / (1 + q)) = {keep}"
        assert setting["state"]["val_exit_fractions"] == [pytest.approx(keep / 300), pytest.approx(1 - keep / 300)]
    assert settings[0]["params"] == {} and len(settings) in (VARIANTS, VARIANTS + 1), f"{len(settings)} settings: the own one + {VARIANTS} q values"


def test_confident_glance_skips_the_focus_and_batches_match_batch1():
    net = _glance_net()
    calls: list[tuple[int, ...]] = []
    net.net.stages[0].register_forward_hook(lambda _m, a, _o: calls.append(tuple(a[0].shape)))
    x = _inputs(64)
    with torch.no_grad():
        for t, runs in ((0.0, [(1, 1, 4, 4)]), (NEVER, [(1, 1, 4, 4), (1, 1, 4, 4)])):
            calls.clear()
            net.use_setting({"state": {"thresholds": [t]}})
            net(x[:1])
            assert calls == runs, f"threshold {t}: the network ran on {calls}, expected {runs} (glance 4x4, patch 4x4)"
        conf = _glance_confidence(net, x)
        net.use_setting({"state": {"thresholds": [float(conf.median())]}})
        calls.clear()
        batched = net(x)
        unsure = int((conf < float(conf.median())).sum())
        assert [c[0] for c in calls] == [64, unsure], f"the focus must see only the {unsure} unsure samples, saw {calls}"
        single = torch.cat([net(x[i : i + 1]) for i in range(64)])
    assert torch.allclose(batched, single, atol=1e-5), f"batched and batch-1 outputs differ by {(batched - single).abs().max():.2e}"
    fused = net.exit_paths()[1](x)
    assert torch.allclose(fused.exp().sum(1), torch.ones(64)), "the fused output is the log of a mean of two softmaxes"


@pytest.mark.slow
def test_onnx_skips_the_focus_and_each_setting_exports_its_threshold(tmp_path):
    """In the ONNX file a confident glance runs the network's convolutions once, an unsure one twice
    (counted in ONNX Runtime's profile, not timed); each calibrated setting's file holds its own
    threshold and gives the module's outputs."""
    import onnx
    from onnx import numpy_helper

    from automl._artifact import build_artifact

    net = _glance_net(thresholds="budget", q=1.0)
    x = _inputs(200, seed=1)
    settings = net.calibrate(x[:100], torch.zeros(100, dtype=torch.long))[:3]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.net.modules())
    first = None
    for k, setting in enumerate(settings):
        net.use_setting(setting)
        folder = tmp_path / f"s{k}"
        artifact = build_artifact(net, x[:1], folder, like=first)
        first = first or folder
        init = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(folder / "model.onnx")).graph.initializer}
        assert init["thresholds"][0] == pytest.approx(setting["state"]["thresholds"][0]), f"setting {k}: ONNX threshold {init['thresholds']} != {setting['state']['thresholds']}"
        with torch.no_grad():
            want = net(x[100:])
            got = torch.cat([artifact(x[i : i + 1]) for i in range(100, 200)])
        assert torch.allclose(got, want, atol=1e-4), f"setting {k}: ONNX and module outputs differ by {(got - want).abs().max():.2e}"
    conf = _glance_confidence(net, x[100:])
    t = float(net.thresholds[0])
    sure, unsure = x[100:][conf >= t][:1], x[100:][conf < t][:1]
    assert len(sure) and len(unsure), f"fixture: the last setting (threshold {t}) must let some samples stop and some go on"
    path = tmp_path / f"s{len(settings) - 1}" / "model.onnx"
    profiles = [ort_kernel_counts(path, s) for s in (sure, unsure)]
    counts = [p["Conv"] for p in profiles]
    assert counts == [convs, 2 * convs], f"Conv kernels run (confident, unsure): {counts}, expected ({convs}, {2 * convs})"
    # The file is optimised although it keeps a named initializer: ONNX Runtime folds every
    # BatchNormalization and ReLU into its convolution, in the main graph and in the If's branch.
    unfused = [{op: p[op] for op in ("BatchNormalization", "Relu") if p[op]} for p in profiles]
    assert unfused == [{}, {}], f"BatchNormalization / ReLU kernels run beside the convolutions: {unfused}"


def test_a_library_model_that_cannot_run_on_a_searched_glance_size_is_left_out_with_the_size():
    """timm's DLA-46-C runs at 32 px but not at 40 or 48 (its tree joins maps of sizes that differ by
    one): at 64 px, glance.scale 0.625 is 40 px, so ``supports`` must refuse it by that size (a
    library model, like a factory's, knows the input size it was built for); searched sizes of 32 px
    only are accepted."""
    pytest.importorskip("timm")
    from automl._models import build_model

    base = build_model("timm:dla46_c", input_shape=(3, 64, 64), num_classes=4)
    assert base.sample_shape == (3, 64, 64)
    method = get_method("glance")
    reason = method().supports(base)
    assert reason is not None and "40x40" in reason and "glance.scale=0.625" in reason, reason
    even = method(ranges=method.narrowed({"scale": [0.5], "crop": [0.5]}))
    assert even.supports(base) is None


class _LeastSize(torch.nn.Module):
    """Asserts a least input size, as torchvision's ViT asserts its size (``torch._assert``)."""

    def __init__(self, least: int) -> None:
        super().__init__()
        self.least = least

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[-1] >= self.least, f"Wrong image width! Expected {self.least} but got {x.shape[-1]}!")
        return x


@pytest.mark.parametrize("least", [32, 16])
def test_a_model_that_asserts_its_input_size_is_left_out_with_the_size(least):
    """An assertion is how a model refuses a glance (torchvision's ViT): at 32 px, a model that needs
    32 px is left out by the first searched size (0.5: 16 px), one that runs from 16 px is not."""
    from automl._models import StagedNet

    nn = torch.nn
    stages = [nn.Sequential(_LeastSize(least), nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())]
    base = StagedNet(stages=stages, head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))).eval()
    base.sample_shape = (3, 32, 32)
    assert get_method("glance").hyperparameters["scale"].choices[0] == 0.5
    reason = get_method("glance")().supports(base)
    want = "the model does not run on a 16x16 input (glance.scale=0.5): Wrong image width! Expected 32 but got 16!"
    assert reason == (want if least == 32 else None), reason


class _ChannelNorm(torch.nn.Module):
    """Normalises each position over the channels (ConvNeXt's LayerNorm without its affine part)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=1, keepdim=True)) / (x.var(dim=1, keepdim=True, unbiased=False) + 1e-6).sqrt()


def test_a_map_flat_up_to_float_error_puts_the_patch_at_the_first_position_in_every_runtime(tmp_path):
    """A stage ending in a per-position channel norm has a channel mean of zero up to float error:
    its argmax followed each runtime's rounding (ONNX Runtime chose other patches than PyTorch on
    ConvNeXt). Read in steps of the output's magnitude the map is exactly flat, the patch is the
    first position's in PyTorch, and ONNX Runtime gives the module's outputs."""
    from automl._artifact import build_artifact
    from automl._models import StagedNet

    torch.manual_seed(0)
    nn = torch.nn
    stages = [nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), _ChannelNorm()), nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), _ChannelNorm())]
    base = StagedNet(stages=stages, head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))).eval()
    shape = (3, 32, 32)
    net = get_method("glance")().apply(base, {**DIRECT, "threshold": 1.0}, context=random_context(shape, base)).eval()
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = torch.nn.functional.interpolate(x, size=net.glance_size, mode="bilinear", align_corners=False)
        for stage in stages[: net.saliency_stage + 1]:
            h = stage(h)
        raw = h.mean(dim=1)
        assert raw.abs().max() < 1e-5 and len(set(raw.flatten(1).argmax(1).tolist())) > 1, "fixture: the raw map is float noise whose peak moves"
        _, saliency = net._glance(x)
        assert bool((saliency == 0).all()), saliency
        assert torch.equal(net._patch(x, saliency), x[:, :, : net.crop_size[0], : net.crop_size[1]])
        want = net(x)
    artifact = build_artifact(net, x[:1], tmp_path)
    got = torch.cat([artifact(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), f"ONNX Runtime differs by {(got - want).abs().max():.2e}"
