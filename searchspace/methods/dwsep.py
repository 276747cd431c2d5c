"""Depthwise-separable convolutions with a width multiplier (MobileNet).

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
arXiv 1704.04861 (2017). A k x k conv (M -> N) becomes a depthwise k x k conv (M groups, the
original stride/padding/dilation), BN and ReLU, and a pointwise 1x1 conv M -> N: M*k + M*N weights
instead of M*N*k. The width multiplier alpha thins every layer to alpha times its channels.

Width multiplier: it changes every layer's channel count, which only the architecture itself knows
how to do consistently (residual additions, the flattened head of the MNIST-1D CNN), so it goes
through ``StagedNet.scaled(width=alpha, depth=1)``; the thinned net inherits the base's leading
channels. Base models that do not declare how they scale (a user factory, torchvision nets other
than the ResNets and MobileNetV2) keep alpha = 1 and the notes say so.

Initialisation (``init = "lstsq"``): the least-squares fit of the separable pair to the base kernel.
Per input channel m the base holds an N x k matrix W[:, m, :]; a separable layer can only express the
rank-1 matrix p_m d_m^T (pointwise column times depthwise filter), and the best rank-1 fit in the
Frobenius norm is the leading singular pair (Eckart-Young). The factors are balanced
(sqrt of the singular value on each side) and the depthwise filter's sign is chosen so that its taps
sum to >= 0, so that the ReLU between them passes the typical response. With ``activation = False``
the pair is kept linear (no BN/ReLU between), and the fit is then the exact best separable
approximation of the base layer.

Changes from the paper, and why (one place): MobileNet builds and trains a separable network from
scratch; here each eligible conv of the given base is replaced in place and starts from the
least-squares fit above (or fresh, ``init = "random"``) before the trial fine-tunes, because a trial
has a fine-tuning budget, not a training one. The BN + ReLU between depthwise and pointwise is
searched (``activation``; the paper always has it), the first conv may stay dense
(``first_layer``, as MobileNet keeps its first layer a full conv), and the resolution multiplier
rho is left to the ``scale`` method.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical
from searchspace._registry import register_method
from searchspace._surgery import clone, iter_convs, replace
from searchspace.methods._reparam import bn_like, try_scaled

#: Convs with fewer input channels are first layers; converted only with ``first_layer = True``.
MIN_IN_CHANNELS = 4


def dwsep_param_count(conv: nn.Conv1d | nn.Conv2d, activation: bool) -> int:
    """Closed form: M*k (depthwise) + 2M (BN, when present) + M*N (pointwise) + N (bias)."""
    m, n, k = conv.in_channels, conv.out_channels, math.prod(conv.kernel_size)
    return m * k + (2 * m if activation else 0) + m * n + (n if conv.bias is not None else 0)


class DWSepConv(nn.Sequential):
    """depthwise k x k (-> BN -> ReLU) -> pointwise 1x1, replacing one dense conv."""

    def __init__(self, *, conv: nn.Conv1d | nn.Conv2d, activation: bool = True) -> None:
        cls, m = type(conv), conv.in_channels
        ones = (1,) * len(conv.kernel_size)
        layers: dict[str, nn.Module] = {
            "depthwise": cls(m, m, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=m, bias=False, padding_mode=conv.padding_mode)
        }
        if activation:
            layers["bn"] = bn_like(conv)(m)
            layers["act"] = nn.ReLU(inplace=True)
        layers["pointwise"] = cls(m, conv.out_channels, ones, bias=conv.bias is not None)
        super().__init__()
        for key, layer in layers.items():
            self.add_module(key, layer)

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d, *, activation: bool = True, init: str = "lstsq") -> DWSepConv:
        layer = cls(conv=conv, activation=activation).to(conv.weight.device, conv.weight.dtype)
        if init == "random":
            return layer
        if init != "lstsq":
            raise ValueError(f"init must be 'lstsq' or 'random', got {init!r}")
        with torch.no_grad():
            w = conv.weight.detach().to(torch.float64)
            n, m = w.shape[:2]
            mats = w.reshape(n, m, -1).permute(1, 0, 2)  # (M, N, k): one N x k matrix per input channel
            u, s, vh = torch.linalg.svd(mats, full_matrices=False)
            root = s[:, :1].sqrt()  # (M, 1)
            p = u[:, :, 0] * root  # (M, N)
            d = vh[:, 0, :] * root  # (M, k)
            sign = torch.where(d.sum(1, keepdim=True) < 0, -1.0, 1.0).to(d)
            p, d = p * sign, d * sign
            dtype = conv.weight.dtype
            layer.depthwise.weight.copy_(d.to(dtype).reshape(layer.depthwise.weight.shape))
            layer.pointwise.weight.copy_(p.t().to(dtype).reshape(layer.pointwise.weight.shape))
            if conv.bias is not None:
                layer.pointwise.bias.copy_(conv.bias.detach())
        return layer


@register_method
class DepthwiseSeparable(CompressionMethod):
    """MobileNet's depthwise-separable factorisation of every k x k conv, with a width multiplier.

    Rule: a conv with ``groups == 1`` and a kernel larger than 1 is converted; 1x1 and grouped convs
    are skipped (nothing to separate), as is any conv whose separable form has no fewer parameters.
    A conv with fewer than :data:`MIN_IN_CHANNELS` input channels (a first layer) is converted only
    with ``first_layer = True``: MobileNet keeps its first layer a full conv, and separating a conv
    with one input channel leaves ONE depthwise filter for all outputs (on the MNIST-1D base that
    left it at 40-56 % after fine-tuning against 93-96 % without: BENCHMARKS.md, "Does
    least-squares initialisation beat random initialisation?"). On mobilenet_v2 the stem
    is the only dense k x k conv, so there the method only acts with ``first_layer = True``.
    """

    name = "dwsep"
    stage = Stage.STRUCTURE
    reference = "Howard et al., MobileNets, arXiv:1704.04861 (depthwise-separable conv, width multiplier)"
    hyperparameters = {
        "width": Categorical([0.25, 0.5, 0.75, 1.0]),
        "activation": Categorical([True, False]),
        "init": Categorical(["lstsq", "random"]),
        "first_layer": Categorical([False, True]),
    }

    def supports(self, model: nn.Module) -> str | None:
        if not any(c.groups == 1 and math.prod(c.kernel_size) > 1 for _, c in iter_convs(model)):
            return "no convolution with groups == 1 and a kernel larger than 1"
        return None

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        width = params.get("width", 1.0)
        out: nn.Module | None = None
        if width != 1.0:
            out, reason = try_scaled(model, width=width, depth=1.0)
            context.notes["dwsep.width"] = width if out is not None else f"1.0 (width {width} not applied: {reason})"
        if out is None:
            out = clone(model)
        activation, init = params.get("activation", True), params.get("init", "lstsq")
        converted: list[str] = []
        skipped: dict[str, str] = {}
        for name, conv in list(iter_convs(out)):
            if conv.groups != 1:
                skipped[name] = "grouped"
            elif math.prod(conv.kernel_size) == 1:
                skipped[name] = "1x1 kernel"
            elif conv.in_channels < MIN_IN_CHANNELS and not params.get("first_layer", False):
                skipped[name] = f"first layer ({conv.in_channels} input channels) and first_layer=False"
            elif dwsep_param_count(conv, activation) >= sum(p.numel() for p in conv.parameters()):
                skipped[name] = "no saving"
            else:
                replace(out, name, DWSepConv.from_conv(conv, activation=activation, init=init))
                converted.append(name)
        context.notes[self.converted_key()] = converted
        context.notes["dwsep.skipped"] = skipped
        return out
