"""Base-training throughput idle and beside one busy process, with the study's thread plan.

Trains a study's base model (default: the default study, studies/digits.yaml) the way the launcher
does (``automl._study.base_train_options``, ``automl._train.fit``, after ``ThreadPlan.apply``) and
reads the images per second the base's progress lines print (one per epoch; the first epoch of each
measurement is left out as warm-up). Each round measures it idle and beside a plain Python busy
loop in another process, in alternating order; the summary gives the medians over rounds and the
ratio loaded / idle. On 2 cores, a base that trains with the study's threads loses at most the
core the busy process takes (ratio >= 0.45 is the target); ``--torch-default`` trains with
PyTorch's default thread count (one per core) instead, for comparison.

``--busy N`` runs N busy processes instead of one. ``--ray-worker-niceness K`` trains in a task of a
local Ray whose workers run at niceness K, as trials do: 15 is Ray's own default, the launcher's
niceness (0) what a study's Ray gives them (:func:`automl._threads.ray_system_config`). With as many
busy processes as cores, a fair share is cores / (cores + 1) of one core.

    PYTHONPATH=. python benchmarks/base_training_under_load.py --rounds 5 --epochs 6
    PYTHONPATH=. python benchmarks/base_training_under_load.py --rounds 3 --busy 2 --ray-worker-niceness 15
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from automl import load_config
from automl._data import dataset_from_config
from automl._study import _build_base, base_train_options
from automl._threads import ThreadPlan
from automl._train import fit

#: PyTorch's own default in this process, before any plan is applied.
TORCH_DEFAULT = torch.get_num_threads()
BUSY_LOOP = "while True:\n    pass\n"


def measure(cfg, data, epochs: int) -> float:
    """Median images/s over the epochs after the first of one fresh base training."""
    model = _build_base(cfg, data)
    options = dataclasses.replace(base_train_options(cfg), epochs=epochs)
    seen: list[float] = []
    fit(model, data, options, progress=lambda s: seen.append(s.images_per_s))
    return statistics.median(seen[1:] if len(seen) > 1 else seen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--config", type=Path, default=Path("studies/digits.yaml"), help="study config whose base is trained (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="idle + loaded pairs (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per measurement, the first one left out (default: %(default)s)")
    ap.add_argument("--busy", type=int, default=1, help="busy processes beside the loaded measurement (default: %(default)s)")
    ap.add_argument("--ray-worker-niceness", type=int, default=None, help="train in a Ray task of a local Ray whose workers run at this niceness (default: in this process)")
    ap.add_argument("--torch-default", action="store_true", help=f"train with PyTorch's default thread count ({TORCH_DEFAULT} here) instead of the plan")
    args = ap.parse_args()
    if args.rounds < 1 or args.epochs < 2:
        ap.error("--rounds must be >= 1 and --epochs >= 2 (the first epoch is warm-up)")

    cfg = load_config(args.config)
    plan = ThreadPlan.from_config(cfg)
    if args.torch_default:
        torch.set_num_threads(TORCH_DEFAULT)
    else:
        plan.apply()
    data = dataset_from_config(cfg.dataset)
    print(f"{cfg.name}: base {cfg.base.model} on {data.describe()}; torch threads {torch.get_num_threads()} "
          f"({'PyTorch default' if args.torch_default else plan.describe()}); {args.rounds} rounds x {args.epochs} epochs", flush=True)
    run = measure
    if args.ray_worker_niceness is not None:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 _system_config={"worker_niceness": args.ray_worker_niceness})
        threads = torch.get_num_threads()

        @ray.remote(num_cpus=1)
        def in_ray(cfg, data, epochs):
            torch.set_num_threads(threads)
            return measure(cfg, data, epochs), os.nice(0)

        worker = ray.remote(num_cpus=0)(lambda: os.nice(0))
        print(f"training in a Ray task at niceness {ray.get(worker.remote())}", flush=True)

        def run(cfg, data, epochs):
            return ray.get(in_ray.remote(cfg, data, epochs))[0]

    run(cfg, data, 2)  # warm-up: allocator, kernels, caches
    idle: list[float] = []
    loaded: list[float] = []
    for r in range(args.rounds):
        order = ("idle", "loaded") if r % 2 == 0 else ("loaded", "idle")
        for what in order:
            if what == "idle":
                idle.append(run(cfg, data, args.epochs))
                continue
            busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
            try:
                time.sleep(0.5)  # the loops are running before training starts
                loaded.append(run(cfg, data, args.epochs))
            finally:
                for b in busy:
                    b.kill()
                    b.wait()
        print(f"round {r + 1}: idle {idle[-1]:,.0f} images/s, beside {args.busy} busy process(es) {loaded[-1]:,.0f} images/s ({loaded[-1] / idle[-1]:.2f}x)", flush=True)
    mi, ml = statistics.median(idle), statistics.median(loaded)
    print(f"median: idle {mi:,.0f} images/s, beside {args.busy} busy process(es) {ml:,.0f} images/s, ratio {ml / mi:.2f}")
    print(json.dumps({"config": str(args.config), "torch_threads": torch.get_num_threads(), "busy": args.busy, "ray_worker_niceness": args.ray_worker_niceness,
                      "rounds": args.rounds, "epochs": args.epochs,
                      "idle": [round(v) for v in idle], "loaded": [round(v) for v in loaded], "median_idle": round(mi), "median_loaded": round(ml),
                      "ratio": round(ml / mi, 3)}))


if __name__ == "__main__":
    main()
