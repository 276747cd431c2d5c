"""IGCV1: interleaved group convolutions.

Zhang, Qi, Xiao, Wang, "Interleaved Group Convolutions for Deep Neural Networks", ICCV 2017
(arXiv 1707.02725). A conv (M_in -> M_out, k x k) becomes

1. a primary group conv with L partitions (the spatial k x k kernel, block-diagonal), L*M = M_out
   output channels laid out as (L, M);
2. a permutation: the m-th secondary partition takes the m-th channel of every primary partition
   ((L, M) -> transpose -> (M, L));
3. a secondary 1x1 group conv with M partitions of L channels;
4. the inverse permutation.

The composition is a dense kernel with exactly one path from each input to each output channel
(tested on the product of the blocks' connectivity masks). Parameters:
M_in*M_out*k/L + M_out*L (+ M_out bias). L = 1 is the dense conv exactly (secondary = identity).

Initialisation (the paper trains from scratch; a trial only fine-tunes, so the layer starts as close
to the base conv as its structure allows): output o reaches input partition g through one primary
channel and one secondary weight, so the L outputs of a secondary partition restricted to partition
g's inputs are multiples of one primary filter. The rank-1 SVD of each such block gives the
least-squares optimum over the whole IGC structure (the blocks share no parameter); it is exact when
the kernel has the structure (e.g. block-diagonal) and copies the base's bias. Keeping only the
block-diagonal part instead shrinks every converted layer's output to about 1/L of its variance: through
the tens of layers of MNASNet the logits no longer depend on the input. The fit is not rescaled to
the base kernel's norm: on the trained digits base (L = 8) that cost 0.3 points after 10 epochs of
fine-tuning, and igcv2 6-9 (larger secondary weights take smaller relative Adam steps), while the fit
alone keeps the logits input dependent on every model of the coverage benchmark.

Changes from the paper, and why (one place): each eligible conv of the given base is replaced, with
L (``partitions``) capped per layer at a common divisor of its channel counts, instead of building
the paper's IGC networks; the start is the least-squares fit of the trained kernel (above) rather
than training from scratch, because a trial only fine-tunes.
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
from searchspace.methods._reparam import Permute, divisor_at_most, interleave, rank1


def igc_param_count(conv: nn.Conv1d | nn.Conv2d, partitions: int) -> int:
    """Closed form: M_in * M_out * k / L + M_out * L (+ M_out bias)."""
    m_in, m_out, k = conv.in_channels, conv.out_channels, math.prod(conv.kernel_size)
    bias = m_out if conv.bias is not None else 0
    return m_in * m_out * k // partitions + m_out * partitions + bias


class IGCConv(nn.Sequential):
    """primary (L groups, k x k) -> interleave -> secondary (M groups, 1x1) -> interleave back."""

    def __init__(self, *, conv: nn.Conv1d | nn.Conv2d, partitions: int) -> None:
        m_in, m_out = conv.in_channels, conv.out_channels
        if m_in % partitions or m_out % partitions:
            raise ValueError(f"partitions must divide in and out channels ({m_in}, {m_out}), but got partitions={partitions}")
        cls, ones = type(conv), (1,) * len(conv.kernel_size)
        per = m_out // partitions  # M: channels per primary partition = number of secondary partitions
        super().__init__()
        self.primary = cls(m_in, m_out, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=partitions, bias=False, padding_mode=conv.padding_mode)
        self.shuffle = Permute(interleave(partitions, per))
        self.secondary = cls(m_out, m_out, ones, groups=per, bias=conv.bias is not None)
        self.unshuffle = Permute(interleave(per, partitions))
        self.partitions = partitions

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d, *, partitions: int) -> IGCConv:
        """The IGC layer closest to ``conv`` in least squares (module docstring, "Initialisation")."""
        layer = cls(conv=conv, partitions=partitions).to(conv.weight.device, conv.weight.dtype)
        lp = partitions
        per = conv.out_channels // lp
        with torch.no_grad():
            w = conv.weight.detach().to(torch.float64)
            # Output o = t * per + j is row t of secondary group j; it reaches input block g only through
            # primary channel g * per + j, scaled by one secondary weight. So for each (j, g) the L rows
            # W[t * per + j, block g] are multiples of one vector: a rank-1 fit per (j, g) block.
            blocks = w.reshape(lp, per, lp, -1).permute(1, 2, 0, 3)  # (j, g, t, in/L * k)
            mix, taps = rank1(blocks)  # (j, g, t), (j, g, in/L * k)
            secondary = mix.permute(0, 2, 1)  # (j, t, g): secondary channel j * L + t, its g-th input
            dtype = conv.weight.dtype
            layer.primary.weight.copy_(taps.permute(1, 0, 2).to(dtype).reshape(layer.primary.weight.shape))
            layer.secondary.weight.copy_(secondary.to(dtype).reshape(layer.secondary.weight.shape))
            if conv.bias is not None:
                layer.secondary.bias.copy_(conv.bias.detach()[layer.shuffle.index])
        return layer


@register_method
class IGC(CompressionMethod):
    """IGCV1 on every eligible conv (Zhang et al., ICCV 2017).

    Rule: a conv with ``groups == 1`` gets L = the largest divisor of gcd(in, out) that is <= the
    searched partition count; it is skipped when that is 1 (e.g. a first conv with 1 or 3 input
    channels) or when the IGC form has no fewer parameters. Grouped convs are skipped.
    """

    name = "igc"
    prunable_layers = False
    stage = Stage.STRUCTURE
    reference = "Zhang, Qi, Xiao, Wang, Interleaved Group Convolutions, ICCV 2017, arXiv:1707.02725"
    hyperparameters = {"partitions": Categorical([2, 4, 8, 16, 32])}

    @staticmethod
    def layer_partitions(conv: nn.Conv1d | nn.Conv2d, partitions: int) -> int:
        return divisor_at_most(math.gcd(conv.in_channels, conv.out_channels), partitions)

    def supports(self, model: nn.Module) -> str | None:
        if not any(c.groups == 1 and self.layer_partitions(c, 32) > 1 for _, c in iter_convs(model)):
            return "no convolution with groups == 1 whose in and out channels share a divisor > 1"
        return None

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        out = clone(model)
        converted: dict[str, int] = {}
        skipped: dict[str, str] = {}
        for name, conv in list(iter_convs(out)):
            lp = self.layer_partitions(conv, params["partitions"])
            if conv.groups != 1:
                skipped[name] = "grouped"
            elif lp == 1:
                skipped[name] = f"gcd(in={conv.in_channels}, out={conv.out_channels}) has no divisor in [2, {params['partitions']}]"
            elif igc_param_count(conv, lp) >= sum(p.numel() for p in conv.parameters()):
                skipped[name] = f"no saving at L={lp}"
            else:
                replace(out, name, IGCConv.from_conv(conv, partitions=lp))
                converted[name] = lp
        context.notes[self.converted_key()] = converted
        context.notes["igc.skipped"] = skipped
        return out
