"""Tucker decomposition by HOOI (higher-order orthogonal iteration, SVD init; De Lathauwer et al.,
2000), shared by the Tucker-2 (:mod:`searchspace.methods.tucker`) and T-Net
(:mod:`searchspace.methods.tnet`) methods.

Why not tensorly's ``tucker`` / ``partial_tucker``: both take each mode's subspace from an SVD of the
mode unfolding, and ``partial_tucker``'s iterations call the default SVD whatever ``svd=`` says
(tensorly 0.10 passes it to the initialisation only). On a 512 x 512 x 3 x 3 ResNet kernel that is
~5 s per layer (45 s for resnet18's 16 eligible convolutions against 10 s here: BENCHMARKS.md,
"How long do a trial's fixed overheads take?"); on T-Net's stacked 3 x 512 x 512 x 3 x 3 kernel
minutes (``svd="symeig_svd"`` forms the 2.4M x 2.4M Gram matrix and runs out of memory). Taking each
mode's subspace from the small d x d Gram matrix of its unfolding is the same maths in a fraction of
the time (tests/searchspace/test_tucker.py checks it against tensorly's ``partial_tucker``).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["hooi"]


def _leading_left(a: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of ``a`` (d x n), from the d x d Gram matrix."""
    _, vecs = torch.linalg.eigh(a @ a.T)
    return vecs[:, -r:].flip(1)


def _mode_dot(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    """``x`` times matrix ``m`` (new_dim x dim) along ``mode``."""
    return torch.tensordot(m, x, dims=([1], [mode])).movedim(0, mode)


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def hooi(
    x: torch.Tensor, ranks: Sequence[int], *, modes: Sequence[int] | None = None, n_iter: int = 10
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Tucker decomposition of ``x`` along ``modes`` (default: all) at ``ranks`` (one per mode),
    exact at full ranks; the other modes are left as they are (a partial Tucker).

    Computes in ``x``'s floating dtype (float32 for other dtypes).

    Returns:
        ``(core, factors)``: ``factors[j]`` is ``x.shape[modes[j]] x ranks[j]`` with orthonormal
        columns, and ``x ~= core x_modes[0] factors[0] x_modes[1] factors[1] ...``.
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.to(torch.float32)
    modes = list(range(x.dim())) if modes is None else list(modes)
    if len(modes) != len(ranks) or any(not 1 <= r <= x.shape[m] for m, r in zip(modes, ranks)):
        raise ValueError(f"`1 <= rank <= dim` must hold for every decomposed mode, but got ranks={list(ranks)} for modes {modes} of shape {list(x.shape)}")
    rank = dict(zip(modes, ranks))
    factors = {m: _leading_left(_unfold(x, m), rank[m]) for m in modes}

    def shrinking_first(ms):
        # Each projection applies the most shrinking factors first (smallest intermediate tensors).
        return sorted(ms, key=lambda m: rank[m] / x.shape[m])

    # Full-rank modes lose nothing whatever their basis: only truncated modes are iterated.
    truncated = [m for m in modes if rank[m] < x.shape[m]]
    if len(truncated) > 1:
        for _ in range(n_iter):
            for n in truncated:
                y = x
                for m in shrinking_first(m for m in truncated if m != n):
                    y = _mode_dot(y, factors[m].T, m)
                factors[n] = _leading_left(_unfold(y, n), rank[n])
    core = x
    for m in shrinking_first(modes):
        core = _mode_dot(core, factors[m].T, m)
    return core, [factors[m] for m in modes]
