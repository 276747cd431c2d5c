"""Base models: built-in CNNs, torchvision and timm architectures by name, and user factories.

Every base model is a :class:`StagedNet`: a list of feature ``stages`` followed by a classifier
``head``. Methods that need to know the network's layout (early exits attach to stage outputs,
second-order pooling replaces the head, compound scaling rebuilds at another width/depth) read it
from there instead of guessing per architecture.

Names (``base.model``):

- the built-ins (``digits_cnn``, ``mnist1d_cnn``) and the short torchvision names of
  :func:`list_models`, split into stages by this module (:class:`TorchvisionNet`);
- ``torchvision:NAME`` (any classification model of torchvision) and ``timm:NAME`` (any timm
  model): the library's own module, built by the library's own builder, and used exactly as a
  user's ``module:function`` factory module is (below);
- ``module:function``: a user factory, returning a :class:`StagedNet` (its layout declared) or any
  module, whose layout is then found from its traced graph (:func:`automl._layout.find_layout`):
  stages cut where one tensor carries everything after each drop in resolution, and the head after
  the last feature map (pooling, flatten, classifier). A module whose graph cannot be traced or has
  no such feature map is one stage with an identity head, and :attr:`StagedNet.layout_reason` says why.

Every base model records :attr:`StagedNet.library_keys`: its state-dict keys under the names the
library (or the factory's module) gives them, so a checkpoint saved from the library's model loads
into it (:mod:`automl._weights`).
"""

from __future__ import annotations

import difflib
import importlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from automl._layout import LayoutError, find_layout

