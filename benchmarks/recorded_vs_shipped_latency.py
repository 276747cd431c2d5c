"""Does a study's recorded latency predict the latency of what export ships?

For a finished study (e.g. the default one, ``automl launch studies/digits.yaml``):

1. every COMPLETE trial's checkpoint artifact (the study's runtime: ``model.onnx`` through ONNX
   Runtime by default) is re-timed in a fresh Python process that does nothing else
   (``python -m automl._measure latency``: the function trials use, the study's settings, the same
   real test inputs), in three whole passes; the Spearman rank correlation of recorded vs re-timed
   latency (median of the passes) over all trials, the median |re-timed / recorded - 1|, and the
   Spearman correlation of one fresh pass with another: the ceiling that timing noise puts on any
   such correlation for this study's models;
2. three front trials (the fastest, the knee and the most accurate) are exported with
   ``automl export`` and the card's fresh-process latency of the exported file is compared with the
   trial's recorded value.

    python benchmarks/recorded_vs_shipped_latency.py runs/digits

Prints markdown (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from automl._data import dataset_from_config
from automl._measure import latency_inputs
from automl._pareto import knee_point, load_view
from automl._study import load_study_config, open_storage

#: Fresh-process passes over every trial: their agreement with each other is the noise ceiling.
PASSES = 3


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (average ranks for ties)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def fresh(folder: Path, inputs: Path, settings: dict, per_sample: bool) -> float:
    cmd = [sys.executable, "-m", "automl._measure", "latency", str(folder), "--inputs", str(inputs), "--settings", json.dumps(settings)]
    if per_sample:
        cmd.append("--per-sample")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["latency_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", nargs="?", default="runs/digits", help="a finished study's folder (default runs/digits)")
    study_dir = Path(ap.parse_args().study_dir)
    cfg = load_study_config(study_dir)
    study = optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.storage_url))
    view = load_view(study)
    settings = cfg.latency.settings()
    data = dataset_from_config(cfg.dataset, download=False)
    print(f"study {cfg.name}: {len(view.trials)} complete trials; runtime {settings.runtime}, batch {settings.batch_size}, {settings.threads} thread(s)\n")

    rows = sorted(view.trials, key=lambda r: r.number)
    recorded = [r.metrics["latency_ms"] for r in rows]
    passes: list[list[float]] = [[] for _ in range(PASSES)]
    with tempfile.TemporaryDirectory() as tmp:
        for per_sample in (False, True):
            torch.save(latency_inputs(data, settings, dynamic=per_sample), Path(tmp) / f"inputs_{per_sample}.pt")
        t0 = time.perf_counter()
        for k in range(PASSES):  # whole passes one after the other: a slow spell hits one pass, not one trial's pair
            for row in rows:
                folder = study_dir / row.checkpoint
                per_sample = bool(json.loads((folder / "trial.json").read_text()).get("per_sample"))
                passes[k].append(fresh(folder, Path(tmp) / f"inputs_{per_sample}.pt", dataclasses.asdict(settings), per_sample))
        took = time.perf_counter() - t0
    retimed = [statistics.median(v) for v in zip(*passes)]
    rel = [abs(b / a - 1) for a, b in zip(recorded, retimed)]
    print(f"re-timed {len(recorded)} trials in fresh processes, {PASSES} passes ({took:.0f} s); recorded range {min(recorded):.4f}-{max(recorded):.4f} ms")
    print(f"- Spearman(recorded, re-timed median) = {spearman(recorded, retimed):.3f}")
    print(f"- Spearman(recorded, re-timed min of the passes) = {spearman(recorded, [min(v) for v in zip(*passes)]):.3f} (disturbances only add time)")
    print(f"- Spearman(recorded, re-timed pass k) = {', '.join(f'{spearman(recorded, v):.3f}' for v in passes)}")
    print(f"- noise ceiling, Spearman(fresh pass 1, fresh pass 2) = {spearman(passes[0], passes[1]):.3f}")
    print(f"- median |re-timed / recorded - 1| = {statistics.median(rel):.3f}; max {max(rel):.3f}\n")
    print("| trial | method | recorded ms | " + " | ".join(f"fresh pass {k + 1} ms" for k in range(PASSES)) + " |")
    print("|---:|---|---:|" + "---:|" * PASSES)
    for row, rec, *fr in zip(rows, recorded, *passes):
        print(f"| {row.number} | {row.method} | {rec:.4f} | " + " | ".join(f"{v:.4f}" for v in fr) + " |")
    print()

    front = list(view.front)
    picks = {
        "fastest": min(front, key=lambda r: r.metrics["latency_ms"]),
        "knee": next(r for r in front if r.number == knee_point(front, view)),
        "most accurate": max(front, key=lambda r: (r.metrics["accuracy"], -r.number)),
    }
    out_root = Path(tempfile.mkdtemp(prefix="recorded_vs_shipped_"))
    print("| pick | trial | method | recorded latency ms | exported, fresh process ms | fresh / recorded |")
    print("|---|---:|---|---:|---:|---:|")
    ratios = []
    try:
        for name, row in picks.items():
            out = out_root / f"trial_{row.number}"
            if not out.exists():
                subprocess.run([sys.executable, "-m", "automl._cli", "export", str(study_dir), "--trial", str(row.number), "--out", str(out)], check=True, capture_output=True)
            card = json.loads((out / "card.json").read_text())
            got = card["metrics"]["exported"]["latency_ms"]
            ratios.append(got / row.metrics["latency_ms"])
            print(f"| {name} | {row.number} | {row.method} | {row.metrics['latency_ms']:.4f} | {got:.4f} | {got / row.metrics['latency_ms']:.3f} |")
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    print(f"\nmedian fresh / recorded over the three: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
