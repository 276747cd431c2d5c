"""Print a finished study's trials and Pareto front against its base, as markdown (issue 3 report).

    python benchmarks/study_front.py runs/mnist1d
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mnist1d")
    base = json.loads((folder / "base" / "base.json").read_text())["metrics"]
    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{(folder / 'optuna.db').resolve()}")
    front = {t.number for t in study.best_trials}
    print(f"base: accuracy {base['accuracy']:.4f}, {base['params']:,} params, {base['macs']:,} MACs, latency {base['latency_ms']:.3f} ms\n")
    print("| trial | front | method | settings | params | params ratio | MACs | test acc | drop (points) | latency ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in sorted(study.trials, key=lambda t: (t.values or [0, 1e12])[1]):
        if t.state != optuna.trial.TrialState.COMPLETE:
            print(f"| {t.number} | | {t.user_attrs.get('method', '?')} | {t.state.name}: {t.user_attrs.get('fail_reason', '')} | | | | | | |")
            continue
        acc, params, lat = t.values
        method = t.user_attrs.get("method", "?")
        settings = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in t.params.items() if k not in ("method",)}
        macs = t.user_attrs.get("macs")
        print(
            f"| {t.number} | {'*' if t.number in front else ''} | {method} | {settings} | {int(params):,} | "
            f"{base['params'] / params:.1f}x | {macs if macs is None else f'{macs:,}'} | {acc:.4f} | "
            f"{100 * (base['accuracy'] - acc):+.1f} | {lat:.3f} |"
        )


if __name__ == "__main__":
    main()
