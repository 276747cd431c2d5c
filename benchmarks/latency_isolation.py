"""Latency of one model measured (a) alone, (b) while another trial trains, (c) with isolation.

(c) is what a trial does: the trainer's steps hold the node's latency lock shared
(``automl._latency.gated_batches``), the measurement takes it exclusively and repeats while the
spread is wide (``stable_latency``). Modes are interleaved round by round in one run, so the
machine's background noise hits all three alike; the table reports medians over rounds.

    python benchmarks/latency_isolation.py --rounds 7

Part 2 (``--study CONFIG``) runs a study and prints each front trial's in-trial latency next to the
drift the end-of-study check measured alone (study attr ``latency_drift``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _trainer(gated: bool, threads: int, lock: str, stop, ready) -> None:
    os.environ["AUTOML_LATENCY_LOCK"] = lock
    torch.set_num_threads(threads)
    from automl import build_model, load_dataset
    from automl._latency import gated_batches
    from automl._train import TrainOptions, fit

    data = load_dataset("digits", seed=0)
    model = build_model("digits_cnn", input_shape=data.input_shape, num_classes=data.num_classes).scaled(width=4.0, depth=1.0)
    feed = gated_batches(data) if gated else data
    fit(model, data, TrainOptions(epochs=1, lr=1e-3, batch_size=64))  # warm: allocator, kernels
    ready.set()
    while not stop.is_set():
        fit(model, feed, TrainOptions(epochs=1, lr=1e-3, batch_size=64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--trainer-threads", type=int, default=1)
    ap.add_argument("--trainers", type=int, default=1, help="concurrent training trials on the node")
    ap.add_argument("--study", type=Path, help="also run this study config and compare front latencies")
    args = ap.parse_args()

    lock = str(Path(tempfile.mkdtemp()) / "latency.lock")
    os.environ["AUTOML_LATENCY_LOCK"] = lock
    torch.set_num_threads(1)
    from automl import build_model
    from automl._artifact import eager_artifact
    from automl._latency import LatencySettings
    from automl._measure import time_artifact

    model = eager_artifact(build_model(args.model, input_shape=(3, 32, 32), num_classes=10).eval())
    x = torch.randn(1, 3, 32, 32)
    plain = LatencySettings(runtime="eager", batch_size=1, threads=1, warmup=10, repeats=30, isolate=False, max_attempts=1)
    isolated = LatencySettings(runtime="eager", batch_size=1, threads=1, warmup=10, repeats=30, isolate=True, max_spread=0.1, max_attempts=3)
    ctx = mp.get_context("spawn")
    rows: dict[str, list[tuple[float, float, float]]] = {"a": [], "b": [], "c": []}
    for _ in range(args.rounds):
        for mode in ("a", "b", "c"):
            stop = ctx.Event()
            procs = []
            if mode != "a":
                for _ in range(args.trainers):
                    ready = ctx.Event()
                    p = ctx.Process(target=_trainer, args=(mode == "c", args.trainer_threads, lock, stop, ready), daemon=True)
                    p.start()
                    procs.append(p)
                    ready.wait(timeout=120)  # imports done, training in full swing
                time.sleep(0.5)
            start = time.perf_counter()
            timing = time_artifact(model, x, isolated if mode == "c" else plain, per_sample=False)
            med, iqr = timing.median_ms, timing.iqr_ms
            took = time.perf_counter() - start
            stop.set()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            rows[mode].append((med, iqr, took))
    if args.rounds <= 0:
        if args.study:
            _study(args.study)
        return
    names = {"a": "(a) alone", "b": "(b) another trial trains", "c": "(c) trains, with isolation"}
    base = statistics.median(r[0] for r in rows["a"])
    print(f"model {args.model}, batch 1, 1 thread; {args.trainers} trainer(s) x {args.trainer_threads} thread(s); {args.rounds} rounds, cpu count {os.cpu_count()}")
    print("| mode | median latency (ms) | vs alone | median IQR/median | worst round (ms) | wall per measurement (s) |")
    print("|---|---|---|---|---|---|")
    for m in ("a", "b", "c"):
        med = statistics.median(r[0] for r in rows[m])
        spread = statistics.median(r[1] / r[0] for r in rows[m])
        worst = max(r[0] for r in rows[m])
        took = statistics.median(r[2] for r in rows[m])
        print(f"| {names[m]} | {med:.3f} | {med / base:.2f}x | {spread:.3f} | {worst:.3f} | {took:.2f} |")

    if args.study:
        _study(args.study)


def _study(config: Path) -> None:
    import optuna

    from automl._config import load_config
    from automl._search import run_search

    cfg = load_config(config)
    study = run_search(cfg, log=lambda m: None)
    drift = study.user_attrs.get("latency_drift") or {}
    objectives = study.user_attrs.get("objectives")
    k = objectives.index("latency_ms")
    print(f"\nstudy {cfg.name}: {cfg.budget.trials} trials, {cfg.resources.max_concurrent or 'max'} concurrent")
    print("| trial | method | in-trial latency (ms) | in-trial IQR (ms) | re-timed alone (ms) | in-trial / alone |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for t in sorted(study.best_trials, key=lambda t: t.number):
        d = drift.get(str(t.number))
        if d is None or t.state != optuna.trial.TrialState.COMPLETE:
            continue
        alone = t.values[k] * (1 + d)
        ratios.append(t.values[k] / alone)
        print(f"| {t.number} | {t.user_attrs.get('method')} | {t.values[k]:.3f} | {t.user_attrs.get('latency_iqr_ms', float('nan')):.3f} | {alone:.3f} | {t.values[k] / alone:.2f} |")
    if ratios:
        print(f"median in-trial / alone: {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
