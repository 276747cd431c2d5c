"""How the report scales with the number of trials, and why hypervolume history keeps a running front.

Builds real in-memory Optuna studies of N finished trials (3 objectives: accuracy max, size and
latency min, values drawn on a noisy trade-off curve like a search produces) and times, in one run:

- ``load_view`` (read the study), ``build_report`` (every table and figure record),
  ``render_html`` (plotly, JS inlined) and the page size;
- hypervolume history the naive way (WFG over all trials so far, at every trial) against
  :func:`automl._pareto.hypervolume_history` (WFG over the running non-dominated set only),
  checking both give the same numbers.

Usage: python benchmarks/report_scale.py [--sizes 100 1000 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import optuna

from automl._pareto import _objective_values, hypervolume, hypervolume_history, load_view, normalise
from automl._report import build_report, render_html

BASE = {"accuracy": 0.98, "size_bytes": 250_000, "latency_ms": 0.5, "macs": 1_200_000, "params": 60_000}


def make_study(n: int, seed: int = 0) -> optuna.Study:
    rng = np.random.default_rng(seed)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("base", BASE)
    study.set_user_attr("objectives", ["accuracy", "size_bytes", "latency_ms"])
    dist = {"method": optuna.distributions.CategoricalDistribution(["none", "tucker", "wsnet", "prune"])}
    trials = []
    for i in range(n):
        keep = rng.uniform(0.02, 1.0)  # fraction of the base's size kept
        acc = BASE["accuracy"] - 0.3 * (1 - keep) ** 3 - abs(rng.normal(0, 0.02))
        size = BASE["size_bytes"] * keep * rng.uniform(0.9, 1.1)
        lat = BASE["latency_ms"] * (0.3 + 0.7 * keep) * rng.uniform(0.7, 1.5)
        method = ["none", "tucker", "wsnet", "prune"][i % 4]
        trials.append(
            optuna.trial.create_trial(
                values=[acc, size, lat], params={"method": method}, distributions=dist,
                user_attrs={"method": method, "accuracy": acc, "size_bytes": size, "latency_ms": lat, "macs": int(BASE["macs"] * keep), "params": int(BASE["params"] * keep), "checkpoint": f"checkpoints/trial_{i:05d}"},
            )
        )
    study.add_trials(trials)
    return study


def naive_history(view) -> list[float]:
    rows = sorted(view.trials, key=lambda r: r.number)
    pts, ref = normalise(_objective_values(rows, view.objectives), view.objectives, view.directions, view.base)
    return [hypervolume(pts[: i + 1], ref) for i in range(len(rows))]


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-max", type=int, default=1000, help="largest N to run the naive history on")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("| trials | front | load_view s | build_report s | render_html s | HTML MB | HV history (running front) s | HV history (naive) s | naive / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        study = make_study(n)
        view, t_view = timed(lambda: load_view(study), args.repeats)
        data, t_build = timed(lambda: build_report(view), args.repeats)
        page, t_render = timed(lambda: render_html(data), args.repeats)
        ours, t_ours = timed(lambda: hypervolume_history(view), args.repeats)
        if n <= args.naive_max:
            naive, t_naive = timed(lambda: naive_history(view), 1)
            assert np.allclose([v for _, v in ours], naive, rtol=1e-9), "running-front history differs from the naive one"
            naive_cells = f"{t_naive:.3f} | {t_naive / t_ours:.0f}x"
        else:
            naive_cells = "- | -"
        print(f"| {n} | {len(view.front)} | {t_view:.3f} | {t_build:.3f} | {t_render:.3f} | {len(page) / 1e6:.2f} | {t_ours:.3f} | {naive_cells} |")


if __name__ == "__main__":
    main()
