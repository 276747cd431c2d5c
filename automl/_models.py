"""Base models: built-in CNNs, torchvision architectures by name, and user factories.

Every base model is a :class:`StagedNet`: a list of feature ``stages`` followed by a classifier
``head``. Methods that need to know the network's layout (early exits attach to stage outputs,
second-order pooling replaces the head, compound scaling rebuilds at another width/depth) read it
from there instead of guessing per architecture.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ClassifierHead",
    "DigitsCNN",
    "MNIST1DCNN",
    "StagedNet",
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
        n = max(1, round(2 * depth))
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
        n = max(1, round(2 * depth))
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


def _torchvision(name: str, num_classes: int, in_channels: int) -> StagedNet:
    import torchvision

    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if hasattr(net, "layer4"):
        staged = _from_resnet(net)
    elif hasattr(net, "features") and hasattr(net, "classifier"):
        staged = _from_features_classifier(net)
    else:
        raise ValueError(f"torchvision model {name!r} has no known stage layout (resnet or features/classifier)")
    if in_channels != 3:
        first_name, first = next((n, m) for n, m in staged.named_modules() if isinstance(m, nn.Conv2d))
        staged.set_submodule(
            first_name,
            nn.Conv2d(in_channels, first.out_channels, first.kernel_size, stride=first.stride, padding=first.padding, bias=first.bias is not None),
        )
    return staged


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
        return _torchvision(name, num_classes, in_channels=input_shape[0] if len(input_shape) == 3 else 1)
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
