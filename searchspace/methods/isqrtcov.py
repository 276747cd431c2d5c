"""iSQRT-COV: global covariance pooling with an iterative matrix square root, as a classifier head.

Li, Xie, Wang, Gao, "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix
Square Root Normalization", CVPR 2018 (arXiv 1712.01034). Instead of averaging the last feature map,
the head

1. reduces the channels with a 1x1 convolution to ``d`` (conv-BN-ReLU, as in the paper's ResNet head),
2. computes the sample covariance Sigma = X I_bar X^T of the ``d`` x ``M`` features (M positions),
3. pre-normalises by the trace, A = Sigma / tr(Sigma), so that Newton-Schulz converges,
4. runs ``N`` coupled Newton-Schulz iterations Y <- Y T, Z <- T Z with T = (3I - Z Y) / 2,
   starting from Y_0 = A, Z_0 = I (Y_N -> A^{1/2}),
5. post-compensates, C = sqrt(tr(Sigma)) Y_N, so the scale the pre-normalisation removed comes back,
6. classifies the ``d (d + 1) / 2`` entries of the upper triangle of C (C is symmetric).

Every step is a matrix product, so it runs on any BLAS and back-propagates without an SVD/EIG.

Why hand-written instead of a library: the reference code (jiangtaoxie/fast-MPN-COV) is not on PyPI
and is written as autograd Functions with hand-derived backward passes; the forward above is the
same algebra with autograd computing the gradient (checked against finite differences in the tests),
and it is TorchScript-scriptable, which the checkpoint export needs.

Changes from the paper, and why (one place): the head replaces the global average pooling of a
trained base and the whole model is then fine-tuned, instead of training the network with it
from scratch (a trial's budget); the reduction dimension ``dim`` is searched among 8..64 (the paper uses 256,
too wide for these small nets: the classifier input grows with d^2) and ``iterations`` among 3 and 5
(the reference default and the seed's "5 is enough"); the backward pass comes from autograd, not the
reference code's hand-derived one (same algebra, see above).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical
from searchspace._registry import register_method
from searchspace._surgery import clone

__all__ = ["ISqrtCov", "ISqrtCovHead", "covariance", "newton_schulz_sqrt"]

#: The least trace divided by: a feature map with a single position (e.g. resnet18's last
#: stage on 32x32 inputs) has a zero covariance, which must give a zero square root, not NaN.
TRACE_EPS = 1e-8


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Sample covariance of features ``x`` shaped (batch, d, M): X I_bar X^T with I_bar = (I - 11^T/M)/M."""
    centred = x - x.mean(dim=-1, keepdim=True)
    return torch.bmm(centred, centred.transpose(1, 2)) / x.shape[-1]


def newton_schulz_sqrt(sigma: torch.Tensor, iterations: int, eps: float = TRACE_EPS) -> torch.Tensor:
    """Square root of SPD matrices ``sigma`` (batch, d, d): trace pre-normalisation, coupled
    Newton-Schulz, post-compensation (Li et al., CVPR 2018, Eqs. 2-4).

    Args:
        sigma: symmetric positive (semi-)definite matrices, shaped (batch, d, d).
        iterations: Newton-Schulz iterations N >= 1 (the paper uses 3 or 5).
        eps: the least trace divided by (see :data:`TRACE_EPS`).

    As in the paper's implementation, the first iteration uses Z_0 = I (T_0 = (3I - A) / 2, no
    product) and the last one only updates Y; each step is one fused ``baddbmm`` plus products, which
    matters at batch 1 where every op costs microseconds of dispatch.

    Convergence is quadratic once the normalised eigenvalues are near 1 but slow for small ones: the
    error on an eigenvalue a of A is sqrt(a) (1 - sqrt(p_N)) with p_0 = a, p_{k+1} = p_k (3 - p_k)^2 / 4.
    With d comparable eigenvalues (a ~ 1/d), 5 iterations reach 1e-4 relative error at d = 4 but
    ~2e-2 at d = 16 (BENCHMARKS.md, "How many Newton-Schulz iterations does iSQRT-COV need?"): the paper trains through this approximation rather than
    computing the exact root.
    """
    if iterations < 1:
        raise ValueError("iterations >= 1 must hold for newton_schulz_sqrt")
    d = sigma.shape[-1]
    eye = torch.eye(d, dtype=sigma.dtype, device=sigma.device)
    # The trace as a masked sum rather than diagonal().sum(): the same value, and the ONNX exporter
    # (TorchScript path) loses the dtype after `diagonal` and then cannot export the sum.
    # Floored at eps rather than added to it: the same for any non-degenerate trace, and ONNX
    # Runtime gives 0 + 1e-8 = 0 for the exported sum (the graph optimiser drops the tiny addend),
    # so a single-position feature map (zero covariance) turned into NaN there.
    trace = (sigma * eye).sum(dim=[1, 2]).clamp_min(eps)
    a = sigma / trace[:, None, None]
    # Expanded to (batch, d, d) so MAC counters (torchprofile's baddbmm handler) read its shape.
    half3 = (1.5 * eye).expand_as(sigma)
    z = half3 - 0.5 * a
    y = torch.bmm(a, z)
    for i in range(1, iterations):
        t = torch.baddbmm(half3, z, y, alpha=-0.5)
        y = torch.bmm(y, t)
        if i + 1 < iterations:
            z = torch.bmm(t, z)
    return y * trace.sqrt()[:, None, None]


