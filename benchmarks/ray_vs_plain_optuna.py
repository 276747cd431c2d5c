"""Ray Tune study vs a plain sequential Optuna loop running the same trial function.

Both run N trials of the same plan distribution on the same data and base model; the plain loop
calls automl._trial.run_trial in-process, one after another, with one thread (what one Ray trial
gets), so the ratio shows what Ray's parallel trials (and its overhead) buy on this machine.

    python benchmarks/ray_vs_plain_optuna.py --trials 24 --epochs 55
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from pathlib import Path

import optuna
import torch

from automl import parse_config, run_search
from automl._study import make_sampler, objective_values, prepare_study
from automl._trial import run_trial


def config(out: str, name: str, trials: int, epochs: int):
    return parse_config(
        {
            "name": name,
            "dataset": {"name": "digits"},
            "base": {"model": "digits_cnn", "epochs": 30},
            "methods": {"none": {}, "tucker": {}},
            "budget": {"trials": trials, "epochs": epochs},
            "sampler": {"name": "random", "seed": 0},
            "resources": {"cpus": 1},
            "output_dir": out,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="ray_vs_plain_optuna_")
    try:
        # Plain loop first: same data, base and trial function; one thread like one Ray trial.
        cfg = config(out, "plain", args.trials, args.epochs)
        _, payload, space = prepare_study(cfg, log=lambda _: None)
        torch.set_num_threads(1)
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=make_sampler(cfg))
        seconds: list[float] = []

        def objective(trial: optuna.Trial):
            with tempfile.TemporaryDirectory() as work:
                outcome = run_trial(space.sample(trial), payload.base, payload.data, payload.settings, folder=Path(work), methods=payload.methods)
            seconds.append(outcome.seconds)
            return objective_values(cfg, outcome.metrics.as_dict())

        t0 = time.perf_counter()
        study.optimize(objective, n_trials=args.trials)
        plain = time.perf_counter() - t0

        torch.set_num_threads(os.cpu_count() or 1)
        cfg_ray = config(out, "ray", args.trials, args.epochs)
        prepare_study(cfg_ray, log=lambda _: None)  # base trained before timing, as in the plain loop
        t0 = time.perf_counter()
        ray_study = run_search(cfg_ray, log=lambda _: None)
        ray_wall = time.perf_counter() - t0
        ray_seconds = [t.user_attrs.get("seconds") for t in ray_study.trials if t.user_attrs.get("seconds")]
        print(
            json.dumps(
                {
                    "trials": args.trials,
                    "median_trial_s_plain": round(statistics.median(seconds), 2),
                    "median_trial_s_ray": round(statistics.median(ray_seconds), 2),
                    "plain_loop_wall_s": round(plain, 1),
                    "ray_study_wall_s": round(ray_wall, 1),
                    "ratio_ray_over_plain": round(ray_wall / plain, 3),
                    "ray_trials_per_min": round(args.trials / ray_wall * 60, 1),
                    "plain_trials_per_min": round(args.trials / plain * 60, 1),
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
