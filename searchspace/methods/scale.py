"""Compound scaling of width, depth and input resolution (EfficientNet), used to scale down.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019
(arXiv 1905.11946). One compound coefficient phi scales depth by alpha^phi, width by beta^phi and
resolution by gamma^phi, with alpha * beta^2 * gamma^2 ~ 2 so that FLOPs scale by ~2^phi. The paper
finds alpha = 1.2, beta = 1.1, gamma = 1.15 by a grid search on its B0 base (under that constraint)
and then only varies phi. phi <= 0 shrinks.

Searched: ``phi``, ``alpha`` and ``beta``; ``gamma`` is not a free parameter but follows from the
constraint, alpha * beta^2 * gamma^2 = :data:`FLOPS_BASE` (B0's own product, 1.2 * 1.1^2 * 1.15^2 =
1.92, the paper's "~2"), so B0's alpha and beta give back exactly its gamma = 1.15 and every sampled
triple grows FLOPs by the same factor per unit of phi. The domains keep gamma >= 1. Where the input
size is fixed (no resolution scaling, see below) FLOPs scale by (alpha * beta^2)^phi instead.

Width and depth go through ``StagedNet.scaled(width=, depth=)``: only the architecture knows how it
scales (the built-in CNNs declare it, and so do torchvision's ResNets and MobileNetV2 through
``TorchvisionNet``; models brought by library name through ``LibraryNet`` where their family's builder
takes a width and a depth: torchvision's ResNet family, MobileNetV2 and EfficientNet B0-B7, timm's
ResNets; for other nets ``supports`` says why not). The
scaled net inherits the base's leading channels and same-named blocks (``inherit_weights``) rather
than starting from noise.

Changes from the paper, and why (one place): the grid search over (alpha, beta) becomes part of the
study's search (its objectives, not B0's ImageNet accuracy, pick them); phi is continuous and
negative (compression, not growth); depth is rounded up per stage as EfficientNet and torchvision do
(``ceil``), width to the nearest channel count (no multiple-of-8 rounding: the built-in nets are
tiny). On small nets that rounding moves the FLOPs ratio well away from (alpha * beta^2 * gamma^2)^phi
(the MNIST-1D CNN keeps both 3-tap layers down to phi ~ -3.8 with B0's alpha, so there FLOPs follow
beta^(2 phi) alone); ``tests/searchspace/test_reparam.py`` measures it.

Resolution: the input is resampled (linear / bilinear interpolation, ``Resampled``) to
round(gamma^phi * size) per spatial axis, at least :data:`MIN_SIZE`, and the net runs on that. It is
applied only where the dataset and the net allow it, checked by running the scaled net on a
resampled example: a net ending in global pooling (digits CNN, 8x8 images) accepts any size. MNIST-1D
samples come as (N, 40) without a channel axis and the MNIST-1D CNN flattens its last feature map into
a linear layer sized for length 40, so there the resolution stays 1 and the notes say why (resampling
the 40-point signal would be meaningful data-wise; it is the architecture that fixes the length).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Float
from searchspace._registry import register_method
from searchspace.methods._reparam import try_scaled

#: Smallest spatial size the input is resampled to.
MIN_SIZE = 4
#: alpha * beta^2 * gamma^2 of EfficientNet-B0's triple (1.2, 1.1, 1.15): the FLOPs factor per unit phi.
FLOPS_BASE = 1.2 * 1.1**2 * 1.15**2


def constrained_gamma(alpha: float, beta: float) -> float:
    """The resolution base gamma with alpha * beta^2 * gamma^2 = :data:`FLOPS_BASE`.

    Raises:
        ValueError: alpha * beta^2 already exceeds FLOPS_BASE (gamma would be below 1).
    """
    rest = FLOPS_BASE / (alpha * beta**2)
    if rest < 1.0 - 1e-12:
        raise ValueError(f"`alpha * beta^2 <= {FLOPS_BASE:.4f}` must hold, but got alpha={alpha}, beta={beta} (scale)")
    return max(1.0, rest) ** 0.5


class Resampled(nn.Module):
    """Resample the input to ``size`` (per spatial axis), then run ``net``."""

    def __init__(self, net: nn.Module, size: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.size = list(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "linear" if x.dim() == 3 else "bilinear"
        return self.net(F.interpolate(x, size=self.size, mode=mode, align_corners=False))


@register_method
class CompoundScaling(CompressionMethod):
    """EfficientNet compound scaling (Tan & Le, ICML 2019), searched with phi <= 0 to shrink."""

    name = "scale"
    stage = Stage.STRUCTURE
    reference = "Tan & Le, EfficientNet compound scaling, ICML 2019, arXiv:1905.11946"
    hyperparameters = {
        "phi": Float(-12.0, 0.0),
        # 1.4 * 1.15^2 = 1.85 < FLOPS_BASE: every (alpha, beta) in the domain leaves gamma >= 1.
        "alpha": Float(1.0, 1.4),
        "beta": Float(1.0, 1.15),
    }

    def space(self, trial: Any) -> dict[str, Any]:
        out = {key: self.suggest(trial, key) for key in ("phi", "alpha", "beta")}
        out["gamma"] = constrained_gamma(out["alpha"], out["beta"])
        return out

    def supports(self, model: nn.Module) -> str | None:
        try:
            model.scaled(width=1.0, depth=1.0)  # type: ignore[operator]
        except (AttributeError, TypeError):
            return f"{type(model).__name__} has no scaled(width=, depth=)"
        except NotImplementedError as exc:
            return str(exc)
        return None

    @staticmethod
    def factors(params: Mapping[str, Any]) -> tuple[float, float, float]:
        """(depth, width, resolution) multipliers for ``params``."""
        phi = params["phi"]
        alpha, beta = params.get("alpha", 1.2), params.get("beta", 1.1)
        gamma = params.get("gamma", constrained_gamma(alpha, beta))
        return alpha**phi, beta**phi, gamma**phi

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        depth, width, resolution = self.factors(params)
        out, reason = try_scaled(model, width=width, depth=depth)
        if out is None:
            raise ValueError(f"scale cannot apply: {reason}")
        context.notes["scale.width"] = width
        context.notes["scale.depth"] = depth
        x = context.example_input.detach().cpu()
        spatial = x.shape[2:] if x.dim() >= 3 else ()
        size = tuple(max(MIN_SIZE, round(s * resolution)) for s in spatial)
        if not spatial:
            context.notes["scale.resolution"] = "1.0 (input has no channel axis to resample along)"
            return out
        if size == tuple(spatial):
            context.notes["scale.resolution"] = 1.0
            return out
        wrapped = Resampled(out, size)
        try:
            with torch.no_grad():
                wrapped.eval()(x)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            context.notes["scale.resolution"] = f"1.0 (the net does not run at size {list(size)}: {first})"
            return out
        context.notes["scale.resolution"] = [s / o for s, o in zip(size, spatial)]
        return wrapped.train(out.training)
