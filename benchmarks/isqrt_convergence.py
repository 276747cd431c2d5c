"""How close N Newton-Schulz iterations (iSQRT-COV) get to the exact matrix square root.

    python benchmarks/isqrt_convergence.py

Covariances of d x 64 Gaussian features (float64, 64 matrices per d); error = max over matrices of
||Y_N - sqrt(S)||_F / ||sqrt(S)||_F against an eigendecomposition root.
"""

from __future__ import annotations

import argparse

import torch

from searchspace.methods.isqrtcov import covariance, newton_schulz_sqrt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="matrix sizes d")
    ap.add_argument("--iterations", type=int, nargs="+", default=[1, 3, 5, 7, 10], help="Newton-Schulz iteration counts N")
    args = ap.parse_args()
    dims, iterations = args.dims, args.iterations
    print("| d | " + " | ".join(f"N={n}" for n in iterations) + " |")
    print("|---|" + "---|" * len(iterations))
    for d in dims:
        sigma = covariance(torch.randn(64, d, 64, generator=torch.Generator().manual_seed(d), dtype=torch.float64))
        values, vectors = torch.linalg.eigh(sigma)
        exact = vectors @ torch.diag_embed(values.clamp_min(0).sqrt()) @ vectors.transpose(-1, -2)
        errs = []
        for n in iterations:
            approx = newton_schulz_sqrt(sigma, n)
            errs.append(((approx - exact).norm(dim=(-2, -1)) / exact.norm(dim=(-2, -1))).max().item())
        print(f"| {d} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
