"""Which runtime turns fewer MACs into less time? Per method, eager vs TorchScript vs ONNX Runtime.

For resnet18 at 224x224 (1000 classes) and the MNIST-1D CNN (128 channels), every registered method
that applies (one representative setting each, weights untrained: latency does not depend on them)
is turned into each runtime's artifact (:func:`automl._artifact.build_artifact`, what a trial builds)
and timed by the trials' own function (:func:`automl._measure.time_artifact`), batch 1, one thread.
All models and runtimes are timed side by side in one process, in interleaved rounds; the table
gives medians over rounds. Early exits are left out (their latency depends on trained thresholds).

- MAC reduction = base MACs / method MACs;
- speed-up (per runtime) = base latency / method latency, both in that runtime;
- realisation = speed-up / MAC reduction: 1.0 means the runtime turns the saved MACs into time.

    python benchmarks/runtimes.py [--rounds 3] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import optuna
import torch

import searchspace
from automl import build_model
from automl._artifact import ArtifactError, build_artifact
from automl._latency import LatencySettings
from automl._measure import count_macs, param_count, time_artifact
from searchspace import ApplyContext

RUNTIMES = ("eager", "torchscript", "onnxruntime")

#: One representative point of each method's space.
SETTINGS: dict[str, dict[str, Any]] = {
    "tucker": {"rank_out": 0.25, "rank_in": 0.25},
    "tnet": {"rank_layers": 0.5, "rank_out": 0.5, "rank_in": 0.5, "rank_kernel": 1.0},
    "wsnet": {"stride": 1, "repeat": 4, "init": "random"},
    "igc": {"partitions": 4},
    "igcv2": {"convs": 2},
    "igcv3": {"expansion": 2, "groups1": 2, "groups2": 2, "first_layer": False},
    "dwsep": {"width": 1.0, "activation": True, "init": "random", "first_layer": False},
    "scale": {"phi": -2.0},
    "isqrtcov": {"dim": 64, "iterations": 5},
    "prune": {"criterion": "l1", "ratio": 0.5, "per_stage": False},
    "int8": {"mode": "static"},
}


def variants(base: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, torch.nn.Module]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, *shape, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    out = {"dense": base}
    for name, params in SETTINGS.items():
        method = searchspace.get_method(name)()
        if method.supports(base) is not None:
            continue
        ctx = ApplyContext(example_input=x[:1], calibration=lambda: iter([(x[:32], y[:32]), (x[32:], y[32:])]), fit=lambda m, **kw: m, base=base)
        try:
            # The method's own space fills what the setting leaves to its defaults (e.g. scale's alpha).
            fixed = {f"{name}.{k}": v for k, v in params.items()}
            for key, domain in method.hyperparameters.items():
                fixed.setdefault(f"{name}.{key}", getattr(domain, "low", None) if not hasattr(domain, "choices") else domain.choices[0])
            out[name] = method.apply(base, method.space(optuna.trial.FixedTrial(fixed)), context=ctx).eval()
        except Exception as exc:  # noqa: BLE001 - a setting this model cannot take is reported, not fatal
            print(f"- {name}: not applied ({type(exc).__name__}: {exc})")
    return out


def table(title: str, base: torch.nn.Module, shape: tuple[int, ...], rounds: int, settings: LatencySettings) -> None:
    models = variants(base, shape)
    example = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    float_macs = count_macs(models["dense"], example)
    macs = {k: (float_macs if k == "int8" else count_macs(m, example)) for k, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts: dict[tuple[str, str], Any] = {}
        for k, m in models.items():
            for r in RUNTIMES:
                try:
                    artifacts[k, r] = build_artifact(m, example, Path(tmp) / k / r, runtime=r, threads=settings.threads)
                except ArtifactError as exc:
                    print(f"- {k} / {r}: {exc}")
        times: dict[tuple[str, str], list[float]] = {key: [] for key in artifacts}
        for _ in range(rounds):
            for key, a in artifacts.items():
                times[key].append(time_artifact(a, example, settings, per_sample=False)[0])
    lat = {key: statistics.median(v) for key, v in times.items()}
    print(f"\n### {title}\n")
    print("| method | params | MAC reduction | " + " | ".join(f"{r} ms | {r} speed-up | {r} realisation" for r in RUNTIMES) + " |")
    print("|---|---:|---:|" + "---:|" * (3 * len(RUNTIMES)))
    for k in models:
        cells = [k, f"{param_count(models[k]):,}", f"{macs['dense'] / macs[k]:.2f}x"]
        for r in RUNTIMES:
            if (k, r) not in lat or ("dense", r) not in lat:
                cells += ["-", "-", "-"]
                continue
            speed = lat["dense", r] / lat[k, r]
            cells += [f"{lat[k, r]:.3f}", f"{speed:.2f}x", f"{speed / (macs['dense'] / macs[k]):.2f}"]
        print("| " + " | ".join(cells) + " |")
    for r in RUNTIMES:
        if ("dense", r) in lat:
            print(f"- dense in {r}: {lat['dense', r]:.3f} ms ({lat['dense', 'eager'] / lat['dense', r]:.2f}x eager's speed)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    small = LatencySettings(batch_size=1, threads=1, warmup=10, repeats=15, isolate=False, max_attempts=1)
    big = LatencySettings(batch_size=1, threads=1, warmup=2, repeats=5, isolate=False, max_attempts=1)
    print(f"torch {torch.__version__}; batch 1, 1 thread; {args.rounds} interleaved rounds; untrained weights")
    torch.manual_seed(0)
    m1d = build_model("mnist1d_cnn", input_shape=(40,), num_classes=10, options={"channels": 128}).eval()
    table("MNIST-1D CNN, 128 channels, input length 40", m1d, (40,), args.rounds, small)
    if not args.skip_resnet:
        torch.manual_seed(0)
        r18 = build_model("resnet18", input_shape=(3, 224, 224), num_classes=1000).eval()
        table("resnet18, 224x224, 1000 classes", r18, (3, 224, 224), args.rounds, big)


if __name__ == "__main__":
    main()
