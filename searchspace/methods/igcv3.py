"""IGCV3: interleaved low-rank group convolutions.

Sun, Li, Liu, Wang, "IGCV3: Interleaved Low-Rank Group Convolutions for Efficient Deep Neural
Networks", BMVC 2018 (arXiv 1806.00178). A conv (M_in -> M_out, k x k) becomes MobileNetV2's inverted
bottleneck with its dense 1x1 convs made group convs:

1. group 1x1 expansion M_in -> t*M_in with G1 groups, BN, ReLU6;
2. permutation (interleave the G1 groups, so that every later group sees every expansion group);
3. depthwise k x k on t*M_in channels (original stride/padding/dilation), BN, ReLU6;
4. group 1x1 linear bottleneck t*M_in -> M_out with G2 groups (no activation: linear bottleneck);
5. permutation (interleave the G2 groups, the paper's second shuffle).

Loose complementary condition: every output is connected to every input (possibly by several
paths). It holds when each bottleneck group spans channels of all expansion groups:
t*M_in / G2 >= G1 (enforced by lowering G2). The reference figure uses G1 = G2 = 2.

Parameters: M_in*t*M_in/G1 + 2*t*M_in (BN) + t*M_in*k + 2*t*M_in (BN) + t*M_in*M_out/G2 (+ M_out bias).
Initialisation is a fresh block's: the bottleneck has no closed-form fit to a dense kernel.

Changes from the paper, and why (one place): each eligible conv of the given base is replaced by the
block instead of building the paper's IGCV3 network, so the block's input and output widths are the
base layer's; ``groups2`` is lowered where needed to keep the loose complementary condition;
``expansion``, ``groups1``, ``groups2`` are searched (the reference figure fixes G1 = G2 = 2) and
the first conv may stay dense (``first_layer``); fresh initialisation, then fine-tuning.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical
from searchspace._registry import register_method
from searchspace._surgery import clone, iter_convs, replace
from searchspace.methods._reparam import Permute, bn_like, divisor_at_most, interleave

#: Convs with fewer input channels are first layers; converted only with ``first_layer = True``.
MIN_IN_CHANNELS = 4


def igcv3_param_count(conv: nn.Conv1d | nn.Conv2d, expansion: int, g1: int, g2: int) -> int:
    """Closed form of the block's parameters (see the module docstring)."""
    m_in, m_out, k = conv.in_channels, conv.out_channels, math.prod(conv.kernel_size)
    hidden = expansion * m_in
    bias = m_out if conv.bias is not None else 0
    return m_in * hidden // g1 + 2 * hidden + hidden * k + 2 * hidden + hidden * m_out // g2 + bias


class IGCV3Conv(nn.Sequential):
    """expand (G1) -> BN/ReLU6 -> interleave -> depthwise -> BN/ReLU6 -> project (G2) -> interleave."""

    def __init__(self, *, conv: nn.Conv1d | nn.Conv2d, expansion: int, g1: int, g2: int) -> None:
        m_in, m_out = conv.in_channels, conv.out_channels
        hidden = expansion * m_in
        if m_in % g1 or hidden % g1 or hidden % g2 or m_out % g2:
            raise ValueError(f"G1={g1} must divide {m_in} and {hidden}; G2={g2} must divide {hidden} and {m_out}")
        cls, bn, ones = type(conv), bn_like(conv), (1,) * len(conv.kernel_size)
        super().__init__()
        self.expand = cls(m_in, hidden, ones, groups=g1, bias=False)
        self.bn1 = bn(hidden)
        self.act1 = nn.ReLU6(inplace=True)
        self.shuffle1 = Permute(interleave(g1, hidden // g1))
        self.depthwise = cls(hidden, hidden, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=hidden, bias=False, padding_mode=conv.padding_mode)
        self.bn2 = bn(hidden)
        self.act2 = nn.ReLU6(inplace=True)
        self.project = cls(hidden, m_out, ones, groups=g2, bias=conv.bias is not None)
        self.shuffle2 = Permute(interleave(g2, m_out // g2))


@register_method
class IGCV3(CompressionMethod):
    """IGCV3 on every eligible conv (Sun et al., BMVC 2018).

    Rule: a conv with ``groups == 1`` and a kernel larger than 1 (the block's depthwise conv carries
    the spatial kernel; a 1x1 conv has none) is converted with G1 = the largest divisor of M_in that
    is <= the searched G1, G2 = the largest divisor of gcd(t*M_in, M_out) that is <= the searched G2
    and <= t*M_in / G1; it is skipped when the block has no fewer parameters than the conv. A conv
    with fewer than :data:`MIN_IN_CHANNELS` input channels (a first layer) is converted only with
    ``first_layer = True``: its expansion would be a rank-t bottleneck right at the input (on the
    MNIST-1D base, t*1 channels feeding 128 outputs). On mobilenet_v2 the stem is the only dense
    k x k conv, so there the method only acts with ``first_layer = True``.
    """

    name = "igcv3"
    prunable_layers = False
    stage = Stage.STRUCTURE
    reference = "Sun, Li, Liu, Wang, IGCV3, BMVC 2018, arXiv:1806.00178"
    hyperparameters = {
        "expansion": Categorical([1, 2, 4, 6]),
        "groups1": Categorical([1, 2, 4]),
        "groups2": Categorical([1, 2, 4]),
        "first_layer": Categorical([False, True]),
    }

    @staticmethod
    def layer_settings(conv: nn.Conv1d | nn.Conv2d, expansion: int, g1: int, g2: int) -> tuple[int, int]:
        hidden = expansion * conv.in_channels
        a = divisor_at_most(conv.in_channels, g1)
        b = divisor_at_most(math.gcd(hidden, conv.out_channels), min(g2, hidden // a))
        return a, b

    def supports(self, model: nn.Module) -> str | None:
        if not any(c.groups == 1 and math.prod(c.kernel_size) > 1 for _, c in iter_convs(model)):
            return "no convolution with groups == 1 and a kernel larger than 1"
        return None

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        out = clone(model)
        t = params["expansion"]
        converted: dict[str, list[int]] = {}
        skipped: dict[str, str] = {}
        for name, conv in list(iter_convs(out)):
            if conv.groups != 1:
                skipped[name] = "grouped"
                continue
            if math.prod(conv.kernel_size) == 1:
                skipped[name] = "1x1 kernel"
                continue
            if conv.in_channels < MIN_IN_CHANNELS and not params.get("first_layer", False):
                skipped[name] = f"first layer ({conv.in_channels} input channels) and first_layer=False"
                continue
            g1, g2 = self.layer_settings(conv, t, params["groups1"], params["groups2"])
            if igcv3_param_count(conv, t, g1, g2) >= sum(p.numel() for p in conv.parameters()):
                skipped[name] = f"no saving at t={t}, G1={g1}, G2={g2}"
                continue
            replace(out, name, IGCV3Conv(conv=conv, expansion=t, g1=g1, g2=g2).to(conv.weight.device, conv.weight.dtype))
            converted[name] = [t, g1, g2]
        context.notes[self.converted_key()] = converted
        context.notes["igcv3.skipped"] = skipped
        return out
