"""How steady is this machine? One artifact timed again and again in one fresh process.

Loads a trial's checkpoint artifact (the study's runtime) and its real test inputs, then times it
with the trials' own block timing (:func:`automl._latency.time_blocks`, the study's latency
settings, no lock: nothing else of the study runs) back to back for ``--seconds``, and prints each
measurement's median with the process age. On a quiet machine every row reads the same; spells of
a slower value that last longer than one measurement are disturbances from outside the process,
which no estimator inside one measurement can remove.

    python benchmarks/timing_spells.py runs/digits 5 --seconds 4 --runs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402

from automl._artifact import load_artifact  # noqa: E402
from automl._data import dataset_from_config  # noqa: E402
from automl._latency import time_blocks  # noqa: E402
from automl._measure import latency_inputs  # noqa: E402
from automl._study import load_study_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir")
    ap.add_argument("trial", type=int)
    ap.add_argument("--seconds", type=float, default=4.0, help="how long to time, per run")
    ap.add_argument("--runs", type=int, default=1, help="runs in this process, one after another")
    args = ap.parse_args()
    study_dir = Path(args.study_dir)
    cfg = load_study_config(study_dir)
    settings = dataclasses.replace(cfg.latency.settings(), isolate=False)
    data = dataset_from_config(cfg.dataset, download=False)
    inputs = latency_inputs(data, settings, dynamic=False)
    artifact = load_artifact(study_dir / "checkpoints" / f"trial_{args.trial:05d}", runtime=settings.runtime, device=settings.device, threads=settings.threads)
    run = artifact.bind(inputs)
    print(f"trial {args.trial}, runtime {settings.runtime}, batch {settings.batch_size}, {settings.threads} thread(s); torch {torch.__version__}")
    for r in range(args.runs):
        rows: list[tuple[float, float]] = []
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            with artifact.context():
                median, _ = time_blocks(run, settings)
            rows.append((time.perf_counter() - START, median * 1e3))
        values = sorted(v for _, v in rows)
        q = statistics.quantiles(values, n=10)
        print(
            f"run {r + 1}: {len(values)} measurements over {args.seconds:g} s (process age {rows[0][0]:.1f}-{rows[-1][0]:.1f} s): "
            f"min {values[0]:.1f} us, p10 {q[0]:.1f}, median {statistics.median(values):.1f}, p90 {q[-1]:.1f}, max {values[-1]:.1f}; "
            f"max/min {values[-1] / values[0]:.2f}"
        )
        # The sequence, compressed into spells: consecutive measurements within 10 % of each other.
        spells: list[list[float]] = []
        for _, v in rows:
            if spells and abs(v / statistics.median(spells[-1]) - 1) <= 0.1:
                spells[-1].append(v)
            else:
                spells.append([v])
        print("  spells (measurements x median us): " + ", ".join(f"{len(s)}x{statistics.median(s):.0f}" for s in spells[:40]))


if __name__ == "__main__":
    main()
