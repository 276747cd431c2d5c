"""The layout of a model brought whole, found from its traced graph (automl._layout): stages cut where
one tensor carries everything after a resolution drop, the head after the last feature map, the
same function and the library's key names; exits and iSQRT-COV then apply and export."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import searchspace
from automl._layout import LayoutError, find_layout
from automl._models import StagedNet, build_model, library_keys
from automl._onnx import export_program, to_onnx
from tests.conftest import random_context

SHAPE = (3, 32, 32)


class Functional(nn.Module):
    """A user's CNN written with functional ops: two branches joined by torch.cat, F.relu, pooling by
    F.max_pool2d, and a classifier on ``x.view(x.size(0), -1)`` of a fixed-size feature map."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.mid = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn(self.mid(x)))
        return self.fc(x.view(x.size(0), -1))


class Branching(nn.Module):
    """A forward whose control flow depends on the data: torch.fx cannot trace it."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        if h.mean() > 0:
            h = h * 2
        return self.fc(h.mean(dim=(2, 3)))


def functional(*, input_shape, num_classes):
    return Functional(input_shape[0], num_classes)


def branching(*, input_shape, num_classes):
    return Branching(num_classes)


def _library(name: str, classes: int) -> nn.Module:
    library, _, arch = name.partition(":")
    if library == "timm":
        return timm.create_model(arch, num_classes=classes)
    return torchvision.models.get_model(arch, num_classes=classes)


def _same_function(ours: StagedNet, theirs: nn.Module) -> None:
    """Under the key mapping the library's weights load into ours, and both compute the same logits."""
    names = library_keys(ours)
    state = theirs.state_dict()
    assert sorted(names.values()) == sorted(state), "the library keys are not the library's state dict keys"
    ours.load_state_dict({k: state[v] for k, v in names.items()})
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = theirs.eval()(x), ours.eval()(x)
    assert torch.allclose(got, want, atol=1e-5), f"split model differs from the library's by {float((got - want).abs().max())}"


def test_resnet18_splits_at_its_stem_and_four_resolution_levels():
    """torchvision resnet18 at 32 px: the stem (conv1-bn1-relu at 1/2), then maxpool + layer1 (1/4),
    layer2 (1/8), layer3 (1/16) and layer4 (1/32); the head is avgpool, flatten, fc."""
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", input_shape=SHAPE, num_classes=6)
    assert model.layout_reason is None
    ends = [tuple(s.graph.nodes)[-2].name for s in model.stages]
    assert ends == ["relu", "layer1_1_relu_1", "layer2_1_relu_1", "layer3_1_relu_1", "layer4_1_relu_1"], ends
    layout = find_layout(_library("torchvision:resnet18", 6), SHAPE)
    assert [shape for _, shape in layout.ends] == [(64, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert sorted(model.head.state_dict()) == ["fc.bias", "fc.weight"]
    assert {type(m).__name__ for m in model.head.modules()} >= {"AdaptiveAvgPool2d", "Linear"}
    assert sorted(model.stages[1].state_dict())[0].startswith("layer1.0."), "a stage keeps the library's qualified names"
    _same_function(model, _library("torchvision:resnet18", 6))


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v3_small", "torchvision:regnet_x_400mf", "timm:mobilenetv3_small_050"])
def test_library_models_split_into_stages_computing_the_same_function(name):
    torch.manual_seed(0)
    model = build_model(name, input_shape=SHAPE, num_classes=6)
    assert model.layout_reason is None and len(model.stages) >= 4 and not isinstance(model.head, nn.Identity), (name, len(model.stages))
    _same_function(model, _library(name, 6))


def test_a_functional_user_module_splits_and_computes_the_same_function():
    torch.manual_seed(0)
    model = build_model("tests.automl.test_layout:functional", input_shape=SHAPE, num_classes=5)
    # Two resolutions before the flatten: 32 px (stem, branches) and 16 -> 8 px after max-pool and
    # the strided conv; the head is the view and the linear layer.
    assert len(model.stages) == 3, [tuple(s.graph.nodes)[-2].name for s in model.stages]
    assert sorted(model.head.state_dict()) == ["fc.bias", "fc.weight"]
    theirs = Functional(3, 5)
    _same_function(model, theirs)


def test_the_layout_is_deterministic():
    a = build_model("tests.automl.test_layout:functional", input_shape=SHAPE, num_classes=5)
    b = build_model("tests.automl.test_layout:functional", input_shape=SHAPE, num_classes=5)
    assert [s.code for s in a.stages] == [s.code for s in b.stages] and a.head.code == b.head.code
    assert list(a.state_dict()) == list(b.state_dict()) and a.library_keys == b.library_keys


@pytest.mark.parametrize("model_name", ["tests.automl.test_layout:functional", "torchvision:resnet18"])
@pytest.mark.parametrize("name", ["exits", "isqrtcov"])
def test_exits_and_isqrtcov_attach_to_a_found_layout_and_export(name, model_name, tmp_path):
    """supports() is None, a dry-run apply runs, and the torch.export program in ONNX Runtime gives
    the eager logits within 1e-4 of the largest. iSQRT-COV on resnet18 runs at 64 px: at 32 px its
    last feature map has one position, whose covariance is zero for every input (refused)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    shape = (3, 64, 64) if (name, model_name) == ("isqrtcov", "torchvision:resnet18") else SHAPE
    base = build_model(model_name, input_shape=shape, num_classes=5).eval()
    method = searchspace.get_method(name)()
    assert method.supports(base) is None, method.supports(base)
    ctx = random_context(shape, base, seed=2)
    params = (
        {"points": "stages", "count": 2, "head": "avgpool", "pool": 2, "training": "frozen", "thresholds": "direct", "threshold_0": 0.6, "threshold_1": 0.6}
        if name == "exits" else {"dim": 8, "iterations": 5}
    )
    model = method.apply(base, params, context=ctx).eval()
    if name == "exits":
        assert len(model.exits) == 3, "two exits and the final head"
    x = torch.cat([b for b, _ in ctx.calibration()])[:8]
    with torch.no_grad():
        ref = model(x[:1]).numpy()
    assert ref.shape == (1, 5)
    program = export_program(model, x[:1])
    to_onnx(program, x[:1], tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x[:1].numpy()})[0]
    scale = float(np.abs(ref).max())
    assert np.isfinite(got).all() and float(np.abs(got - ref).max()) <= 1e-4 * scale, f"{name}: ONNX Runtime differs by {np.abs(got - ref).max()} (largest logit {scale})"


def test_an_untraceable_module_stays_one_stage_and_the_methods_say_why():
    model = build_model("tests.automl.test_layout:branching", input_shape=SHAPE, num_classes=4)
    assert len(model.stages) == 1 and isinstance(model.head, nn.Identity)
    assert "torch.fx cannot trace" in model.layout_reason
    for name in ("exits", "isqrtcov", "glance"):
        why = searchspace.get_method(name)().supports(model)
        assert why is not None and "torch.fx cannot trace" in why, f"{name}: {why}"
    with pytest.raises(LayoutError, match="torch.fx cannot trace"):
        find_layout(Branching(4), SHAPE)


def test_a_forward_that_branches_on_training_mode_is_refused():
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(x)
            if self.training:
                x = x * 0.5
            return self.fc(x.mean(dim=(2, 3)))

    with pytest.raises(LayoutError, match="training mode"):
        find_layout(Drop(), SHAPE)


class HeadDropout(nn.Module):
    """timm's classifier dropout: the model's own forward passes ``training=self.training``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2) -> None:
        super().__init__()
        self.a = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.b(F.relu(self.a(x)))).mean(dim=(2, 3))
        return self.fc(F.dropout(x, p=0.5, training=self.training))


