"""Print a finished study's trials and Pareto front against its base, as markdown.

One row per finished trial, fewest parameters first: method, settings, parameters and their ratio to
the base, MACs, test accuracy, its drop from the base in points, and latency; ``*`` marks the trials
on the front ``automl show`` prints (:func:`automl._pareto.load_view`).

    python benchmarks/study_front.py runs/mnist1d
"""

from __future__ import annotations

import argparse

import optuna

from automl._pareto import load_view
from automl._study import load_study_config, open_storage


def _n(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", help="a finished study's folder, e.g. runs/mnist1d")
    args = ap.parse_args()
    cfg = load_study_config(args.study_dir)
    view = load_view(optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.storage_url)))
    base = view.base
    front = {r.number for r in view.front}
    print(
        f"base: accuracy {_n(base.get('accuracy'), '.4f')}, {_n(base.get('params'), ',')} params, "
        f"{_n(base.get('macs'), ',')} MACs, latency {_n(base.get('latency_ms'), '.3f')} ms\n"
    )
    print("| trial | front | method | settings | params | params ratio | MACs | test acc | drop (points) | latency ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(view.trials, key=lambda r: (r.metrics.get("params") or 0, r.number)):
        m = r.metrics
        settings = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.params.items() if k != "method"}
        ratio = f"{base['params'] / m['params']:.1f}x" if base.get("params") and m.get("params") else "-"
        drop = f"{100 * (base['accuracy'] - m['accuracy']):+.1f}" if base.get("accuracy") is not None and m.get("accuracy") is not None else "-"
        params = _n(int(m["params"]) if m.get("params") is not None else None, ",")
        macs = _n(int(m["macs"]) if m.get("macs") is not None else None, ",")
        print(
            f"| {r.number} | {'*' if r.number in front else ''} | {r.method} | {settings} | {params} | {ratio} | "
            f"{macs} | {_n(m.get('accuracy'), '.4f')} | {drop} | {_n(m.get('latency_ms'), '.3f')} |"
        )
    for number, reason in view.failures:
        print(f"| {number} | | failed | {reason} | | | | | | |")


if __name__ == "__main__":
    main()
