"""Which channel counts run fast? A base pruned at several ratios, with exact counts (``round_to`` 1)
and counts kept at multiples of 8 and 16, timed as the study times it (ONNX Runtime, batch 1, one
thread, the shipped ``model.onnx``).

Every pruned model is built by the ``prune`` method itself (l1 criterion; latency does not depend on
the trained values), exported through the trial's artifact path and timed side by side in ONE
process: interleaved rounds (every model once per round), the median over rounds of each round's
block-timing median. Models with the same channel counts are timed once.

    python benchmarks/channel_alignment.py [--model digits_cnn --shape 1,8,8] [--rounds 7]

Prints the CPU (and whether it has AVX-512), then a markdown table: channel counts, MACs, latency,
speed-up over the base, and the speed-up the MACs alone would predict. ``--tucker 0.25,0.6`` adds
the ``tucker`` method at those rank fractions (``rank_out`` = ``rank_in``): its ranks are channel
counts of the convolutions it inserts, on the same fast path or off it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from automl import build_model
from automl._artifact import build_artifact
from automl._latency import LatencySettings
from automl._measure import count_macs, time_artifact
from automl._target import cpu_name
from searchspace import ApplyContext, get_method


def widths(model: nn.Module) -> tuple[int, ...]:
    return tuple(m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "flags unknown"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "none of avx2/avx512"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits_cnn")
    ap.add_argument("--shape", default="1,8,8", help="input shape without the batch, comma-separated")
    ap.add_argument("--ratios", default="0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--round-to", default="1,8,16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tucker", default="", help="Tucker-2 rank fractions to add, comma-separated")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    base = build_model(args.model, input_shape=shape, num_classes=10).eval()
    example = torch.randn(1, *shape)
    prune = get_method("prune")()
    models: dict[tuple[int, ...], tuple[str, nn.Module]] = {widths(base): ("base", base)}
    for ratio in (float(r) for r in args.ratios.split(",")):
        for multiple in (int(k) for k in args.round_to.split(",")):
            params = {"criterion": "l1", "ratio": ratio, "per_stage": False, **({"round_to": multiple} if multiple > 1 else {})}
            out = prune.apply(base, params, context=ApplyContext(example_input=example)).eval()
            label = f"ratio {ratio:g}, round_to {multiple}"
            key = widths(out)
            models[key] = (models[key][0] + "; " + label, models[key][1]) if key in models else (label, out)
    for fraction in (float(r) for r in args.tucker.split(",") if r):
        out = get_method("tucker")().apply(base, {"rank_out": fraction, "rank_in": fraction}, context=ApplyContext(example_input=example)).eval()
        models.setdefault(widths(out), (f"tucker ranks {fraction:g}", out))
    settings = LatencySettings(runtime="onnxruntime", batch_size=1, threads=1, warmup=10, repeats=15, isolate=False, max_attempts=1)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {k: build_artifact(m, example, Path(tmp) / str(i), runtime="onnxruntime", threads=1) for i, (k, (_, m)) in enumerate(models.items())}
        times: dict[tuple[int, ...], list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):
            for k, artifact in artifacts.items():
                times[k].append(time_artifact(artifact, example, settings, per_sample=False)[0])
    lat = {k: statistics.median(v) for k, v in times.items()}
    macs = {k: count_macs(m, example) for k, (_, m) in models.items()}
    b = widths(base)
    print(f"{cpu_name()} ({cpu_flags()}); {args.model} {shape}; ONNX Runtime, batch 1, 1 thread; median of {args.rounds} interleaved rounds\n")
    print("| channels | model | MACs | latency ms | x faster | x fewer MACs |")
    print("|---|---|---:|---:|---:|---:|")
    for k in sorted(models, key=lambda k: -macs[k]):
        print(f"| {'/'.join(map(str, k))} | {models[k][0]} | {macs[k]:,} | {lat[k]:.4f} | {lat[b] / lat[k]:.2f} | {macs[b] / macs[k]:.2f} |")


if __name__ == "__main__":
    main()
