"""IGCV2: interleaved structured sparse convolutions.

Xie, Wang, Wei, Wang, Qi, "IGCV2: Interleaved Structured Sparse Convolutional Neural Networks",
CVPR 2018 (arXiv 1804.06202). A conv (M_in -> M_out) becomes the chain W_L P_{L-1} W_{L-1} ... P_1 W_1:
W_1 a depthwise k x k conv (the spatial kernel, original stride/padding), W_2..W_L group 1x1 convs.

Complementary condition (exactly one path from each input to each output channel): write a channel
index in mixed radix with digits (d_2, ..., d_L), K_l = size of digit l, M_in = K_2 * ... * K_L.
Group conv W_l mixes the channels that differ only in digit l (groups of K_l channels), so after
W_2..W_L every input reaches every output through exactly one path, like the butterfly of an FFT.
P_l is the permutation that makes digit l the fastest-varying one (and back). The last group conv
maps M_in -> M_out with M_in / K_L groups.

Balance condition: the paper picks group sizes that minimise the parameter count for a fixed number
of group convs, which is when the K_l are equal (K_l = M_in^(1/(L-1))); here the prime factors of M_in
are dealt into ``convs`` bins as evenly as possible. ``convs`` (L - 1, the number of group 1x1 convs)
is searched; ``convs = 1`` would be Xception / depthwise-separable, which is the ``dwsep`` method.

Parameters: M_in*k + sum_{l<L} M_in*K_l + K_L*M_out (+ M_out bias).
The chain is linear (no BN/ReLU inside), as the paper's IGCV2 block.

Initialisation (the paper trains from scratch; a trial only fine-tunes, so the chain starts as close
to the base conv as its structure allows): the chain's kernel is W[o, i, :] = M[o, i] * D[i, :], D the
depthwise taps and M the product of the group convs and permutations. Least squares one factor at a
time: a rank-1 SVD per input channel gives D and M's target (as dwsep's fit), then M is peeled one
digit at a time (:func:`_butterfly_fit`, rank-1 SVDs as TT-SVD peels tensor-train cores); the base's
bias goes to the last group conv. Exact when the kernel has the IGCV2 structure; with two group convs
on a 1x1 conv it is the least-squares optimum (the blocks share no parameter). A fresh initialisation
instead, with a fresh bias on the last group conv, leaves the logits of SqueezeNet, MNASNet and
MobileNetV3 constant: PyTorch's default init shrinks the variance about 3x per conv, 3-4 convs per
replaced layer, until the random biases are all that is left. The fit is not rescaled to the base
kernel's norm (which would keep each layer's output variance): on the trained digits base that cost
6.1 and 9.4 points after 10 epochs of fine-tuning (2 and 3 group convs), a larger last factor taking
smaller relative Adam steps.

Changes from the paper, and why (one place): each eligible conv of the given base is replaced instead
of building the paper's IGCV2 networks; the balance condition is met exactly only where M_in is a
perfect power (else the prime factors are dealt as evenly as possible); only 2 or 3 group 1x1 convs
are searched (``convs``: the small channel counts here have few prime factors to deal); the
chain starts from the least-squares fit of the trained conv (above) and is fine-tuned, not trained
from scratch.
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
from searchspace.methods._reparam import Permute, rank1


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def balanced_factors(n: int, bins: int) -> list[int]:
    """Split ``n`` into at most ``bins`` factors >= 2 whose sizes are as equal as possible."""
    sizes = [1] * bins
    for p in sorted(_prime_factors(n), reverse=True):
        sizes[sizes.index(min(sizes))] *= p
    return sorted((s for s in sizes if s > 1), reverse=True)


def digit_last(radices: list[int], digit: int) -> torch.Tensor:
    """Permutation index that makes ``digit`` the fastest-varying one (channels in row-major radix)."""
    idx = torch.arange(math.prod(radices)).view(*radices)
    return idx.movedim(digit, -1).reshape(-1)


def igcv2_param_count(conv: nn.Conv1d | nn.Conv2d, factors: list[int]) -> int:
    """Closed form: M_in*k + sum_{l<L} M_in*K_l + K_L*M_out (+ bias)."""
    m_in, m_out, k = conv.in_channels, conv.out_channels, math.prod(conv.kernel_size)
    bias = m_out if conv.bias is not None else 0
    return m_in * k + sum(m_in * f for f in factors[:-1]) + factors[-1] * m_out + bias


class IGCV2Conv(nn.Sequential):
    """depthwise k x k, then for each digit: permute -> group 1x1 -> permute back (last: no way back)."""

    def __init__(self, *, conv: nn.Conv1d | nn.Conv2d, factors: list[int]) -> None:
        m_in, m_out = conv.in_channels, conv.out_channels
        if math.prod(factors) != m_in or any(f < 2 for f in factors):
            raise ValueError(f"factors must be >= 2 and multiply to in_channels={m_in}, but got {factors}")
        if m_out % (m_in // factors[-1]):
            raise ValueError(f"the last group conv's {m_in // factors[-1]} groups must divide out_channels={m_out}")
        cls, ones = type(conv), (1,) * len(conv.kernel_size)
        super().__init__()
        self.factors = list(factors)
        self.add_module("depthwise", cls(m_in, m_in, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=m_in, bias=False, padding_mode=conv.padding_mode))
        for i, f in enumerate(factors):
            perm = digit_last(factors, i)
            self.add_module(f"permute{i + 1}", Permute(perm))
            last = i == len(factors) - 1
            self.add_module(f"group{i + 1}", cls(m_in, m_out if last else m_in, ones, groups=m_in // f, bias=last and conv.bias is not None))
            if not last:
                self.add_module(f"unpermute{i + 1}", Permute(torch.argsort(perm)))

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d, *, factors: list[int]) -> IGCV2Conv:
        """The IGCV2 chain fitted to ``conv`` by sequential rank-1 least-squares fits (module docstring,
        "Initialisation")."""
        layer = cls(conv=conv, factors=factors).to(conv.weight.device, conv.weight.dtype)
        m_out, m_in = conv.out_channels, conv.in_channels
        with torch.no_grad():
            w = conv.weight.detach().to(torch.float64)
            # W[o, i, :] = M[o, i] * depthwise[i, :]: a rank-1 fit per input channel (as dwsep's).
            mix, taps = rank1(w.reshape(m_out, m_in, -1).transpose(0, 1))  # (in, out), (in, k)
            group_weights = _butterfly_fit(mix.t(), factors)  # unit rows except the last factor's
            dtype = conv.weight.dtype
            layer.depthwise.weight.copy_(taps.to(dtype).reshape(layer.depthwise.weight.shape))
            for i, g in enumerate(group_weights):
                module = getattr(layer, f"group{i + 1}")
                module.weight.copy_(g.to(dtype).reshape(module.weight.shape))
            if conv.bias is not None:
                layer.get_submodule(f"group{len(factors)}").bias.copy_(conv.bias.detach())
        return layer


def _butterfly_fit(mix: torch.Tensor, factors: list[int]) -> list[torch.Tensor]:
    """Group 1x1 weights (one ``(channels, K_l)`` matrix per group conv, in the layout
    :class:`IGCV2Conv` gives them) whose product fits ``mix`` (out x in) in least squares, one digit
    at a time.

    With n group convs, input channel i = (d_1, ..., d_n) and output o = (e_1, ..., e_{n-1}, r) in
    mixed radix (the module docstring's digits d_2..d_L, renumbered from 1), the chain's matrix is
    ``B_n[o, d_n] * B_{n-1}[(e_1..e_{n-1}, d_n), d_{n-1}] * ... * B_1[(e_1, d_2..d_n), d_1]``.
    For fixed (e_1, d_2..d_n), the entries over (e_2..e_{n-1}, r) x d_1 are an outer product, and
    ``B_1[(e_1, d_2..d_n), :]`` appears in no other: its rank-1 fit gives B_1 (unit rows) and a
    remainder over (e_2.., r) to fit by the next digit, as TT-SVD peels one core at a time. Exact
    when ``mix`` has the structure, the least-squares optimum for n = 2; otherwise a sequence of
    optimal rank-1 steps.
    """
    n = len(factors)
    m_out, m_in = mix.shape
    per = m_out // (m_in // factors[-1])
    size = {f"e{pos}": factors[pos] for pos in range(n - 1)} | {f"d{pos}": factors[pos] for pos in range(n)} | {"r": per}
    names = [f"e{pos}" for pos in range(n - 1)] + ["r"] + [f"d{pos}" for pos in range(n)]
    cur = mix.reshape([size[a] for a in names])

    def arrange(t: torch.Tensor, have: list[str], want: list[str]) -> torch.Tensor:
        return t.permute([have.index(a) for a in want])

    out = []
    for pos in range(n - 1):
        batch = [f"e{j}" for j in range(pos + 1)] + [f"d{j}" for j in range(pos + 1, n)]
        rows = [f"e{j}" for j in range(pos + 1, n - 1)] + ["r"]
        mats = arrange(cur, names, [*batch, *rows, f"d{pos}"])
        left, right = rank1(mats.reshape(math.prod(size[a] for a in batch), -1, factors[pos]))
        # group conv pos: output channel (the other digits in order, then e_pos) row-major
        have = [*batch, f"d{pos}"]
        want = [f"e{j}" for j in range(pos)] + [f"d{j}" for j in range(pos + 1, n)] + [f"e{pos}", f"d{pos}"]
        out.append(arrange(right.reshape([size[a] for a in have]), have, want).reshape(m_in, factors[pos]))
        cur, names = left.reshape([size[a] for a in batch + rows]), batch + rows
    want = [f"e{j}" for j in range(n - 1)] + ["r", f"d{n - 1}"]
    out.append(arrange(cur, names, want).reshape(m_out, factors[-1]))
    return out


@register_method
class IGCV2(CompressionMethod):
    """IGCV2 on every eligible conv (Xie et al., CVPR 2018).

    Rule: a conv with ``groups == 1`` and at least 4 input channels is converted when its input
    channels factor into >= 2 factors, some ordering of them puts M_in / K_L groups dividing M_out,
    and the chain has fewer parameters; otherwise it is skipped (first convs with 1 or 3 input
    channels have nothing to interleave). Grouped convs are skipped.
    """

    name = "igcv2"
    prunable_layers = False
    stage = Stage.STRUCTURE
    reference = "Xie, Wang, Wei, Wang, Qi, IGCV2, CVPR 2018, arXiv:1804.06202"
    hyperparameters = {"convs": Categorical([2, 3])}

    @staticmethod
    def layer_factors(conv: nn.Conv1d | nn.Conv2d, convs: int) -> list[int] | None:
        if conv.groups != 1 or conv.in_channels < 4:
            return None
        factors = balanced_factors(conv.in_channels, convs)
        if len(factors) < 2:
            return None
        for last in sorted(set(factors)):
            if conv.out_channels % (conv.in_channels // last) == 0:
                rest = list(factors)
                rest.remove(last)
                return [*rest, last]
        return None

    def supports(self, model: nn.Module) -> str | None:
        if not any(self.layer_factors(c, 2) or self.layer_factors(c, 3) for _, c in iter_convs(model)):
            return "no convolution with groups == 1 whose input channels factor into >= 2 interleavable groups"
        return None

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        out = clone(model)
        converted: dict[str, list[int]] = {}
        skipped: dict[str, str] = {}
        for name, conv in list(iter_convs(out)):
            factors = self.layer_factors(conv, params["convs"])
            if factors is None:
                skipped[name] = "grouped" if conv.groups != 1 else f"in_channels={conv.in_channels} has no usable factorisation"
            elif igcv2_param_count(conv, factors) >= sum(p.numel() for p in conv.parameters()):
                skipped[name] = f"no saving at factors {factors}"
            else:
                replace(out, name, IGCV2Conv.from_conv(conv, factors=factors))
                converted[name] = factors
        context.notes[self.converted_key()] = converted
        context.notes["igcv2.skipped"] = skipped
        return out
