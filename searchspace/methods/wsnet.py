"""WSNet weight sampling: every filter of a layer is a window of one condensed filter.

Jin, Yang, Xu, Yan et al., "WSNet: Compact and Efficient Networks Through Weight Sampling",
ICML 2018 (arXiv 1711.10067). A conv with N filters of length L over M input channels stores one
condensed filter Phi of length L* = L + (N - 1) * S; filter i is Phi[i*S : i*S + L] (spatial
sampling with stride S). With channel repeating factor C, Phi stores only M / C input channels and
each window is tiled C times along the input channels (channel sampling).

Compute (section 3 of the paper):

- channel repeating: conv(x, tile_C(W')) == conv(sum of the C input-channel groups of x, W'), so the
  forward sums the groups first and convolves M / C channels (multiplies divided by C);
- 1D product-map reuse: P = Phi^T x (every input position times every condensed tap, over the M/C
  channels, T * L* * M/C multiplies), and filter i's output at t is the diagonal sum
  y_i(t) = sum_{k<L} P(t + k, i*S + k) (additions only). Multiplies drop by ~ N*L / L*.
  The paper's integral image turns the L-term diagonal sum into 2 look-ups after a cumulative sum
  over the whole map; with L <= 7 here, the cumulative sum costs as many additions as it saves, and
  no multiplies either way, so the L-term sum is kept (:meth:`WSConv.forward_product_map`).

Which forward runs is measured, not assumed: the product map issues L gathers of small tensors,
the plain conv runs one oneDNN call on the channel-summed input with the materialised M/C-channel
kernel (built once and kept while in inference, so the exported/inference path is a plain conv).
For every 1D layer, ``WSNet.apply`` times both at batch 1, one thread, on the layer's real input
shape and keeps the faster (``WSConv.mode``, timings in the trial notes under ``wsnet.forward``);
2D layers use the plain conv. BENCHMARKS.md times both side by side.

2D kernels: sampling runs along the kernel's width axis (the last one); the condensed filter keeps
the full height, so filter i is Phi[:, :, i*S : i*S + kw]. The paper is 1D (audio); the width axis is
where a window of a row-major 2D kernel is contiguous, and the two spatial axes are symmetric for
the square kernels of the built-in and torchvision nets.

Initialisation: the least-squares fit of Phi to the base kernel. Each base weight is tied to exactly
one Phi entry, so the fit is the mean of the base weights sharing an entry (closed form); ``init =
"random"`` draws Phi like a fresh conv instead (for the comparison in BENCHMARKS.md).

Changes from the paper, and why (one place): 2D kernels are sampled along their width axis (the paper
is 1D); the integral-image reuse is replaced by the L-term diagonal sum and the forward is chosen by
measurement (above); layers start from the least-squares fit to the trained kernel and are
fine-tuned instead of trained from scratch (a trial's budget); the paper's headline compactness
includes 8-bit weights, which here is the separate ``int8`` stage.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical, Int
from searchspace._registry import register_method
from searchspace._surgery import clone, iter_convs, replace
from searchspace.methods._reparam import divisor_at_most

#: Channel repeating keeps at least this many channels per group: summing the 1 or 3 input
#: channels of a first conv would throw the input away.
MIN_GROUP_CHANNELS = 4


def wsnet_param_count(conv: nn.Conv1d | nn.Conv2d, stride: int, repeat: int) -> int:
    """Closed form: (M / C) * kh * (L + (N - 1) * S) + N bias (kh = 1 in 1D)."""
    *rest, length = conv.kernel_size
    height = math.prod(rest)
    condensed = length + (conv.out_channels - 1) * stride
    bias = conv.out_channels if conv.bias is not None else 0
    return conv.in_channels // repeat * height * condensed + bias


class WSConv(nn.Module):
    """A 1D or 2D convolution whose filters are sampled from one condensed filter.

    Args:
        conv: the dense convolution it replaces (shapes, stride, padding, dilation, bias).
        stride: the sampling stride S, ``1 <= S <= L`` (L the kernel width).
        repeat: the channel repeating factor C, a divisor of the input channels.
    """

    def __init__(self, *, conv: nn.Conv1d | nn.Conv2d, stride: int, repeat: int) -> None:
        super().__init__()
        length = conv.kernel_size[-1]
        if not 1 <= stride <= length:
            raise ValueError(f"`1 <= stride <= kernel width {length}` must hold, but got stride={stride}")
        if conv.in_channels % repeat:
            raise ValueError(f"repeat must divide in_channels={conv.in_channels}, but got repeat={repeat}")
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"WSConv needs groups == 1 and zero padding, got groups={conv.groups}, padding_mode={conv.padding_mode!r}")
        self.dim = len(conv.kernel_size)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = tuple(conv.stride), conv.padding, tuple(conv.dilation)
        self.sample_stride, self.repeat = stride, repeat
        #: "conv": channel sum, then a plain conv with the materialised M/C-channel kernel;
        #: "product_map": the paper's computation reuse (1D). Set by measurement in WSNet.apply.
        self.mode = "conv"
        self.frozen: torch.Tensor | None = None
        condensed = length + (conv.out_channels - 1) * stride
        shape = (conv.in_channels // repeat, *self.kernel_size[:-1], condensed)
        self.condensed = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(conv.out_channels)) if conv.bias is not None else None
        # window[i, k] = i*S + k: the condensed tap that is tap k of filter i.
        window = torch.arange(conv.out_channels)[:, None] * stride + torch.arange(length)[None, :]
        self.register_buffer("window", window)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as a fresh conv: fan-in is the M/C * k inputs one output actually sums.
        fan_in = self.in_channels // self.repeat * math.prod(self.kernel_size)
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.condensed, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def weight(self) -> torch.Tensor:
        """The materialised (N, M/C, ..., L) kernel applied to the channel-summed input."""
        w = self.condensed[..., self.window]  # (M/C, [kh,] N, L)
        return w.movedim(-2, 0).contiguous()

    def dense_weight(self) -> torch.Tensor:
        """The full (N, M, ..., L) kernel of the equivalent plain convolution (channels tiled C times)."""
        w = self.weight()
        return w.repeat(1, self.repeat, *([1] * (w.dim() - 2)))

    def channel_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat == 1:
            return x
        b, _, *sp = x.shape
        return x.view(b, self.repeat, self.in_channels // self.repeat, *sp).sum(1)

    def train(self, mode: bool = True) -> WSConv:
        self.frozen = None  # the materialised kernel is only valid until the next training step
        return super().train(mode)

    def materialised(self) -> torch.Tensor:
        """The kernel for the plain-conv forward; in inference (eval, no grad) built once and kept."""
        if self.training or torch.is_grad_enabled():
            return self.weight()
        if self.frozen is None:
            self.frozen = self.weight().detach()
        return self.frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "product_map":
            return self.forward_product_map(x)
        xs = self.channel_sum(x)
        w = self.materialised()
        if self.dim == 1:
            return F.conv1d(xs, w, self.bias, self.stride, self.padding, self.dilation)
        return F.conv2d(xs, w, self.bias, self.stride, self.padding, self.dilation)

    def forward_product_map(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's computation reuse (1D): product map once, then diagonal sums per filter."""
        if self.dim != 1 or self.dilation[0] != 1:
            raise ValueError("the product-map forward is defined for 1D convolutions without dilation")
        pad = self.padding if isinstance(self.padding, str) else self.padding[0]
        if isinstance(pad, str):
            raise ValueError(f"the product-map forward needs integer padding, got {pad!r}")
        xs = F.pad(self.channel_sum(x), (pad, pad))
        # P[b, l, t] = <x_t, Phi_l>: a 1x1 conv with the L* condensed taps as filters.
        prod = F.conv1d(xs, self.condensed.t().unsqueeze(-1))
        length, step = self.kernel_size[0], self.stride[0]
        t_out = (xs.shape[-1] - length) // step + 1
        out = prod.new_zeros(xs.shape[0], self.out_channels, t_out)
        for k in range(length):
            taps = prod.index_select(1, self.window[:, k])
            out = out + taps[..., k : k + step * (t_out - 1) + 1 : step]
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d, *, stride: int, repeat: int, init: str = "lstsq") -> WSConv:
        """Build from a trained conv; ``init="lstsq"`` fits Phi to its kernel in least squares."""
        layer = cls(conv=conv, stride=stride, repeat=repeat)
        layer.to(conv.weight.device, conv.weight.dtype)
        if init == "random":
            return layer
        if init != "lstsq":
            raise ValueError(f"init must be 'lstsq' or 'random', got {init!r}")
        with torch.no_grad():
            w = conv.weight.detach()
            n, m = w.shape[:2]
            # Sum the C tiled copies, then scatter every (filter, tap) onto its condensed tap.
            w = w.view(n, repeat, m // repeat, *w.shape[2:]).sum(1)  # (N, M/C, [kh,] L)
            w = w.movedim(0, -2)  # (M/C, [kh,] N, L)
            flat_idx = layer.window.reshape(-1).expand(*w.shape[:-2], -1)
            total = torch.zeros_like(layer.condensed).scatter_add_(-1, flat_idx, w.reshape(*w.shape[:-2], -1))
            count = torch.zeros(layer.condensed.shape[-1], dtype=w.dtype, device=w.device)
            count.scatter_add_(0, layer.window.reshape(-1), torch.ones(layer.window.numel(), dtype=w.dtype, device=w.device))
            layer.condensed.copy_(total / (count * repeat))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"sample_stride={self.sample_stride}, repeat={self.repeat}, condensed={self.condensed.shape[-1]}"
        )


