"""Two fixed costs of a trial, each against the slower way it could be done, side by side in one run.

1. Tucker-2 decomposition of every eligible convolution of resnet18 (1000 classes) at ranks 0.5 /
   0.5: tensorly's ``partial_tucker`` (HOOI, SVD init, 10 iterations)
   against :func:`searchspace._decompose.hooi` (the same HOOI from Gram matrices), with the
   relative reconstruction error of each, on random kernels.
2. The artifacts of an early-exit trial's calibrated settings (MNIST-1D CNN, one exit, 1 + 8
   settings): each setting captured and exported afresh against the first one exported and
   the others rebound from its files (``build_artifact(like=...)``).

Interleaved rounds; medians. Needs the dev extras (tensorly).

    python benchmarks/trial_overheads.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tensorly import backend_context
from tensorly.decomposition import partial_tucker

import searchspace
from automl import build_model
from automl._artifact import build_artifact
from searchspace import ApplyContext
from searchspace._decompose import hooi
from searchspace.methods.tucker import Tucker, tucker_ranks


def _convs() -> list[torch.nn.Conv2d]:
    torch.manual_seed(0)
    model = build_model("resnet18", input_shape=(3, 224, 224), num_classes=1000)
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and Tucker._eligible(m) is None]


def _error(w: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> float:
    rec = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
    return float((rec - w).norm() / w.norm())


def tucker_round(convs) -> dict[str, float]:
    out = {"tensorly s": 0.0, "ours s": 0.0, "tensorly err": [], "ours err": []}
    for conv in convs:
        w = conv.weight.detach().to(torch.float64)
        r_out, r_in = tucker_ranks(conv, 0.5, 0.5)
        t = time.perf_counter()
        with backend_context("pytorch"):
            (core, (a, b)), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd", n_iter_max=10, random_state=0)
        out["tensorly s"] += time.perf_counter() - t
        out["tensorly err"].append(_error(w, core, a, b))
        t = time.perf_counter()
        core, (a, b) = hooi(w, [r_out, r_in], modes=[0, 1], n_iter=10)
        out["ours s"] += time.perf_counter() - t
        out["ours err"].append(_error(w, core, a, b))
    out["tensorly err"] = statistics.mean(out["tensorly err"])
    out["ours err"] = statistics.mean(out["ours err"])
    return out


def _random_context(shape: tuple[int, ...], base: torch.nn.Module) -> ApplyContext:
    """64 seeded random samples of ``shape`` as two calibration batches; ``fit`` trains nothing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, *shape, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    return ApplyContext(
        example_input=x[:1],
        calibration=lambda: iter([(x[:32], y[:32]), (x[32:], y[32:])]),
        fit=lambda module, **kw: module,
        base=base,
    )


def exits_round(root: Path) -> dict[str, float]:
    torch.manual_seed(0)
    base = build_model("mnist1d_cnn", input_shape=(40,), num_classes=10).eval()
    params = {"points": "stages", "count": 1, "head": "avgpool", "pool": 2, "training": "frozen", "thresholds": "direct", "threshold_0": 0.5}
    model = searchspace.get_method("exits")().apply(base, params, context=_random_context((40,), base)).eval()
    example = torch.randn(1, 40)
    settings = [0.1 * k for k in range(1, 10)]
    out = {}
    for mode in ("fresh", "rebound"):
        t = time.perf_counter()
        for k, threshold in enumerate(settings):
            with torch.no_grad():
                model.thresholds[0] = threshold
            like = root / f"{mode}0" if mode == "rebound" and k else None
            build_artifact(model, example, root / f"{mode}{k}", like=like)
        out[f"{mode} s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    convs = _convs()
    tucker, exits = [], []
    for r in range(args.rounds):
        tucker.append(tucker_round(convs))
        with tempfile.TemporaryDirectory() as tmp:
            exits.append(exits_round(Path(tmp)))
    med = lambda rows, k: statistics.median(row[k] for row in rows)  # noqa: E731
    print(f"Tucker-2 of resnet18's {len(convs)} eligible convolutions at ranks 0.5/0.5, 1 thread, median of {args.rounds} rounds:")
    print("| decomposition | seconds | mean relative reconstruction error |\n|---|---:|---:|")
    for name in ("tensorly", "ours"):
        print(f"| {'tensorly partial_tucker' if name == 'tensorly' else 'searchspace._decompose.hooi'} | {med(tucker, name + ' s'):.2f} | {med(tucker, name + ' err'):.6f} |")
    print(f"speed-up {med(tucker, 'tensorly s') / med(tucker, 'ours s'):.1f}x\n")
    print(f"Artifacts of 9 exit settings (MNIST-1D CNN), median of {args.rounds} rounds:")
    print("| artifacts | seconds |\n|---|---:|")
    print(f"| each setting captured and exported | {med(exits, 'fresh s'):.1f} |")
    print(f"| first exported, 8 rebound | {med(exits, 'rebound s'):.1f} |")
    print(f"speed-up {med(exits, 'fresh s') / med(exits, 'rebound s'):.1f}x")


if __name__ == "__main__":
    main()
