"""Tucker-2 decomposition of every eligible convolution.

Kim et al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
Applications", ICLR 2016 (arXiv 1511.06530). A kernel W (out x in x k...) is approximated by a core
G (r_out x r_in x k...) and factors U_out (out x r_out), U_in (in x r_in):
W ~= G x_0 U_out x_1 U_in. The layer then runs as 1x1 conv in -> r_in, the k... core conv
r_in -> r_out (with the original stride, padding and dilation), and 1x1 conv r_out -> out carrying the
original bias. Exact at full ranks. Factors are initialised from the trained kernel by a partial
Tucker of its two channel modes (HOOI, SVD init: :func:`searchspace._decompose.hooi`), then the
whole network is fine-tuned.

Why not tltorch's ``FactorizedConv``: its Tucker forward contracts factors with tensorly ops each
call, which torch's int8 quantisation, Torch-Pruning's dependency graph and ONNX export do not see as
convolutions; three plain convs are the same maths and every tool downstream understands them.

How the ranks are chosen is the ``allocation``:

- ``uniform`` (the default): one searched fraction per mode (``rank_out``, ``rank_in``) for every
  layer;
- ``sensitivity``: ``share`` is the share of the whole model's parameters to remove, and each
  layer's rank fraction (both modes, one of :data:`PROFILE_LEVELS`) is chosen from the base's
  sensitivity profile with the least predicted accuracy loss
  (:func:`searchspace._profile.allocate`); layers it does not pick stay dense. Layers are
  decomposed independently, so the predicted saving is the exact one.

Changes from the paper, and why (one place): Kim et al. choose each layer's ranks by VBMF on the
trained kernel; here the ranks are searched fractions (``uniform``) or picked from measured
one-layer sensitivities (``sensitivity``), so the study can trade size against accuracy directly
(VBMF ranks would make a natural enqueued starting point; not implemented). Layers whose
decomposition would not save parameters stay dense (listed in the notes).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._decompose import hooi
from searchspace._domains import Categorical, Float
from searchspace._profile import allocate
from searchspace._registry import register_method
from searchspace._surgery import clone, iter_convs, replace

#: Convolutions with fewer input or output channels than this are left dense (the first conv of an
#: image net has 1 or 3 inputs: there is no in-mode to reduce).
MIN_CHANNELS = 4
#: How the ranks are spread over the layers (see the module docstring).
ALLOCATIONS = ("uniform", "sensitivity")
#: Rank fractions (both modes) each layer is measured at for the sensitivity profile.
PROFILE_LEVELS = (0.5, 0.35, 0.25, 0.125, 0.0625)


def tucker_ranks(conv: nn.Conv1d | nn.Conv2d, rank_out: float, rank_in: float) -> tuple[int, int]:
    """Ranks for the out and in modes from fractions of the channel counts (at least 1)."""
    r_out = max(1, min(conv.out_channels, round(rank_out * conv.out_channels)))
    r_in = max(1, min(conv.in_channels, round(rank_in * conv.in_channels)))
    return r_out, r_in


def tucker2_param_count(conv: nn.Conv1d | nn.Conv2d, r_out: int, r_in: int) -> int:
    """Closed-form parameter count of the Tucker-2 replacement of ``conv``."""
    k = math.prod(conv.kernel_size)
    bias = conv.out_channels if conv.bias is not None else 0
    return conv.in_channels * r_in + r_in * r_out * k + r_out * conv.out_channels + bias


class Tucker2Conv(nn.Sequential):
    """Tucker-2 factorised convolution: ``first`` (1x1 in -> r_in), ``core``, ``last`` (1x1 -> out)."""

    def __init__(self, *, conv: nn.Conv1d | nn.Conv2d, r_out: int, r_in: int) -> None:
        cls = type(conv)
        ones = (1,) * len(conv.kernel_size)
        super().__init__()
        self.first = cls(conv.in_channels, r_in, ones, bias=False)
        self.core = cls(
            r_in,
            r_out,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            padding_mode=conv.padding_mode,
        )
        self.last = cls(r_out, conv.out_channels, ones, bias=conv.bias is not None)

    @classmethod
    def from_conv(cls, conv: nn.Conv1d | nn.Conv2d, *, r_out: int, r_in: int) -> Tucker2Conv:
        """Decompose a trained convolution (partial Tucker of its channel modes by HOOI)."""
        if conv.groups != 1:
            raise ValueError(f"Tucker-2 needs groups == 1, but got groups={conv.groups}")
        layer = cls(conv=conv, r_out=r_out, r_in=r_in)
        weight = conv.weight.detach().to("cpu", torch.float64)
        core, (u_out, u_in) = hooi(weight, [r_out, r_in], modes=[0, 1], n_iter=10)
        dtype, device = conv.weight.dtype, conv.weight.device
        extra = (1,) * len(conv.kernel_size)

        def as_tensor(a: torch.Tensor) -> torch.Tensor:
            return a.contiguous().to(dtype=dtype, device=device)

        with torch.no_grad():
            layer.first.weight.copy_(as_tensor(u_in.T).reshape(r_in, conv.in_channels, *extra))
            layer.core.weight.copy_(as_tensor(core))
            layer.last.weight.copy_(as_tensor(u_out).reshape(conv.out_channels, r_out, *extra))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias.detach())
        return layer


@register_method
class Tucker(CompressionMethod):
    """Tucker-2 per convolution, with the rank of each mode as a fraction of its channels.

    A convolution is converted when it has ``groups == 1``, a kernel larger than 1, at least
    :data:`MIN_CHANNELS` input and output channels, and the decomposition at the sampled ranks has
    fewer parameters than the dense kernel. Every other one is kept and listed in the notes.
    """

    name = "tucker"
    stage = Stage.STRUCTURE
    reference = "Kim et al., ICLR 2016, arXiv:1511.06530 (Tucker-2 of conv kernels)"
    hyperparameters = {
        "allocation": Categorical(list(ALLOCATIONS)),
        "rank_out": Float(0.05, 1.0),
        "rank_in": Float(0.05, 1.0),
        "share": Float(0.1, 0.98),
    }
    default_ranges = {"allocation": Categorical(["uniform"])}

    def space(self, trial: Any) -> dict[str, Any]:
        allocation = self.suggest(trial, "allocation")
        if allocation == "uniform":
            # A uniform plan holds the uniform settings only: it equals the same plan of a study
            # whose config does not search the allocation.
            return {"rank_out": self.suggest(trial, "rank_out"), "rank_in": self.suggest(trial, "rank_in")}
        return {"allocation": allocation, "share": self.suggest(trial, "share")}

    # --- the sensitivity profile (searchspace.Profiled) -------------------------------------

    def needs_profile(self) -> bool:
        return any(a != "uniform" for a in getattr(self.ranges["allocation"], "choices", ()))

    def profile_levels(self) -> tuple[float, ...]:
        return PROFILE_LEVELS

    def profile_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        return [name for name, conv in iter_convs(model) if self._eligible(conv) is None]

    def compress_layer(self, model: nn.Module, layer: str, level: float, *, context: ApplyContext) -> nn.Module | None:
        probe = ApplyContext(example_input=context.example_input)
        out = self._decompose(model, {layer: level}, probe)
        return out if probe.notes[self.converted_key()] else None

    def profile_extra(self, model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
        return {}

    def supports(self, model: nn.Module) -> str | None:
        if not any(self._eligible(conv) is None for _, conv in iter_convs(model)):
            return "no convolution with groups == 1, a kernel > 1 and >= 4 channels each way"
        return None

    @staticmethod
    def _eligible(conv: nn.Conv1d | nn.Conv2d) -> str | None:
        if conv.groups != 1:
            return "grouped"
        if math.prod(conv.kernel_size) == 1:
            return "1x1 kernel"
        if min(conv.in_channels, conv.out_channels) < MIN_CHANNELS:
            return f"fewer than {MIN_CHANNELS} channels"
        return None

    def apply(
        self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext
    ) -> nn.Module:
        allocation = params.get("allocation", "uniform")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"tucker.allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
        if allocation == "uniform":
            return self._decompose(model, None, context, rank_out=params["rank_out"], rank_in=params["rank_in"])
        profile = context.profile
        if profile is None or self.name not in profile.layers:
            raise ValueError(f"tucker.allocation={allocation} needs the base's sensitivity profile, but the context has none for {self.name!r}")
        present = [n for n, conv in iter_convs(model) if self._eligible(conv) is None]
        rows = {n: e for n, e in profile.rows(self.name).items() if n in present}
        levels, predicted = allocate(rows, base_accuracy=profile.base_accuracy, target_saved=float(params["share"]) * profile.base_params, layers=[n for n in profile.rows(self.name) if n in rows])
        context.notes["tucker.levels"] = dict(sorted(levels.items()))
        context.notes["tucker.predicted_saved"] = predicted
        return self._decompose(model, levels, context)

    def _decompose(
        self, model: nn.Module, levels: Mapping[str, float] | None, context: ApplyContext, *, rank_out: float = 1.0, rank_in: float = 1.0
    ) -> nn.Module:
        """Decompose a copy of ``model``: every eligible conv at (``rank_out``, ``rank_in``), or
        only the convs of ``levels`` (name -> rank fraction of both modes)."""
        out = clone(model)
        converted: dict[str, list[int]] = {}
        skipped: dict[str, str] = {}
        for name, conv in list(iter_convs(out)):
            reason = self._eligible(conv)
            if reason is None and levels is not None:
                if name not in levels:
                    reason = "not allocated"
                else:
                    rank_out = rank_in = levels[name]
            if reason is None:
                r_out, r_in = tucker_ranks(conv, rank_out, rank_in)
                if tucker2_param_count(conv, r_out, r_in) >= sum(p.numel() for p in conv.parameters()):
                    reason = f"no saving at ranks ({r_out}, {r_in})"
            if reason is not None:
                skipped[name] = reason
                continue
            replace(out, name, Tucker2Conv.from_conv(conv, r_out=r_out, r_in=r_in))
            converted[name] = [r_out, r_in]
        context.notes[self.converted_key()] = converted
        context.notes["tucker.skipped"] = skipped
        return out