@register_method
class WSNet(CompressionMethod):
    """WSNet weight sampling of every eligible convolution (Jin et al., ICML 2018).

    Rule: a conv with ``groups == 1`` and zero padding is converted at sampling stride
    ``min(stride, kernel width)`` and channel repeating ``repeat`` lowered to the largest divisor of
    its input channels that keeps >= 4 channels per group; it is skipped when that gives no fewer
    parameters than the dense kernel (a 1x1 conv without channel repeating). Grouped and depthwise
    convs are skipped (their filters share no input channels to sample from).
    """

    name = "wsnet"
    prunable_layers = False
    stage = Stage.STRUCTURE
    reference = "Jin, Yang, Xu, Yan et al., WSNet, ICML 2018, arXiv:1711.10067"
    hyperparameters = {
        "stride": Int(1, 3),
        "repeat": Categorical([1, 2, 4, 8]),
        "init": Categorical(["lstsq", "random"]),
    }

    def supports(self, model: nn.Module) -> str | None:
        if not any(c.groups == 1 and c.padding_mode == "zeros" for _, c in iter_convs(model)):
            return "no convolution with groups == 1 and zero padding"
        return None

    @staticmethod
    def layer_settings(conv: nn.Conv1d | nn.Conv2d, stride: int, repeat: int) -> tuple[int, int]:
        """The (S, C) a layer gets from the searched values (see the class docstring)."""
        s = max(1, min(stride, conv.kernel_size[-1]))
        c = divisor_at_most(conv.in_channels, min(repeat, conv.in_channels // MIN_GROUP_CHANNELS))
        return s, c

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        out = clone(model)
        inputs = self.layer_inputs(out, context.example_input)
        converted: dict[str, list[int]] = {}
        skipped: dict[str, str] = {}
        modes: dict[str, str] = {}
        for name, conv in list(iter_convs(out)):
            if conv.groups != 1 or conv.padding_mode != "zeros":
                skipped[name] = "grouped" if conv.groups != 1 else f"padding_mode={conv.padding_mode}"
                continue
            s, c = self.layer_settings(conv, params["stride"], params["repeat"])
            if wsnet_param_count(conv, s, c) >= sum(p.numel() for p in conv.parameters()):
                skipped[name] = f"no saving at S={s}, C={c}"
                continue
            layer = WSConv.from_conv(conv, stride=s, repeat=c, init=params.get("init", "lstsq"))
            if name in inputs:
                layer.mode, timing = self.faster_forward(layer, inputs[name])
                modes[name] = timing
            replace(out, name, layer)
            converted[name] = [s, c]
        context.notes[self.converted_key()] = converted
        context.notes["wsnet.skipped"] = skipped
        context.notes["wsnet.forward"] = modes
        return out

    @staticmethod
    def layer_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch-1 input of every 1D conv without dilation (the layers with two forwards to choose from)."""
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            conv.register_forward_pre_hook(lambda _m, args, n=name: seen.__setitem__(n, args[0].detach()))
            for name, conv in iter_convs(model)
            if isinstance(conv, nn.Conv1d) and conv.dilation == (1,) and not isinstance(conv.padding, str)
        ]
        try:
            with torch.no_grad():
                model.eval()(example)
        finally:
            for h in hooks:
                h.remove()
        return seen

    @staticmethod
    def faster_forward(layer: WSConv, x: torch.Tensor) -> tuple[str, str]:
        """Time both 1D forwards at batch 1, one thread, and return the faster mode and the timings.

        Latency is measured, never assumed: which one wins depends on the layer's shape (the
        product map trades multiplies for L gathers of small tensors).
        """
        from torch.utils import benchmark

        layer = layer.eval()
        times = {}
        with torch.no_grad():
            for mode in ("conv", "product_map"):
                layer.mode = mode
                timer = benchmark.Timer(stmt="layer(x)", globals={"layer": layer, "x": x}, num_threads=1)
                timer.timeit(5)
                times[mode] = min(timer.timeit(20).mean for _ in range(5))
        best = min(times, key=times.get)
        return best, f"{best} ({', '.join(f'{k} {v * 1e6:.1f} us' for k, v in times.items())})"
