"""Base models: built-in CNNs, torchvision architectures by name, and user factories.

Every base model is a :class:`StagedNet`: a list of feature ``stages`` followed by a classifier
``head``. Methods that need to know the network's layout (early exits attach to stage outputs,
second-order pooling replaces the head, compound scaling rebuilds at another width/depth) read it
from there instead of guessing per architecture.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ClassifierHead",
    "DigitsCNN",
    "MNIST1DCNN",
    "StagedNet",
    "TorchvisionNet",
    "build_model",
    "list_models",
]


class ClassifierHead(nn.Module):
    """Global average pooling, then a linear classifier."""

    def __init__(self, *, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            # flatten + mean rather than mean over tuple(range(...)): TorchScript cannot script the latter.
            x = x.flatten(2).mean(dim=2)
        return self.fc(self.dropout(x))


class StagedNet(nn.Module):
    """``head(stages[-1](...stages[0](x)))``: the layout every base model is given.

    Args:
        stages: feature extractors applied in order; exits may attach after any of them.
        head: maps the last stage's features to class logits.
    """

    def __init__(self, *, stages: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def scaled(self, *, width: float, depth: float) -> StagedNet:
        """A freshly initialised copy at another width and depth (EfficientNet-style scaling).

        Raises:
            NotImplementedError: this architecture does not declare how it scales.
        """
        raise NotImplementedError(f"{type(self).__name__} does not declare how it scales")


def _conv_bn_relu(cls: type[nn.Module], bn: type[nn.Module], c_in: int, c_out: int, k: int, **kw: Any) -> nn.Sequential:
    return nn.Sequential(cls(c_in, c_out, k, bias=False, **kw), bn(c_out), nn.ReLU(inplace=True))


class DigitsCNN(StagedNet):
    """A small 2D CNN for 8x8 digit images: two stages of 3x3 conv-BN-ReLU blocks.

    Args:
        in_channels: image channels.
        num_classes: classes.
        width: multiplier on the channel counts (16, 32, 64 at 1.0).
        depth: multiplier on the number of blocks per stage (2 at 1.0).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, width: float = 1.0, depth: float = 1.0) -> None:
        c1, c2, c3 = (max(4, round(c * width)) for c in (16, 32, 64))
        n = _repeats(2, depth)
        cbr = lambda a, b: _conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, a, b, 3, padding=1)  # noqa: E731
        stage1 = [cbr(in_channels, c1)] + [cbr(c1 if i == 0 else c2, c2) for i in range(n - 1)]
        stage1.append(nn.MaxPool2d(2))
        last = c2 if n > 1 else c1
        stage2 = [cbr(last if i == 0 else c3, c3) for i in range(n)]
        super().__init__(
            stages=[nn.Sequential(*stage1), nn.Sequential(*stage2)],
            head=ClassifierHead(in_features=c3, num_classes=num_classes),
        )
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, depth=depth)

    def scaled(self, *, width: float, depth: float) -> DigitsCNN:
        c = self.config
        return DigitsCNN(in_channels=c["in_channels"], num_classes=c["num_classes"], width=c["width"] * width, depth=c["depth"] * depth)


