"""Does finalize close the gap to the base? The front's most compressed models, finalized.

For a finished study (e.g. ``automl launch studies/mnist1d.yaml``): the front's three most
compressed models (fewest ``params``) whose test accuracy is within ``--within`` points of the
base model's, each finalized with ``automl finalize STUDY --trial N`` (the CLI, its defaults unless
``--epochs``/``--lr``), then the accuracy after search against after finalize, both the measured
artifact's test accuracy recorded in the study. The front is the one ``automl show`` prints
(:func:`automl._pareto.load_view`), search trials only.

    automl launch studies/mnist1d.yaml
    python benchmarks/finalize_front.py runs/mnist1d

Prints markdown (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import optuna

from automl._pareto import load_view
from automl._study import load_study_config, open_storage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir")
    ap.add_argument("--within", type=float, default=1.0, help="accuracy points below the base a model may be (default 1)")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--below-base", action="store_true", help="only models less accurate than the base (a gap to close)")
    ap.add_argument("--epochs", type=int, default=None, help="finalize --epochs (default: the CLI's)")
    ap.add_argument("--lr", type=float, default=None)
    args = ap.parse_args()
    cfg = load_study_config(args.study_dir)
    storage = open_storage(cfg.storage_url)
    view = load_view(optuna.load_study(study_name=cfg.name, storage=storage))
    base = view.base
    base_acc, base_params = float(base["accuracy"]), base.get("params")
    # Search trials only; a repeat (duplicate_of) is its first trial's model, finalized once.
    front = [r for r in view.front if r.finalized_from is None and "duplicate_of" not in r.attrs and r.metrics.get("accuracy") is not None]
    floor = base_acc - args.within / 100 - 1e-9  # inclusive: 0.954 is within 1 point of 0.964
    near = [r for r in front if r.metrics["accuracy"] >= floor and not (args.below_base and r.metrics["accuracy"] >= base_acc)]
    chosen = sorted(near, key=lambda r: (r.metrics.get("params") or float("inf"), r.number))[: args.count]
    which = "below the base and " if args.below_base else ""
    print(f"study {cfg.name}: {len(view.trials)} finished trials, front {len(front)}, {which}within {args.within:g} pt of the base ({base_acc:.4f}): {len(near)}; finalizing {len(chosen)}")
    print()
    print("| trial | method | params (x fewer) | base acc | after search | after finalize | gap before (pt) | gap after (pt) | kept epoch / ran | finalize s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    closures = []
    for row in chosen:
        cmd = [sys.executable, "-m", "automl._cli", "finalize", args.study_dir, "--trial", str(row.number)]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        if args.lr:
            cmd += ["--lr", str(args.lr)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"| {row.number} | {row.method} | finalize failed ({proc.returncode}): {proc.stderr.strip()[-200:]} |")
            continue
        study = optuna.load_study(study_name=cfg.name, storage=storage)
        done = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("finalized_from") == row.number]
        new = max(done, key=lambda t: t.number)
        acc_after = new.values[list(view.objectives).index("accuracy")]
        info = new.user_attrs.get("finalize", {})
        before, after = (base_acc - row.metrics["accuracy"]) * 100, (base_acc - acc_after) * 100
        if before > 0:
            closures.append((before - after) / before)
        params = int(row.metrics["params"]) if row.metrics.get("params") is not None else None
        fewer = f" ({base_params / params:.1f}x)" if params and base_params else ""
        curve = info.get("val_accuracy") or info.get("curve") or []
        print(
            f"| {row.number} | {row.method} | {params:,}{fewer} | {base_acc:.4f} | {row.metrics['accuracy']:.4f} | {acc_after:.4f} | "
            f"{before:+.2f} | {after:+.2f} | {info.get('kept_epoch', '?')} / {len(curve) if curve else info.get('epochs_run', '?')} | {wall:.0f} |"
        )
    print()
    if closures:
        print(f"Median share of the gap to the base closed by finalize: {statistics.median(closures):.0%} (over {len(closures)} models below the base after search).")


if __name__ == "__main__":
    main()