__all__ = [
    "ClassifierHead",
    "DigitsCNN",
    "LibraryNet",
    "MNIST1DCNN",
    "StagedNet",
    "TorchvisionNet",
    "LIBRARIES",
    "build_model",
    "check_model_name",
    "library_keys",
    "library_models",
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
        #: Own state-dict key -> the key the source library (or a factory's module) names it;
        #: empty where the names are the model's own.
        self.library_keys: dict[str, str] = {}
        #: Why the layout is not known beyond what ``stages`` and ``head`` show (a module brought
        #: whole that could not be traced or split), for methods to say why they cannot apply.
        self.layout_reason: str | None = None
        #: Shape (no batch axis) of the last feature map, the head's input, where the layout was
        #: found in the traced graph at the data's input shape; None where not measured.
        self.feature_shape: tuple[int, ...] | None = None
        #: One input sample's shape the model was built for (None where unknown).
        self.sample_shape: tuple[int, ...] | None = None

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
    layers = [m for m in net.classifier.modules() if not isinstance(m, nn.Sequential)]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    drop = [m for m in layers if isinstance(m, nn.Dropout)]
    if len(linears) == 1 and len(layers) == len(linears) + len(drop):
        # [Dropout,] Linear (MobileNetV2, EfficientNet): the head's own dropout and fc.
        head = ClassifierHead(in_features=linears[0].in_features, num_classes=linears[0].out_features, dropout=drop[0].p if drop else 0.0)
        head.fc = linears[0]
    else:
        # A deeper classifier (MobileNetV3: Linear, Hardswish, Dropout, Linear) is kept whole: every
        # layer of it is part of the function the weights were trained for.
        head = ClassifierHead(in_features=linears[0].in_features, num_classes=linears[-1].out_features)
        head.fc = net.classifier
    return StagedNet(stages=stages, head=head)


#: torchvision ResNets by name: (block, blocks per stage).
_RESNETS = {"resnet18": ("BasicBlock", (2, 2, 2, 2)), "resnet34": ("BasicBlock", (3, 4, 6, 3)), "resnet50": ("Bottleneck", (3, 4, 6, 3))}
#: torchvision's EfficientNet B0-B7: the (width, depth) multipliers their builders pass to
#: ``_efficientnet_conf`` (the paper's compound scaling of B0, Table 7 of arXiv 1905.11946).
_EFFICIENTNETS = {
    "efficientnet_b0": (1.0, 1.0), "efficientnet_b1": (1.0, 1.1), "efficientnet_b2": (1.1, 1.2), "efficientnet_b3": (1.2, 1.4),
    "efficientnet_b4": (1.4, 1.8), "efficientnet_b5": (1.6, 2.2), "efficientnet_b6": (1.8, 2.6), "efficientnet_b7": (2.0, 3.1),
}
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
    block_name, layers = _RESNETS[name]
    return _resnet_at(block_name, layers, num_classes, width, depth)


def _resnet_at(block_name: str, layers: Sequence[int], num_classes: int, width: float, depth: float, **kwargs: Any) -> nn.Module:
    """torchvision's ``ResNet(block, layers, **kwargs)`` (any of its builders: ResNet, ResNeXt,
    Wide ResNet, through ``groups`` / ``width_per_group``) with ``depth`` x the blocks of each stage
    (rounded up) and ``width`` x the planes of the stem and of every stage (rounded, at least 8)."""
    from torchvision.models import resnet

    block = getattr(resnet, block_name)
    net = resnet.ResNet(block, [_repeats(n, depth) for n in layers], num_classes=num_classes, **kwargs)
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
        names = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
        if hasattr(net, "layer4"):
            staged = _from_resnet(net)
        elif hasattr(net, "features") and hasattr(net, "classifier"):
            staged = _from_features_classifier(net)
        else:
            raise ValueError(f"torchvision model {arch!r} has no known stage layout (resnet or features/classifier)")
        super().__init__(stages=list(staged.stages), head=staged.head)
        # The stages hold torchvision's own modules, so each tensor is torchvision's under another name.
        self.library_keys = {k: names[id(t)] for k, t in self.state_dict(keep_vars=True).items()}
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


#: Library prefixes of ``base.model`` (``torchvision:resnet18``, ``timm:resnetv2_50``).
LIBRARIES = ("torchvision", "timm")
#: torchvision builders whose default (auxiliary classifiers in training mode) returns a tuple, not
#: the logits: built without them, as torchvision builds them for its pretrained weights.
_AUX_LOGITS = ("googlenet", "inception_v3")


def list_models() -> list[str]:
    """Names accepted as ``base.model`` (besides ``torchvision:NAME``, ``timm:NAME`` and a ``module:function`` factory)."""
    return sorted([*_BUILTIN, *_TORCHVISION])


def library_models(library: str) -> list[str]:
    """The architectures ``library:NAME`` accepts: torchvision's classification models, or timm's models.

    Raises:
        ValueError: the library is not installed (timm is an optional extra).
    """
    if library == "torchvision":
        import torchvision

        return sorted(torchvision.models.list_models(module=torchvision.models))
    if library == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError("timm models need the timm package: pip install 'automl-compress[timm]'") from None
        return timm.list_models()
    raise ValueError(f"unknown model library {library!r}; allowed: {', '.join(LIBRARIES)}")


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` (one line, listing what is allowed) when ``name`` is not a library model.

    Only ``torchvision:NAME`` and ``timm:NAME`` are checked here; the short names and
    ``module:function`` factories are checked by their callers.
    """
    library, _, arch = name.partition(":")
    allowed = library_models(library)
    if library == "timm":
        import timm

        if timm.is_model(timm.models.split_model_name_tag(arch)[0]):
            return
        close = difflib.get_close_matches(arch, allowed, n=5)
        raise ValueError(
            f"unknown timm model {arch!r}; allowed: any of timm.list_models() ({len(allowed)} names)"
            + (f", e.g. {', '.join(close)}" if close else "")
        )
    if arch not in allowed:
        raise ValueError(f"unknown torchvision classification model {arch!r}; allowed: {', '.join(allowed)}")


def _library_module(
    library: str, arch: str, input_shape: tuple[int, ...], num_classes: int, options: dict[str, Any], recipe: dict[str, Any] | None = None,
    width: float = 1.0, depth: float = 1.0,
) -> nn.Module:
    """The library's own model, freshly initialised, at ``num_classes`` and the input's channels;
    with a scaling ``recipe`` (:func:`_scale_recipe`), at ``width`` and ``depth`` times its own."""
    check_model_name(f"{library}:{arch}")
    if len(input_shape) != 3:
        raise ValueError(f"{library}:{arch} takes images (channels, height, width), but the data's samples have shape {tuple(input_shape)}")
    channels = int(input_shape[0])
    if library == "timm":
        import timm

        extra: dict[str, Any] = {}
        if recipe is not None and (width, depth) != (1.0, 1.0):
            # Multiples of 8, as timm rounds its own widths: some blocks split channels into paths or groups.
            extra = {"layers": [_repeats(n, depth) for n in recipe["layers"]], "channels": [max(8, 8 * round(c * width / 8)) for c in recipe["channels"]]}
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=channels, **{**options, **extra})
    import torchvision

    if arch in _AUX_LOGITS:
        # init_weights=True is what torchvision does when it is left unset, minus its warning.
        options = {"aux_logits": False, "init_weights": True, **options}
    if recipe is None or (width, depth) == (1.0, 1.0):
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **options)
    elif recipe["family"] == "resnet":
        net = _resnet_at(recipe["block"], recipe["layers"], num_classes, width, depth, groups=recipe["groups"], width_per_group=recipe["width_per_group"], **options)
    elif recipe["family"] == "efficientnet":
        from functools import partial

        from torchvision.models import efficientnet

        setting, last = efficientnet._efficientnet_conf(arch, width_mult=recipe["width_mult"] * width, depth_mult=recipe["depth_mult"] * depth)
        norm = partial(nn.BatchNorm2d, eps=recipe["bn_eps"], momentum=recipe["bn_momentum"])
        net = efficientnet.EfficientNet(setting, recipe["dropout"], last_channel=last, num_classes=num_classes, norm_layer=norm, **options)
    else:  # mobilenet_v2
        setting = [[t, c, _repeats(n, depth), s] for t, c, n, s in _MOBILENET_V2]
        net = torchvision.models.MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting, **options)
    if channels != 3:
        first_name, first = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
        net.set_submodule(
            first_name,
            nn.Conv2d(channels, first.out_channels, first.kernel_size, stride=first.stride, padding=first.padding,
                      dilation=first.dilation, groups=first.groups, bias=first.bias is not None),
        )
    return net


def _scale_recipe(library: str, arch: str, net: nn.Module) -> dict[str, Any] | str:
    """How ``net`` (the library's ``arch``) is rebuilt at another width and depth, or why it cannot be.

    Declared for the families whose builders take a width and a depth: torchvision's ResNets
    (ResNet, ResNeXt, Wide ResNet: blocks per stage, and the planes of the stem and every stage),
    its MobileNetV2 (``width_mult`` and the repeats of its inverted-residual setting), its
    EfficientNet B0-B7 (their own width and depth multipliers, times the scaling's), and timm's
    ResNets (its ``layers`` and ``channels`` arguments: blocks and planes per stage, the planes
    rounded to multiples of 8).
    """
    if library == "torchvision":
        from torchvision.models import MobileNetV2, ResNet

        if isinstance(net, ResNet):
            return {
                "family": "resnet", "block": type(net.layer1[0]).__name__,
                "layers": [len(getattr(net, f"layer{i}")) for i in range(1, 5)], "groups": net.groups, "width_per_group": net.base_width,
            }
        if isinstance(net, MobileNetV2) and arch == "mobilenet_v2":
            return {"family": "mobilenet_v2"}
        if arch in _EFFICIENTNETS:
            bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
            drop = next(m for m in net.classifier if isinstance(m, nn.Dropout))
            width_mult, depth_mult = _EFFICIENTNETS[arch]
            return {"family": "efficientnet", "width_mult": width_mult, "depth_mult": depth_mult, "dropout": drop.p, "bn_eps": bn.eps, "bn_momentum": bn.momentum}
        return f"torchvision:{arch} is not declared to scale (the ResNet family, mobilenet_v2 and efficientnet_b0..b7 are)"
    from timm.models.resnet import ResNet as TimmResNet

    if isinstance(net, TimmResNet):
        stages = [getattr(net, f"layer{i}") for i in range(1, 5)]
        planes = [info["num_chs"] // type(stage[0]).expansion for info, stage in zip(net.feature_info[-4:], stages)]
        return {"family": "timm_resnet", "layers": [len(stage) for stage in stages], "channels": planes}
    return f"timm:{arch} is not declared to scale (timm's ResNets, through their `layers` and `channels` arguments, are)"


class LibraryNet(StagedNet):
    """A torchvision or timm model brought by name, in the layout found in its traced graph
    (:func:`_as_staged`), which knows how to rebuild itself at another width and depth where its
    family declares it (:func:`_scale_recipe`).

    Args:
        stages, head: as :class:`StagedNet`.
        config: ``library``, ``arch``, ``input_shape``, ``num_classes``, ``options`` (the builder's
            arguments), ``width`` and ``depth`` (multipliers on the library's architecture) and
            ``recipe`` (a dict, or a str saying why the model does not scale).
    """

    def __init__(self, *, stages: Sequence[nn.Module], head: nn.Module, config: dict[str, Any]) -> None:
        super().__init__(stages=stages, head=head)
        self.config = config

    def scaled(self, *, width: float, depth: float) -> LibraryNet:
        c = self.config
        if isinstance(c["recipe"], str):
            raise NotImplementedError(c["recipe"])
        width, depth = c["width"] * width, c["depth"] * depth
        net = _library_module(c["library"], c["arch"], c["input_shape"], c["num_classes"], c["options"], c["recipe"], width=width, depth=depth)
        out = _as_staged(net, c["input_shape"], config={**c, "width": width, "depth": depth})
        assert isinstance(out, LibraryNet)
        return out


def _as_staged(net: nn.Module, input_shape: Sequence[int], config: dict[str, Any] | None = None) -> StagedNet:
    """A module brought whole, split into the stages and head found in its traced graph
    (:func:`automl._layout.find_layout`); where none is found, one stage with an identity head and
    the reason in :attr:`StagedNet.layout_reason`. Either way its keys keep the module's names as
    library keys (each part holds the module's own submodules under their qualified names). With a
    library model's ``config``, a :class:`LibraryNet`."""

    def staged_net(stages: Sequence[nn.Module], head: nn.Module) -> StagedNet:
        return StagedNet(stages=stages, head=head) if config is None else LibraryNet(stages=stages, head=head, config=config)

    try:
        layout = find_layout(net, input_shape)
    except LayoutError as exc:
        staged = staged_net([net], nn.Identity())
        staged.library_keys = {f"stages.0.{k}": k for k in net.state_dict()}
        staged.layout_reason = f"no layout found in the traced graph: {exc}"
        return staged
    staged = staged_net(layout.stages, layout.head)
    staged.feature_shape = tuple(int(d) for d in layout.ends[-1][1])
    staged.train(net.training)
    staged.library_keys = {f"stages.{i}.{k}": k for i, stage in enumerate(layout.stages) for k in stage.state_dict()}
    staged.library_keys.update({f"head.{k}": k for k in layout.head.state_dict()})
    if len(layout.stages) == 1:
        staged.layout_reason = f"the traced graph has no drop in resolution carried by a single tensor before its last feature map ({layout.ends[-1][0]})"
    return staged


def library_keys(model: nn.Module) -> dict[str, str]:
    """Each state-dict key of ``model`` -> the name the library (or the factory's module) gives it.

    A key the model names as the library does maps to itself.
    """
    own = getattr(model, "library_keys", None) or {}
    return {k: own.get(k, k) for k in model.state_dict()}


def _with_feature_shape(net: StagedNet, input_shape: Sequence[int]) -> StagedNet:
    """``net`` with ``sample_shape`` and ``feature_shape`` (one sample's last feature map, what the
    head reads; from one forward pass at ``input_shape`` where not yet known) recorded: methods that
    depend on the input size (``isqrtcov``, ``glance``) then say in ``supports()`` whether it suits
    them at the data's size."""
    net.sample_shape = tuple(int(d) for d in input_shape)
    if net.feature_shape is not None or isinstance(net.head, nn.Identity):
        return net
    seen: list[tuple[int, ...]] = []
    hook = net.head.register_forward_pre_hook(lambda _m, args: seen.append(tuple(int(d) for d in args[0].shape[1:])))
    training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *input_shape))
    except Exception:  # noqa: BLE001 - a base that does not run at this size fails where it is trained, with that reason
        return net
    finally:
        hook.remove()
        net.train(training)
    net.feature_shape = seen[0] if seen else None
    return net


def build_model(name: str, *, input_shape: Sequence[int], num_classes: int, options: dict[str, Any] | None = None) -> StagedNet:
    """Build a freshly initialised base model.

    Args:
        name: a built-in name, a short torchvision name (:func:`list_models`), ``"torchvision:NAME"``,
            ``"timm:NAME"``, or ``"module:function"``; a factory is called as
            ``function(input_shape=..., num_classes=..., **options)`` and may return a
            :class:`StagedNet` or any module (then split into the stages and head found in its
            traced graph, or one stage where none are found). A library model is the library's
            own module used as a factory's module is.
        input_shape: one sample's shape, e.g. ``(1, 8, 8)`` or ``(40,)``.
        num_classes: number of classes of the dataset.
        options: extra keyword arguments for the constructor (e.g. ``width``, ``channels``; for a
            library model its builder's arguments, e.g. ``image_size`` of a torchvision ViT).

    Raises:
        ValueError: unknown name, or a factory that cannot be imported.
    """
    options = dict(options or {})
    if name in _BUILTIN:
        return _with_feature_shape(_BUILTIN[name](input_shape=tuple(input_shape), num_classes=num_classes, **options), input_shape)
    if name in _TORCHVISION:
        net = TorchvisionNet(arch=name, num_classes=num_classes, in_channels=input_shape[0] if len(input_shape) == 3 else 1)
        return _with_feature_shape(net, input_shape)
    library, _, arch = name.partition(":")
    if library in LIBRARIES:
        net = _library_module(library, arch, tuple(input_shape), num_classes, options)
        try:
            recipe = _scale_recipe(library, arch, net)
        except Exception as exc:  # noqa: BLE001 - a family member built unlike the rest: it does not scale, and says why
            recipe = f"{library}:{arch} does not have the layout its family's scaling reads ({type(exc).__name__}: {exc})"
        config = {
            "library": library, "arch": arch, "input_shape": tuple(input_shape), "num_classes": num_classes, "options": options,
            "width": 1.0, "depth": 1.0, "recipe": recipe,
        }
        return _with_feature_shape(_as_staged(net, tuple(input_shape), config), input_shape)
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
            net = _as_staged(net, tuple(input_shape))
        return _with_feature_shape(net, input_shape)
    raise ValueError(f"unknown base model {name!r}; allowed: {', '.join(list_models())}, 'torchvision:NAME', 'timm:NAME' or 'module:function'")
