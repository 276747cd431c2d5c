"""T-Net: same-shaped convolutions share one jointly Tucker-factorised kernel tensor.

Kossaifi et al., "T-Net: Parametrizing Fully Convolutional Nets with a Single High-Order Tensor",
CVPR 2019 (arXiv 1904.02698). The paper stacks the kernels of a whole network of identical blocks
into one tensor with a mode per architectural axis and Tucker-factorises it, one rank per mode; each
layer's kernel is a slice of the reconstruction, and core and factors are trained end to end, so the
low-rank structure is shared (and regularises) across layers.

Here every group of same-shaped convolutions (the repeated blocks of a ResNet stage, the repeated
3-tap layers of the MNIST-1D CNN, the repeated 3x3 layers of a deeper digits CNN) is stacked into a
tensor with modes (layer, out, in, kernel...), and Tucker-factorised from the trained kernels by
HOOI (higher-order orthogonal iteration, SVD init; De Lathauwer et al., 2000), see :func:`searchspace._decompose.hooi`. The base networks here are not made of identical blocks throughout (their
stages change width), so one tensor per shape group is the paper's construction applied where it is
defined; convolutions with no same-shaped sibling stay dense and are listed in the notes.

Changes from the paper, and why (one place): one tensor per group of same-shaped convolutions instead
of one for the whole network (the base nets change width between stages, so their kernels do not
stack into one tensor); the architecture modes collapse into a single layer mode (the groups are
short and flat, no stacks or block paths); ranks are fractions of each mode searched by the study,
the layer-mode fraction from 0.5 so that a two-layer group can be cut to rank 1; the factors start
from HOOI of the trained kernels rather than from random initialisation and the whole net is then
fine-tuned, because a trial has a fine-tuning budget, not a training-from-scratch one.

Each converted layer stays a convolution whose ``weight`` is computed: its slice of the shared
tensor, ``core x_0 U_layer[i] x_1 U_out x_2 U_in x_3 U_k...``. In eval mode the
slice is a cached constant (rebuilt when a factor changes), so inference costs what the dense
convolution costs; in training mode it is recomputed with autograd on every forward.
"""

from __future__ import annotations

import math
import string
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._decompose import hooi
from searchspace._domains import Float
from searchspace._registry import register_method
from searchspace._surgery import clone, iter_convs, replace

__all__ = ["TNet", "TNetConv1d", "TNetConv2d", "TuckerTensor", "group_convs"]

MIN_CHANNELS = 4


def _rank(dim: int, fraction: float) -> int:
    return max(1, min(dim, round(fraction * dim)))


def _exporting() -> bool:
    return not torch.jit.is_scripting() and torch.compiler.is_exporting()


class TuckerTensor(nn.Module):
    """A tensor of shape ``shape`` held as a Tucker core and one factor per mode.

    Args:
        shape: the full tensor's shape; mode 0 indexes the layers of the group.
        ranks: one rank per mode.
    """

    def __init__(self, *, shape: Sequence[int], ranks: Sequence[int]) -> None:
        super().__init__()
        if len(shape) != len(ranks) or any(not 1 <= r <= d for r, d in zip(ranks, shape)):
            raise ValueError(f"`1 <= rank <= dim` must hold for every mode, but got ranks={list(ranks)} for shape={list(shape)}")
        self.shape, self.ranks = tuple(shape), tuple(ranks)
        self.core = nn.Parameter(torch.zeros(*ranks))
        self.factors = nn.ParameterList([nn.Parameter(torch.zeros(d, r)) for d, r in zip(shape, ranks)])
        core_idx = string.ascii_lowercase[: len(shape)]
        out_idx = string.ascii_uppercase[1 : len(shape)]
        # core[a b c ..] * U0[a] * U1[B b] * U2[C c] ... -> slice[B C ...]
        self._slice_eq = f"{core_idx},{core_idx[0]}," + ",".join(f"{o}{c}" for o, c in zip(out_idx, core_idx[1:])) + f"->{out_idx}"
        self._cache: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, ranks: Sequence[int], *, n_iter_max: int = 3) -> TuckerTensor:
        """Tucker-factorise ``tensor`` at ``ranks`` (:func:`~searchspace._decompose.hooi`)."""
        module = cls(shape=tensor.shape, ranks=ranks)
        core, factors = hooi(tensor.cpu().float(), ranks, n_iter=n_iter_max)
        with torch.no_grad():
            module.core.copy_(core)
            for p, f in zip(module.factors, factors):
                p.copy_(f)
        return module.to(tensor.device)

    def param_count(self) -> int:
        """Core plus factors: ``prod(ranks) + sum(dim_i * rank_i)``."""
        return math.prod(self.ranks) + sum(d * r for d, r in zip(self.shape, self.ranks))

    def slice(self, index: int) -> torch.Tensor:
        """The full tensor's ``index``-th slice along mode 0."""
        if self.training or _exporting():
            # Exported graphs (torch.export, the ONNX exporter) compute the slice from the stored
            # factors: they cannot trace the cache's version stamps, and the factors are what ships.
            factors = [self.factors[i] for i in range(len(self.factors))]  # no ParameterList slice: export's module proxy cannot rebuild one
            return torch.einsum(self._slice_eq, self.core, factors[0][index], *factors[1:])
        # Inference: the kernel is a constant, rebuilt only when a factor changed since last time.
        stamp = tuple(p._version for p in self.parameters()) + tuple(p.data_ptr() for p in self.parameters())
        hit = self._cache.get(index)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, torch.einsum(self._slice_eq, self.core, self.factors[0][index], *self.factors[1:]))
            self._cache[index] = hit
        return hit[1]

    def full(self) -> torch.Tensor:
        return torch.stack([self.slice(i) for i in range(self.shape[0])])

    def __deepcopy__(self, memo: dict) -> TuckerTensor:
        # The cache holds tensors derived from the parameters; a copy starts without it.
        new = TuckerTensor(shape=self.shape, ranks=self.ranks)
        memo[id(self)] = new
        new.load_state_dict(self.state_dict())
        new.train(self.training)
        new = new.to(self.core.device)
        if not new.training:
            # Fill the inference cache now, so that a trace of the copy (MAC counting) sees the
            # convolutions with constant kernels, as inference runs them.
            for i in range(new.shape[0]):
                new.slice(i)
        return new