class ISqrtCovHead(nn.Module):
    """Classifier head: 1x1 reduction to ``dim``, covariance, iSQRT, upper triangle, linear.

    Accepts feature maps of any spatial rank, (batch, C, ...) with at least one position.

    Args:
        in_channels: channels of the incoming feature map.
        num_classes: classes.
        dim: channels after the 1x1 reduction (the covariance is dim x dim).
        iterations: Newton-Schulz iterations.
    """

    def __init__(self, *, in_channels: int, num_classes: int, dim: int = 32, iterations: int = 5) -> None:
        super().__init__()
        if dim < 2 or iterations < 1:
            raise ValueError(f"dim >= 2 and iterations >= 1 must hold, but got dim={dim}, iterations={iterations}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dim = dim
        self.iterations = iterations
        # A 1x1 convolution over flattened positions is the paper's 1x1 conv for 1D and 2D maps alike.
        self.reduce = nn.Sequential(
            nn.Conv1d(in_channels, dim, 1, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)
        )
        rows, cols = torch.triu_indices(dim, dim)
        self.register_buffer("triu", rows * dim + cols)
        self.fc = nn.Linear(dim * (dim + 1) // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x.flatten(2))
        root = newton_schulz_sqrt(covariance(x), self.iterations)
        return self.fc(root.flatten(1).index_select(1, self.triu))


def feature_shape(model: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    """Shape of one sample's input to ``model.head``, found by running ``example`` once."""
    seen: list[tuple[int, ...]] = []
    handle = model.head.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[1:])))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(example)
            model.train(was)
    finally:
        handle.remove()
    return seen[0]


@register_method
class ISqrtCov(CompressionMethod):
    """Replace a staged model's final classifier head by an iSQRT-COV head (fresh, then fine-tuned).

    Not a size reduction by itself: it changes what the last features are summarised by, which
    lets a narrower backbone (or an early exit, see ``exits``) keep accuracy.
    """

    name = "isqrtcov"
    prunable_layers = False
    stage = Stage.STRUCTURE
    reference = "Li et al., CVPR 2018, arXiv:1712.01034 (iSQRT-COV: iterative matrix square root normalisation)"
    hyperparameters = {
        "dim": Categorical([8, 16, 32, 64]),
        "iterations": Categorical([3, 5]),
    }

    def supports(self, model: nn.Module) -> str | None:
        if not isinstance(getattr(model, "stages", None), nn.ModuleList) or not isinstance(getattr(model, "head", None), nn.Module):
            return "the model is not a StagedNet (no `stages` + `head` to replace)"
        if isinstance(model.head, nn.Identity):
            # A module brought whole whose traced graph gave no head (automl._layout) is one stage
            # that ends in logits: there is no feature map between the stages and the head to pool.
            why = getattr(model, "layout_reason", None)
            return "the head is an identity (the stages end in logits): no feature map to pool" + (f" ({why})" if why else "")
        shape = getattr(model, "feature_shape", None)
        if shape is not None and len(shape) >= 2 and math.prod(shape[1:]) < 2:
            # One position: the covariance is zero for every input, so the head's logits would be constant.
            return f"the last feature map {list(shape)} has a single position at this input size: its covariance is zero for every input"
        return None

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        shape = feature_shape(model, context.example_input)
        if len(shape) < 2:
            raise ValueError(f"iSQRT-COV needs a feature map (channels, positions...), but the head gets {shape}")
        if math.prod(shape[1:]) < 2:
            raise ValueError(f"iSQRT-COV needs a feature map of at least 2 positions (its covariance is zero at 1), but the head gets {list(shape)}")
        out = clone(model)
        num_classes = _num_classes(model, context.example_input)
        out.head = ISqrtCovHead(in_channels=shape[0], num_classes=num_classes, dim=int(params["dim"]), iterations=int(params["iterations"]))
        out.head.to(context.example_input.device)
        context.notes["isqrtcov.features"] = list(shape)
        context.notes["isqrtcov.positions"] = math.prod(shape[1:])
        return out


def _num_classes(model: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        was = model.training
        model.eval()
        n = int(model(example).shape[-1])
        model.train(was)
    return n