class MNIST1DCNN(StagedNet):
    """The 1D CNN of the MNIST-1D paper (Greydanus & Kobak, 2020; arXiv 2011.14439).

    Three Conv1d layers with ``channels`` filters (kernel 5, 3, 3; stride 2; ReLU), then a linear
    classifier on the flattened features; 25 channels give the paper's ~5K-parameter model.
    Stage 0 holds the first conv, stage 1 the other two, so exits have two points to attach to.

    Args:
        length: input sequence length (40 for MNIST-1D).
        num_classes: classes.
        channels: filters per conv layer.
        depth: multiplier on the number of 3-tap conv layers (2 at 1.0).
    """

    def __init__(self, *, length: int = 40, num_classes: int = 10, channels: int = 25, depth: float = 1.0) -> None:
        n = _repeats(2, depth)
        convs: list[nn.Module] = [nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU()]
        later: list[nn.Module] = []
        for _ in range(n):
            later += [nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU()]
        out_len = (length + 2 - 5) // 2 + 1
        for _ in range(n):
            out_len = (out_len + 2 - 3) // 2 + 1
        super().__init__(
            stages=[nn.Sequential(*convs), nn.Sequential(*later)],
            head=nn.Sequential(nn.Flatten(1), nn.Linear(channels * out_len, num_classes)),
        )
        self.config = dict(length=length, num_classes=num_classes, channels=channels, depth=depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return super().forward(x)

    def scaled(self, *, width: float, depth: float) -> MNIST1DCNN:
        c = self.config
        return MNIST1DCNN(length=c["length"], num_classes=c["num_classes"], channels=max(4, round(c["channels"] * width)), depth=c["depth"] * depth)


def _from_resnet(net: nn.Module) -> StagedNet:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    head = ClassifierHead(in_features=net.fc.in_features, num_classes=net.fc.out_features)
    head.fc = net.fc
    return StagedNet(stages=[stem, net.layer2, net.layer3, net.layer4], head=head)


def _from_features_classifier(net: nn.Module, n_stages: int = 4) -> StagedNet:
    # mobilenet/efficientnet style: `features` (a Sequential of blocks) + `classifier`.
    blocks = list(net.features)
    bounds = [round(i * len(blocks) / n_stages) for i in range(n_stages + 1)]
    stages = [nn.Sequential(*blocks[a:b]) for a, b in zip(bounds, bounds[1:])]
    linear = [m for m in net.classifier.modules() if isinstance(m, nn.Linear)][-1]
    drop = [m for m in net.classifier.modules() if isinstance(m, nn.Dropout)]
    head = ClassifierHead(in_features=linear.in_features, num_classes=linear.out_features, dropout=drop[0].p if drop else 0.0)
    head.fc = linear
    return StagedNet(stages=stages, head=head)


#: torchvision ResNets by name: (block, blocks per stage).
_RESNETS = {"resnet18": ("BasicBlock", (2, 2, 2, 2)), "resnet34": ("BasicBlock", (3, 4, 6, 3)), "resnet50": ("Bottleneck", (3, 4, 6, 3))}
#: MobileNetV2's inverted residual setting (t, c, n, s) from torchvision / the paper's Table 2.
_MOBILENET_V2 = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def _repeats(n: int, depth: float) -> int:
    # EfficientNet's round_repeats (and torchvision's adjust_depth): ceil, so that a stage never
    # disappears; every built-in net scales its depth through this. The 1e-9 keeps a product of
    # multipliers that should be 1.0 (1.2**phi * 1.2**-phi) from rounding up to an extra block.
    return max(1, math.ceil(n * depth - 1e-9))


def _scaled_resnet(name: str, num_classes: int, width: float, depth: float) -> nn.Module:
    """A torchvision ResNet with ``width`` x the planes of each stage and ``depth`` x its blocks,
    built by torchvision's own ``_make_layer`` and initialised as torchvision initialises it."""
    from torchvision.models import resnet

    block_name, layers = _RESNETS[name]
    block = getattr(resnet, block_name)
    net = resnet.ResNet(block, [_repeats(n, depth) for n in layers], num_classes=num_classes)
    if width == 1.0:
        return net
    planes = [max(8, round(c * width)) for c in (64, 128, 256, 512)]
    net.inplanes = planes[0]
    net.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(planes[0])
    for i, (c, n) in enumerate(zip(planes, layers)):
        setattr(net, f"layer{i + 1}", net._make_layer(block, c, _repeats(n, depth), stride=1 if i == 0 else 2))
    net.fc = nn.Linear(planes[-1] * block.expansion, num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def _check_scalable(name: str) -> None:
    if name not in _RESNETS and name != "mobilenet_v2":
        raise NotImplementedError(f"torchvision model {name!r} does not declare how it scales here (resnet18/34/50 and mobilenet_v2 do)")


def _torchvision_net(name: str, num_classes: int, width: float, depth: float) -> nn.Module:
    import torchvision

    if (width, depth) == (1.0, 1.0):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _check_scalable(name)
    if name in _RESNETS:
        return _scaled_resnet(name, num_classes, width, depth)
    setting = [[t, c, _repeats(n, depth), s] for t, c, n, s in _MOBILENET_V2]
    return torchvision.models.MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting)


class TorchvisionNet(StagedNet):
    """A torchvision architecture (freshly initialised) in the staged layout.

    ResNets: the stem and ``layer1`` form stage 0, ``layer2..4`` stages 1-3. MobileNet/EfficientNet
    style nets (``features`` + ``classifier``): ``features`` split into 4 stages of about equal
    length. Compound scaling (:meth:`scaled`) is declared for the ResNets (planes and blocks per
    stage) and MobileNetV2 (its own ``width_mult`` and the repeats ``n`` of its setting).

    Args:
        arch: torchvision model name.
        num_classes: classes.
        in_channels: input channels; the first convolution is replaced when it is not 3.
        width: multiplier on the channels of every stage.
        depth: multiplier on the blocks of every stage (rounded up, as EfficientNet does).
    """

    def __init__(self, *, arch: str, num_classes: int, in_channels: int = 3, width: float = 1.0, depth: float = 1.0) -> None:
        net = _torchvision_net(arch, num_classes, width, depth)
        if hasattr(net, "layer4"):
            staged = _from_resnet(net)
        elif hasattr(net, "features") and hasattr(net, "classifier"):
            staged = _from_features_classifier(net)
        else:
            raise ValueError(f"torchvision model {arch!r} has no known stage layout (resnet or features/classifier)")
        super().__init__(stages=list(staged.stages), head=staged.head)
        if in_channels != 3:
            first_name, first = next((n, m) for n, m in self.named_modules() if isinstance(m, nn.Conv2d))
            self.set_submodule(
                first_name,
                nn.Conv2d(in_channels, first.out_channels, first.kernel_size, stride=first.stride, padding=first.padding, bias=first.bias is not None),
            )
        self.config = dict(arch=arch, num_classes=num_classes, in_channels=in_channels, width=width, depth=depth)

    def scaled(self, *, width: float, depth: float) -> TorchvisionNet:
        c = self.config
        _check_scalable(c["arch"])
        return TorchvisionNet(arch=c["arch"], num_classes=c["num_classes"], in_channels=c["in_channels"], width=c["width"] * width, depth=c["depth"] * depth)


_BUILTIN: dict[str, Callable[..., StagedNet]] = {
    "digits_cnn": lambda *, input_shape, num_classes, **kw: DigitsCNN(in_channels=input_shape[0], num_classes=num_classes, **kw),
    "mnist1d_cnn": lambda *, input_shape, num_classes, **kw: MNIST1DCNN(length=input_shape[-1], num_classes=num_classes, **kw),
}
_TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")


def list_models() -> list[str]:
    """Names accepted as ``base.model`` (besides a ``module:function`` factory)."""
    return sorted([*_BUILTIN, *_TORCHVISION])


def build_model(name: str, *, input_shape: Sequence[int], num_classes: int, options: dict[str, Any] | None = None) -> StagedNet:
    """Build a freshly initialised base model.

    Args:
        name: a built-in name, a torchvision architecture, or ``"module:function"``; a factory is
            called as ``function(input_shape=..., num_classes=..., **options)`` and may return a
            :class:`StagedNet` or any module (which then counts as a single stage).
        input_shape: one sample's shape, e.g. ``(1, 8, 8)`` or ``(40,)``.
        num_classes: number of classes of the dataset.
        options: extra keyword arguments for the constructor (e.g. ``width``, ``channels``).

    Raises:
        ValueError: unknown name, or a factory that cannot be imported.
    """
    options = dict(options or {})
    if name in _BUILTIN:
        return _BUILTIN[name](input_shape=tuple(input_shape), num_classes=num_classes, **options)
    if name in _TORCHVISION:
        return TorchvisionNet(arch=name, num_classes=num_classes, in_channels=input_shape[0] if len(input_shape) == 3 else 1)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"base model factory {name!r} cannot be imported: {exc}") from exc
        net = factory(input_shape=tuple(input_shape), num_classes=num_classes, **options)
        if not isinstance(net, nn.Module):
            raise ValueError(f"base model factory {name!r} must return a torch.nn.Module, got {type(net).__name__}")
        if not isinstance(net, StagedNet):
            net = StagedNet(stages=[net], head=nn.Identity())
        return net
    raise ValueError(f"unknown base model {name!r}; allowed: {', '.join(list_models())} or 'module:function'")
