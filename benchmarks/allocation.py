"""Where to compress: pruning and Tucker allocated uniformly, globally, or searched with the sensitivity profile.

Three arms, each the same study config (``studies/mnist1d_allocation.yaml``: the 128-channel
MNIST-1D base, ``none`` / ``tucker`` / ``prune``, nothing enqueued) with the same trial budget and
the same base (trained and measured once; its ``base/`` folder, and the profile where an arm needs
one, are copied into each run's study folder), changed only in the allocation settings:

- ``uniform``: ``prune.allocation`` and ``tucker.allocation`` fixed to ``uniform`` (what a study
  that does not name them searches);
- ``global``: ``prune.allocation`` fixed to ``global`` (Torch-Pruning's global channel ranking),
  ``tucker.allocation`` to ``uniform``;
- ``searched``: both searched (``uniform | global | sensitivity`` and ``uniform | sensitivity``).

Each (arm, sampler seed) is its own process with a fresh Ray, read back afterwards. Per run: the
largest parameter reduction and the largest latency reduction (base / trial) among COMPLETE trials
at most ``--max-drop`` (1 point) below the base's test accuracy, and the hypervolume of the front in
the base-relative units of ``automl report`` / ``compare`` (:func:`automl._pareto.normalise`, the
base alone = 1). The table gives each run and the median over seeds per arm.

    PYTHONPATH=. python benchmarks/allocation.py --seeds 2 --out runs/allocation
    PYTHONPATH=. python benchmarks/allocation.py --config studies/resnet18_allocation.yaml --seeds 2 --out runs/allocation_r18

``--config`` names another study config with ``tucker`` and ``prune`` methods (the second line: ResNet-18
at 32 px on generated images).

``--trials``, ``--epochs`` and ``--base-epochs`` shorten a run (the config's are 44, 30 and 100);
``--time-limit-s`` caps each run's search (the table's ``complete`` column says how many trials
finished).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "studies" / "mnist1d_allocation.yaml"
#: Arm -> the allocation domains it gives prune and tucker.
ARMS: dict[str, dict[str, list[str]]] = {
    "uniform": {"prune": ["uniform"], "tucker": ["uniform"]},
    "global": {"prune": ["global"], "tucker": ["uniform"]},
    "searched": {"prune": ["uniform", "global", "sensitivity"], "tucker": ["uniform", "sensitivity"]},
}


def arm_config(args: argparse.Namespace, arm: str, seed: int, *, name: str | None = None) -> Any:
    """The study config of one run: the shipped config, changed only where the arm and the flags say."""
    from automl._config import load_config, parse_config

    data = load_config(Path(args.config)).model_dump(mode="json")
    data.update(name=name or f"allocation_{arm}_s{seed}", output_dir=str(Path(args.out).resolve()), sampler={"name": "tpe", "seed": seed})
    data["resources"] = {"cpus": 1, "max_concurrent": args.concurrent}
    data["latency"] = {**data["latency"], "drift_check": False}
    data["budget"] = {**data["budget"], "trials": args.trials, "time_limit_s": args.time_limit_s, **({"epochs": args.epochs} if args.epochs else {})}
    if args.base_epochs:
        data["base"] = {**data["base"], "epochs": args.base_epochs}
    for method, allowed in ARMS.get(arm, ARMS["searched"]).items():
        data["methods"][method] = {**data["methods"][method], "allocation": allowed}
    return parse_config(data, source=f"arm {arm}")


def summary(cfg: Any, max_drop: float) -> dict[str, Any]:
    """The run's largest reductions within ``max_drop`` of the base, its front's hypervolume, its trials."""
    from automl._pareto import hypervolume, load_view, nondominated_mask, normalise

    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    view = load_view(study)
    base = view.base
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE and t.values is not None]
    within = [t for t in done if t.user_attrs.get("accuracy") is not None and t.user_attrs["accuracy"] >= base["accuracy"] - max_drop]

    def best(metric: str) -> tuple[float, str]:
        pool = [(base[metric] / t.user_attrs[metric], t) for t in within if t.user_attrs.get(metric)]
        if not pool:
            return 1.0, "-"
        ratio, t = max(pool, key=lambda p: p[0])
        return ratio, f"#{t.number} {t.user_attrs.get('method')} {t.user_attrs['accuracy']:.4f}"

    hv = 0.0
    if done:
        pts, ref = normalise([t.values for t in done], view.objectives, view.directions, base)
        pts = np.asarray(pts)
        hv = hypervolume(pts[nondominated_mask(pts)], ref)
    params, params_by = best("params")
    latency, latency_by = best("latency_ms")
    allocations = sorted({str(t.params.get(k)) for t in done for k in t.params if k.endswith(".allocation")})
    return {
        "params_x": params, "params_by": params_by, "latency_x": latency, "latency_by": latency_by, "hypervolume": hv,
        "complete": len(done), "within": len(within), "base_accuracy": base["accuracy"], "allocations": allocations,
    }


def run_one(args: argparse.Namespace) -> None:
    """One (arm, seed) in this process; writes its summary as JSON."""
    from automl import run_search

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = arm_config(args, args.arm, args.seed)
    shared = Path(args.out) / "allocation_base"
    shutil.copytree(shared / "base", cfg.study_dir / "base", dirs_exist_ok=True)
    if (shared / "profile.json").is_file():
        shutil.copy(shared / "profile.json", cfg.study_dir / "profile.json")
    started = time.perf_counter()
    run_search(cfg, log=lambda _: None)
    out = summary(cfg, args.max_drop)
    out.update(arm=args.arm, seed=args.seed, seconds=time.perf_counter() - started)
    Path(args.result).write_text(json.dumps(out))


def table(runs: list[dict[str, Any]], max_drop: float) -> str:
    lines = [
        f"Within {100 * max_drop:g} point(s) of the base's test accuracy ({runs[0]['base_accuracy']:.4f}):" if runs else "no run finished",
        "",
        "| arm | seed | params reduction | by | latency reduction | by | hypervolume | complete | within |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['params_x']:.1f}x | {r['params_by']} | {r['latency_x']:.2f}x | {r['latency_by']} | {r['hypervolume']:.4f} | {r['complete']} | {r['within']} |")
    lines += ["", "| arm | median params reduction | median latency reduction | median hypervolume |", "|---|---|---|---|"]
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if mine:
            med = {k: statistics.median(r[k] for r in mine) for k in ("params_x", "latency_x", "hypervolume")}
            lines.append(f"| {arm} | {med['params_x']:.1f}x | {med['latency_x']:.2f}x | {med['hypervolume']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--config", default=str(CONFIG), help="the study config every arm changes (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=2, help="sampler seeds per arm (default: %(default)s)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=44, help="trial budget of every run (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per stage (default: the config's)")
    ap.add_argument("--base-epochs", type=int, default=None, help="base training epochs (default: the config's)")
    ap.add_argument("--time-limit-s", type=float, default=None, help="search wall-time cap of every run, a safety net on a busy machine (default: none)")
    ap.add_argument("--concurrent", type=int, default=2, help="concurrent Ray trials (default: %(default)s)")
    ap.add_argument("--max-drop", type=float, default=0.01, help="largest accuracy drop counted, a fraction (default: %(default)s)")
    ap.add_argument("--out", default=None, help="folder for the studies and results.json (default: a temporary folder)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        run_one(args)
        return
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"--arms must name arms among {list(ARMS)}, got {unknown}")
    args.out = args.out or tempfile.mkdtemp(prefix="allocation_")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from automl._study import prepare_study

    # The base and its profile once (outside every run), then copied into each run's folder.
    t = time.perf_counter()
    shared = arm_config(args, "searched", 0, name="allocation_base")
    prepare_study(shared, log=lambda line: print(line, flush=True))
    print(f"base and profile ready in {time.perf_counter() - t:.0f} s", flush=True)
    runs = []
    for seed in range(args.seeds):
        for arm in arms:
            result = Path(args.out) / f"run_{arm}_s{seed}.json"
            cmd = [sys.executable, __file__, "--config", args.config, "--arm", arm, "--seed", str(seed), "--result", str(result), "--trials", str(args.trials),
                   "--concurrent", str(args.concurrent), "--max-drop", str(args.max_drop), "--out", args.out]
            cmd += ["--epochs", str(args.epochs)] if args.epochs else []
            cmd += ["--base-epochs", str(args.base_epochs)] if args.base_epochs else []
            cmd += ["--time-limit-s", str(args.time_limit_s)] if args.time_limit_s else []
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0 or not result.is_file():
                print(f"arm {arm} seed {seed} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                continue
            run = json.loads(result.read_text())
            runs.append(run)
            print(f"arm {arm} seed {seed}: params {run['params_x']:.1f}x ({run['params_by']}), latency {run['latency_x']:.2f}x ({run['latency_by']}), hypervolume {run['hypervolume']:.4f}, {time.perf_counter() - t:.0f} s", flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("arm", "seed", "result")}, "runs": runs}))
    print()
    print(table(runs, args.max_drop))


if __name__ == "__main__":
    main()
