"""Per-method params / MACs / batch-1 1-thread latency of the re-parameterised convolutions, eager.

One layer (the MNIST-1D CNN's Conv1d 128->128 k3 s2 on length 19; a 2D 128->128 3x3 conv on 28x28)
and whole models (MNIST-1D CNN at 128 channels; resnet18 at 224x224), every variant measured side by
side in ONE process, interleaved rounds, median over rounds. Also times WSNet's two forwards (materialised
conv after the channel sum vs the paper's product-map reuse) on the 1D layer.

    python benchmarks/reparam_latency.py [--rounds 5]

Prints markdown tables. The whole-model rows in every runtime: ``benchmarks/runtimes.py``.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from torch import nn

from automl import build_model
from automl._artifact import eager_artifact
from automl._latency import LatencySettings
from automl._measure import count_macs, time_artifact
from searchspace import ApplyContext, get_method
from searchspace.methods.dwsep import DWSepConv
from searchspace.methods.igc import IGCConv
from searchspace.methods.igcv2 import IGCV2, IGCV2Conv
from searchspace.methods.igcv3 import IGCV3, IGCV3Conv
from searchspace.methods.tucker import Tucker2Conv
from searchspace.methods.wsnet import WSConv

#: Settings per method: one representative point of each search space.
SETTINGS: dict[str, dict[str, Any]] = {
    "tucker": {"rank_out": 0.25, "rank_in": 0.25},
    "wsnet": {"stride": 1, "repeat": 4, "init": "lstsq"},
    "igc": {"partitions": 4},
    "igcv2": {"convs": 2},
    "igcv3": {"expansion": 2, "groups1": 2, "groups2": 2},
    "dwsep": {"width": 1.0, "activation": True, "init": "lstsq"},
    "scale": {"phi": -6.0},
}


def layer_variants(conv: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"dense": conv}
    out["tucker 25%"] = Tucker2Conv(conv=conv, r_out=conv.out_channels // 4, r_in=conv.in_channels // 4)
    out["wsnet S=1 C=4 (conv)"] = WSConv(conv=conv, stride=1, repeat=4)
    if isinstance(conv, nn.Conv1d):
        pm = WSConv(conv=conv, stride=1, repeat=4)
        pm.mode = "product_map"
        out["wsnet S=1 C=4 (product map)"] = pm
        pm1 = WSConv(conv=conv, stride=1, repeat=1)
        pm1.mode = "product_map"
        out["wsnet S=1 C=1 (product map)"] = pm1
        out["wsnet S=1 C=1 (conv)"] = WSConv(conv=conv, stride=1, repeat=1)
    out["igc L=4"] = IGCConv(conv=conv, partitions=4)
    out["igcv2 2 group convs"] = IGCV2Conv(conv=conv, factors=IGCV2.layer_factors(conv, 2))
    g1, g2 = IGCV3.layer_settings(conv, 2, 2, 2)
    out["igcv3 t=2 G1=G2=2"] = IGCV3Conv(conv=conv, expansion=2, g1=g1, g2=g2)
    out["dwsep"] = DWSepConv(conv=conv, activation=True)
    return out


def model_variants(base: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, tuple[nn.Module, dict]]:
    out: dict[str, tuple[nn.Module, dict]] = {"dense": (base, {})}
    for name in names:
        method = get_method(name)()
        if method.supports(base) is not None:
            continue
        ctx = ApplyContext(example_input=example)
        out[name] = (method.apply(base, SETTINGS[name], context=ctx).eval(), ctx.notes)
    return out


def side_by_side(models: dict[str, nn.Module], example: torch.Tensor, rounds: int, settings: LatencySettings) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds (every model once per round) of the per-round medians."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            times[k].append(time_artifact(eager_artifact(m.eval()), example, settings, per_sample=False)[0])
    return {k: statistics.median(v) for k, v in times.items()}


def table(title: str, models: dict[str, nn.Module], example: torch.Tensor, rounds: int, settings: LatencySettings) -> str:
    lat = side_by_side(models, example, rounds, settings)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    macs = {k: count_macs(m, example) for k, m in models.items()}
    d = "dense"
    lines = [f"### {title}", "", "| variant | params | MACs | latency ms | params / dense | MACs / dense | speed-up vs dense |", "|---|---|---|---|---|---|---|"]
    for k in models:
        mac = f"{macs[k]:,}" if macs[k] is not None else "n/a"
        mr = f"{macs[k] / macs[d]:.3f}" if macs[k] and macs[d] else "n/a"
        lines.append(f"| {k} | {params[k]:,} | {mac} | {lat[k]:.4f} | {params[k] / params[d]:.3f} | {mr} | {lat[d] / lat[k]:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    small = LatencySettings(runtime="eager", batch_size=1, threads=1, warmup=10, repeats=15, isolate=False, max_attempts=1)
    big = LatencySettings(runtime="eager", batch_size=1, threads=1, warmup=2, repeats=3, isolate=False, max_attempts=1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rounds {args.rounds}\n")

    torch.manual_seed(0)
    conv1 = nn.Conv1d(128, 128, 3, stride=2, padding=1)
    print(table("One layer: Conv1d 128->128, k=3, stride 2, input length 19 (MNIST-1D CNN, 2nd conv)", layer_variants(conv1), torch.randn(1, 128, 19), args.rounds, small))
    conv2 = nn.Conv2d(128, 128, 3, padding=1)
    print(table("One layer: Conv2d 128->128, 3x3, input 28x28", layer_variants(conv2), torch.randn(1, 128, 28, 28), args.rounds, small))

    names = list(SETTINGS)
    m1d = build_model("mnist1d_cnn", input_shape=(40,), num_classes=10, options={"channels": 128}).eval()
    x1 = torch.randn(1, 40)
    variants = model_variants(m1d, x1, names)
    print(table("Whole model: MNIST-1D CNN, 128 channels, input length 40", {k: m for k, (m, _) in variants.items()}, x1, args.rounds, small))
    for k, (_, notes) in variants.items():
        if notes:
            print(f"- {k}: {notes}")
    print()
    if not args.skip_resnet:
        r18 = build_model("resnet18", input_shape=(3, 224, 224), num_classes=1000).eval()
        x2 = torch.randn(1, 3, 224, 224)
        variants = model_variants(r18, x2, [n for n in names if n != "tucker"])
        print(table("Whole model: resnet18, 224x224, 1000 classes", {k: m for k, (m, _) in variants.items()}, x2, max(1, args.rounds // 2), big))


if __name__ == "__main__":
    main()
