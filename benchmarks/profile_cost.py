"""What the sensitivity profile costs against one trial of the same study.

Reads a finished study folder (its ``config.yaml``, the trained base in ``base/weights.pt`` and its
COMPLETE trials) and measures the profile of the study's profiled methods on that base, in this
process, with the study's trial thread count:

- ``whole, no stored activations``: one part, every copy run from the input (each compressed copy
  evaluated by a whole forward pass);
- ``whole``: one part, each copy run from the base's stored activation at its first changed block;
- ``part i/n``: each of the ``n`` parts a study with ``n`` trial slots runs at once (one Ray task
  each); the study waits for the slowest.

It checks that all three give the same table, and prints each wall time beside the median wall time
of the study's trials (start to end, as Optuna recorded them). The study's own ``profile.json``
records the wall time the study spent (Ray tasks included). ``--breakdown`` runs the ``whole``
profile under ``cProfile`` instead and prints where its time goes: compressing (per method),
counting MACs, evaluating.

    PYTHONPATH=. python benchmarks/profile_cost.py --study runs/r18_64
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import optuna
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--study", required=True, help="a finished study folder (config.yaml, base/weights.pt, optuna.db)")
    ap.add_argument("--parts", type=int, default=2, help="parts of the split profile (a study's trial slots; default: %(default)s)")
    ap.add_argument("--breakdown", action="store_true", help="time the whole profile's steps under cProfile instead")
    args = ap.parse_args()

    from automl._config import ConfigError, load_config
    from automl._data import dataset_from_config
    from automl._sensitivity import compute_profile, merge_parts, profiled_methods
    from automl._study import _build_base
    from automl._threads import set_threads, training_threads
    import automl._sensitivity as sensitivity

    study_dir = Path(args.study)
    try:
        cfg = load_config(study_dir / "config.yaml")
    except (ConfigError, OSError) as exc:
        ap.error(f"--study: {exc}")
    threads = set_threads(training_threads(cfg.resources.cpus))
    data = dataset_from_config(cfg.dataset)
    base = _build_base(cfg, data)
    base.load_state_dict(torch.load(study_dir / "base" / "weights.pt", map_location="cpu", weights_only=True))
    methods = profiled_methods(cfg.method_instances())
    if not methods:
        ap.error(f"--study: the config of {study_dir} searches no setting that reads the profile")
    run = dict(base=base, data=data, methods=methods, batch_size=cfg.budget.batch_size, seed=cfg.seed)

    def timed(**kw):
        start = time.perf_counter()
        profile = compute_profile(**run, **kw)
        return profile, time.perf_counter() - start

    if args.breakdown:
        breakdown(run)
        return
    budget = sensitivity.CACHE_BYTES
    sensitivity.CACHE_BYTES = 0
    plain, plain_s = timed()
    sensitivity.CACHE_BYTES = budget
    stored, stored_s = timed()
    parts = [timed(part=i, parts=args.parts) for i in range(args.parts)]
    merged = merge_parts([p for p, _ in parts], seconds=max(s for _, s in parts))
    same = plain.layers == stored.layers == merged.layers
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    trials = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])]
    trial_s = statistics.median(trials) if trials else float("nan")
    layers = ", ".join(f"{m} {len(rows)} layers" for m, rows in plain.layers.items())
    print(f"{cfg.name}: {layers}, {plain.samples} validation samples, {threads} thread(s); same table every way: {same}")
    print(f"median trial: {trial_s:.1f} s over {len(trials)} COMPLETE trials")
    print()
    print("| profile | wall time (s) | x one trial |")
    print("|---|---:|---:|")
    for label, seconds in [("whole, no stored activations", plain_s), ("whole", stored_s), *[(f"part {i + 1}/{args.parts}", s) for i, (_, s) in enumerate(parts)]]:
        print(f"| {label} | {seconds:.1f} | {seconds / trial_s:.2f} |")
    if not same:
        raise SystemExit("the profile differs between the ways it was measured")


def breakdown(run: dict) -> None:
    """The whole profile under cProfile: cumulative seconds of each step."""
    import cProfile
    import pstats

    from automl._sensitivity import compute_profile

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(compute_profile, **run)
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, _, own, cumulative, _)
    steps = {f"compress ({m})": (f"{type(method).__module__.replace('.', '/')}.py", "compress_layer") for m, method in run["methods"].items()}
    steps |= {"count MACs": ("automl/_measure.py", "count_macs"), "evaluate": ("automl/_sensitivity.py", "accuracy")}
    print(f"whole profile under cProfile: {total:.1f} s")
    print()
    print("| step | calls | seconds | share |")
    print("|---|---:|---:|---:|")
    for label, (file, function) in steps.items():
        hits = [v for (f, _, fn), v in stats.items() if f.endswith(file) and fn == function]
        calls, seconds = sum(h[0] for h in hits), sum(h[3] for h in hits)
        print(f"| {label} | {calls} | {seconds:.1f} | {seconds / total:.0%} |")


if __name__ == "__main__":
    main()