class _TNetConv:
    """A convolution whose kernel is slice ``index`` of a shared :class:`TuckerTensor`."""

    index: int

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        tensor = self._modules.get("tensor")
        if tensor is None:  # during the base class's __init__, before the weight is removed
            if "weight" in self._parameters:
                return self._parameters["weight"]
            raise AttributeError("weight")
        return tensor.slice(self.index)

    @classmethod
    def from_conv(cls, conv: nn.Module, tensor: TuckerTensor, index: int) -> nn.Module:
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        )
        del new._parameters["weight"]
        new.tensor = tensor
        new.index = index
        if conv.bias is not None:
            with torch.no_grad():
                new.bias.copy_(conv.bias.detach())
        return new.to(conv.weight.device)


class TNetConv1d(_TNetConv, nn.Conv1d):
    """``nn.Conv1d`` with its kernel taken from a shared Tucker tensor."""


class TNetConv2d(_TNetConv, nn.Conv2d):
    """``nn.Conv2d`` with its kernel taken from a shared Tucker tensor."""


_TNET_CLASS = {nn.Conv1d: TNetConv1d, nn.Conv2d: TNetConv2d}


def group_convs(model: nn.Module) -> tuple[list[list[str]], dict[str, str]]:
    """Groups (>= 2 layers) of convolutions with identical weight shape and hyperparameters.

    Returns the groups (qualified names, in model order) and, for every other convolution, why it
    stays dense.
    """
    groups: dict[tuple, list[str]] = {}
    skipped: dict[str, str] = {}
    for name, conv in iter_convs(model):
        if min(conv.in_channels, conv.out_channels) < MIN_CHANNELS:
            skipped[name] = f"fewer than {MIN_CHANNELS} channels"
            continue
        key = (type(conv), tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, conv.bias is not None)
        groups.setdefault(key, []).append(name)
    out = []
    for names in groups.values():
        if len(names) >= 2:
            out.append(names)
        else:
            skipped[names[0]] = "no same-shaped convolution to share a tensor with"
    return out, skipped


@register_method
class TNet(CompressionMethod):
    """T-Net (Kossaifi et al., CVPR 2019): one Tucker-factorised tensor per group of same-shaped convs.

    Searched: the rank of each mode as a fraction of its size -- ``rank_layers`` (the layer mode),
    ``rank_out``, ``rank_in`` and ``rank_kernel`` (every kernel mode). A group is converted only when
    core plus factors hold fewer parameters than its dense kernels.
    """

    name = "tnet"
    stage = Stage.STRUCTURE
    reference = "Kossaifi et al., CVPR 2019, arXiv:1904.02698 (T-Net: a single high-order Tucker tensor)"
    hyperparameters = {
        # The layer mode is where T-Net shares across layers, so the search must be able to cut it
        # on the smallest group (two layers: rank 1 below 0.75, each layer a multiple of one
        # kernel). 3-layer groups reach rank 2 at most (round(3 * 0.5) = 2): rank 1 there
        # collapses trained digits CNNs to chance.
        "rank_layers": Float(0.5, 1.0),
        "rank_out": Float(0.1, 1.0),
        "rank_in": Float(0.1, 1.0),
        "rank_kernel": Float(0.3, 1.0),
    }
    #: Its layers compute their weight from shared factors: Torch-Pruning cannot slice them.
    prunable_layers = False
    #: A group of layers shares one tensor: the notes record the converted groups.
    converted_note = "groups"

    def supports(self, model: nn.Module) -> str | None:
        groups, _ = group_convs(model)
        if not groups:
            return f"no two convolutions share a weight shape (with >= {MIN_CHANNELS} channels each way)"
        return None

    @staticmethod
    def ranks(shape: Sequence[int], params: Mapping[str, Any]) -> list[int]:
        fractions = [params["rank_layers"], params["rank_out"], params["rank_in"]] + [params["rank_kernel"]] * (len(shape) - 3)
        return [_rank(d, f) for d, f in zip(shape, fractions)]

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        out = clone(model)
        groups, skipped = group_convs(out)
        converted: dict[str, dict[str, Any]] = {}
        for names in groups:
            convs = [out.get_submodule(n) for n in names]
            stacked = torch.stack([c.weight.detach() for c in convs])
            ranks = self.ranks(stacked.shape, params)
            dense = stacked.numel()
            factored = math.prod(ranks) + sum(d * r for d, r in zip(stacked.shape, ranks))
            if factored >= dense:
                for n in names:
                    skipped[n] = f"no saving at ranks {ranks} ({factored} >= {dense} parameters)"
                continue
            tensor = TuckerTensor.from_tensor(stacked, ranks)
            for i, (n, conv) in enumerate(zip(names, convs)):
                replace(out, n, _TNET_CLASS[type(conv)].from_conv(conv, tensor, i))
            converted[names[0]] = {"layers": names, "shape": list(stacked.shape), "ranks": ranks, "params": factored, "dense": dense}
        context.notes[self.converted_key()] = converted
        context.notes["tnet.skipped"] = skipped
        return out