def test_a_functional_dropout_given_the_mode_becomes_a_module_that_reads_it():
    """The layout is found, and the staged model computes the module's function in both modes:
    the same logits in eval mode, and in training mode the same dropout mask from the same seed
    (a frozen trace would give eval's logits, or drop in eval too)."""
    net = HeadDropout(num_classes=4)
    layout = find_layout(net, SHAPE)
    staged = nn.Sequential(*layout.stages, layout.head)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    net.eval(), staged.eval()
    with torch.no_grad():
        assert torch.equal(staged(x), net(x))
        net.train(), staged.train()
        torch.manual_seed(1)
        want = net(x)
        torch.manual_seed(1)
        got = staged(x)
        assert torch.equal(got, want)
        net.eval()
        assert not torch.allclose(want, net(x)), "dropout at p=0.5 must change the training-mode logits"


class Halve(nn.Module):
    """Reads the training mode in its forward, as stochastic depth does."""

    def forward(self, x):
        return x * 0.5 if self.training else x


class WithHalve(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 2) -> None:
        super().__init__()
        self.a = nn.Conv2d(in_channels, 4, 3, stride=2, padding=1)
        self.halve = Halve()
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.b(self.halve(F.relu(self.a(x)))).mean(dim=(2, 3)))


def test_a_submodule_that_reads_training_mode_stays_whole_and_keeps_both_modes():
    torch.manual_seed(0)
    net = WithHalve()
    layout = find_layout(net, SHAPE)
    staged = StagedNet(stages=layout.stages, head=layout.head)
    assert len(layout.stages) == 2 and any(isinstance(m, Halve) for m in staged.modules()), "Halve must stay a module"
    x = torch.randn(2, *SHAPE)
    for train in (False, True):
        net.train(train), staged.train(train)
        assert torch.allclose(staged(x), net(x), atol=1e-6), f"training={train}: the split model computes another function"


def test_a_model_without_feature_maps_keeps_one_stage():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(LayoutError, match="no feature map"):
        find_layout(flat, SHAPE)
