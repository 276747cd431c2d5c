"""Helpers shared by the re-parameterised convolution methods (wsnet, igc, igcv2, igcv3, dwsep, scale).

Private (leading underscore): the registry does not import it as a method.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "Permute",
    "bn_like",
    "conv_like",
    "connectivity",
    "divisor_at_most",
    "inherit_weights",
    "interleave",
    "param_count",
    "rank1",
]


def divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is ``<= cap`` (at least 1)."""
    for d in range(min(n, max(1, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rank1(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 fit (Frobenius norm) of each matrix of a batch ``(..., R, C)``: ``left[..., :, None] *
    right[..., None, :]``, ``right`` of unit norm and summing to >= 0 (so the split is unique).

    The Eckart-Young theorem makes the leading singular pair the least-squares optimum; a matrix that
    is rank 1 is reproduced exactly.
    """
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    left, right = u[..., :, 0] * s[..., :1], vh[..., 0, :]
    sign = torch.where(right.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(right)
    return left * sign, right * sign


def conv_like(conv: nn.Conv1d | nn.Conv2d) -> type[nn.Module]:
    """``nn.Conv1d`` or ``nn.Conv2d``, the same dimensionality as ``conv``."""
    return type(conv)


def bn_like(conv: nn.Conv1d | nn.Conv2d) -> type[nn.Module]:
    return nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d


def interleave(rows: int, cols: int) -> torch.Tensor:
    """The IGC permutation: channels laid out as ``(rows, cols)`` read out as ``(cols, rows)``.

    Output channel ``c * rows + r`` takes input channel ``r * cols + c``: the c-th new partition
    holds the c-th channel of every old partition (Zhang et al., ICCV 2017, section 3.1).
    """
    return torch.arange(rows * cols).view(rows, cols).t().reshape(-1)


class Permute(nn.Module):
    """Reorders channels: ``y[:, i] = x[:, index[i]]``.

    A stored index (not a reshape/transpose pair) so that one module expresses the IGC shuffle, its
    inverse and the mixed-radix digit moves of IGCV2; ``index_select`` is one copy either way.
    """

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.long).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def mask(self) -> torch.Tensor:
        """Path-count matrix (out x in) of this permutation."""
        n = self.index.numel()
        m = torch.zeros(n, n, dtype=torch.long)
        m[torch.arange(n), self.index] = 1
        return m


def _conv_mask(conv: nn.Conv1d | nn.Conv2d) -> torch.Tensor:
    # Block-diagonal ones: a group conv connects each output only to the inputs of its group.
    g = conv.groups
    return torch.block_diag(*[torch.ones(conv.out_channels // g, conv.in_channels // g, dtype=torch.long)] * g)


def connectivity(modules: list[nn.Module]) -> torch.Tensor:
    """Number of channel paths from each input to each output through a chain of modules.

    Convolutions contribute their group structure, :class:`Permute` its permutation; anything
    else (BN, activations) is channel-wise and contributes the identity. The result is the
    product of the blocks' masks, ``M_n @ ... @ M_1`` (out x in).
    """
    out: torch.Tensor | None = None
    for m in modules:
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            block = _conv_mask(m)
        elif isinstance(m, Permute):
            block = m.mask()
        else:
            continue
        out = block if out is None else block @ out
    if out is None:
        raise ValueError("connectivity needs at least one convolution or permutation")
    return out


def inherit_weights(dst: nn.Module, src: nn.Module) -> list[str]:
    """Copy the leading slice of every same-named tensor of ``src`` into ``dst``; return the names copied.

    Used where an architecture is rebuilt narrower or shallower (width multiplier, compound
    scaling): a layer keeps the base's first channels and blocks instead of starting from noise.
    Where the models name their tensors after a library (``library_keys``: a model brought by name
    is split into stages where its traced graph says, and a shallower copy may be split elsewhere),
    tensors are matched by those names.
    """
    own_src = getattr(src, "library_keys", None) or {}
    own_dst = getattr(dst, "library_keys", None) or {}
    src_state = {own_src.get(k, k): v for k, v in src.state_dict().items()}
    copied = []
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            s = src_state.get(own_dst.get(name, name))
            if s is None or s.dim() != t.dim():
                continue
            if t.dim() == 0:
                t.copy_(s)
            else:
                sl = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, s.shape))
                if any(a != b for a, b in zip(t.shape[2:], s.shape[2:])):
                    continue  # another kernel size: nothing sensible to copy
                t[sl].copy_(s[sl])
            copied.append(name)
    return copied


def try_scaled(model: nn.Module, **kwargs: Any) -> tuple[nn.Module | None, str | None]:
    """``model.scaled(**kwargs)`` with the base's weights inherited, or ``(None, reason)``."""
    scaled: Callable[..., nn.Module] | None = getattr(model, "scaled", None)
    if scaled is None:
        return None, f"{type(model).__name__} has no scaled()"
    try:
        new = scaled(**kwargs)
    except NotImplementedError as exc:
        return None, str(exc)
    inherit_weights(new, model)
    return new, None


def kernel_numel(conv: nn.Conv1d | nn.Conv2d) -> int:
    return math.prod(conv.kernel_size)
