"""The best dynamic model of each method within the study's accuracy margin, re-timed beside the base.

For a finished study with ``exits`` and/or ``glance`` trials (e.g. ``studies/dynamic_images.yaml``):
per method, the trial (a calibrated operating point included) with the lowest recorded mean latency
among those within ``review.max_drop`` of the base's accuracy. Its shipped ONNX artifact and the
base's are then timed again per sample on the study's first ``latency.max_samples`` test images
(ONNX Runtime, the study's threads, batch 1), interleaved over ``--rounds`` rounds, so the ratios
compare numbers measured under the same load: mean, p50 and p90 of the per-sample latency (median
over rounds), expected MACs (the exit fractions times each exit's MACs, as the study records them)
and the exit fractions with each exit's accuracy.

Then the per-exit cost breakdown: each chosen artifact with its thresholds set so that every sample
leaves at exit k (the ONNX initializer ``thresholds`` edited, nothing re-exported), timed the same
way: what a sample leaving there costs against the base, beside the MACs it runs.

    python benchmarks/dynamic_front.py runs/dynamic_images --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import optuna

from automl._pareto import load_view
from automl._study import load_study_config, open_storage

METHODS = ("exits", "glance")
#: Above any softmax probability: nobody leaves at an exit with this threshold.
NEVER = 2.0


def _best(view, method: str, base_acc: float, max_drop: float):
    rows = [
        r for r in view.trials
        if r.method == method and r.metrics.get("accuracy") is not None and r.metrics.get("latency_ms")
        and base_acc - r.metrics["accuracy"] <= max_drop + 1e-12 and r.checkpoint and r.attrs.get("exit_fractions")
    ]
    return min(rows, key=lambda r: r.metrics["latency_ms"]) if rows else None


def _with_thresholds(src: Path, dst: Path, leave_at: int) -> None:
    """``src`` with its ``thresholds`` initializer set so that every sample leaves at exit ``leave_at``."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    (init,) = [i for i in model.graph.initializer if i.name.rsplit(".", 1)[-1] == "thresholds"]
    values = numpy_helper.to_array(init).copy()
    values[:] = NEVER
    values[leave_at:] = -np.inf
    init.CopyFrom(numpy_helper.from_array(values.astype(np.float32), init.name))
    onnx.save(model, str(dst))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", help="a finished study's folder, e.g. runs/dynamic_images")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians are reported)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-exit cost breakdown")
    ap.add_argument("--max-drop", type=float, default=None, help="accuracy margin below the base (a fraction; default the study's review.max_drop)")
    args = ap.parse_args()

    import torch

    from automl._artifact import _onnx_artifact, build_artifact
    from automl._data import dataset_from_config
    from automl._latency import LatencySettings
    from automl._study import _build_base
    from automl._target import time_artifact

    study_dir = Path(args.study_dir)
    cfg = load_study_config(study_dir)
    view = load_view(optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.storage_url)))
    base = view.base
    base_acc = float(base["accuracy"])
    max_drop = cfg.review.max_drop if args.max_drop is None else args.max_drop
    chosen = {m: _best(view, m, base_acc, max_drop) for m in METHODS}
    lat = cfg.latency
    settings = LatencySettings(batch_size=1, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats, isolate=False, min_attempts=1, max_attempts=1)
    data = dataset_from_config(cfg.dataset, download=False)
    inputs = torch.cat([x for x, _ in data.batches("test", 500)])[: lat.max_samples]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_model = _build_base(cfg, data)
        base_model.load_state_dict(torch.load(study_dir / "base" / "weights.pt", map_location="cpu", weights_only=True))
        arts = {"base": build_artifact(base_model.eval(), inputs[:1], tmp / "base", threads=lat.threads)}
        for method, row in chosen.items():
            if row is None:
                continue
            path = study_dir / row.checkpoint / "model.onnx"
            arts[method] = _onnx_artifact(path, "cpu", lat.threads)
            if not args.no_breakdown:
                for k in range(len(row.attrs["exit_fractions"])):
                    copy = tmp / f"{method}-exit{k}.onnx"
                    _with_thresholds(path, copy, k)
                    arts[f"{method} exit {k}"] = _onnx_artifact(copy, "cpu", lat.threads)
        got: dict[str, list[tuple[float, float, float]]] = {n: [] for n in arts}
        for r in range(args.rounds):
            for name in (list(arts) if r % 2 == 0 else list(arts)[::-1]):
                t = time_artifact(arts[name], inputs, settings, per_sample=True)
                got[name].append((t.median_ms, t.p50_ms, t.p90_ms))
    med = {n: tuple(statistics.median(v[i] for v in got[n]) for i in range(3)) for n in got}

    b_mean, b_p50, b_p90 = med["base"]
    print(
        f"study {cfg.name}: base {cfg.base.model}, test accuracy {base_acc:.4f}, {base.get('macs', 0) / 1e6:.1f} M MACs; "
        f"recorded latency {base['latency_ms']:.3f} ms; re-timed per sample on {len(inputs)} test images, "
        f"{args.rounds} interleaved rounds: mean {b_mean:.3f} ms, p50 {b_p50:.3f}, p90 {b_p90:.3f} (ONNX Runtime, {lat.threads} thread, batch 1)\n"
    )
    print("| method | trial | settings | test acc (drop, points) | mean ms | base / mean | p90 ms | base p90 / p90 | expected MACs / base | exit fractions | accuracy per exit | recorded mean ms (base / it) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---|---|---|")
    for method, row in chosen.items():
        if row is None:
            print(f"| {method} | - | no trial within {100 * max_drop:g} points of the base | | | | | | | | | |")
            continue
        m = row.metrics
        mean, _, p90 = med[method]
        settings_text = ", ".join(f"{k.split('.', 1)[-1]}={round(v, 3) if isinstance(v, float) else v}" for k, v in row.params.items() if k.startswith(method + "."))
        fr = "/".join(f"{f:.2f}" for f in row.attrs["exit_fractions"])
        acc = "/".join("-" if a is None else f"{a:.2f}" for a in row.attrs.get("exit_accuracy") or [])
        rec = m["latency_ms"]
        print(
            f"| {method} | {row.number} | {settings_text} | {m['accuracy']:.4f} ({100 * (m['accuracy'] - base_acc):+.1f}) | {mean:.3f} | {b_mean / mean:.2f}x | "
            f"{p90:.3f} | {b_p90 / p90:.2f}x | {m['macs'] / base['macs']:.2f} | {fr} | {acc} | {rec:.3f} ({base['latency_ms'] / rec:.2f}x) |"
        )
    if args.no_breakdown:
        return
    print("\nPer-exit cost: every sample made to leave at exit k (thresholds edited in the shipped file), timed the same way\n")
    print("| method | exit | share of test samples leaving there | mean ms | / base mean | MACs of the path | / base MACs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, row in chosen.items():
        if row is None:
            continue
        for k, (f, macs) in enumerate(zip(row.attrs["exit_fractions"], row.attrs.get("exit_macs") or [])):
            mean = med[f"{method} exit {k}"][0]
            print(f"| {method} | {k} | {f:.2f} | {mean:.3f} | {mean / b_mean:.2f} | {(macs or 0) / 1e6:.1f} M | {(macs or 0) / base['macs']:.2f} |")


if __name__ == "__main__":
    main()
