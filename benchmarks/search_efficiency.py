"""Search efficiency: hypervolume against wall time for four ways to run the search.

4 arms x 3 seeds x 150 s of search, plus ~20 s of start-up per run (about 35 minutes on 2 cores):

    python benchmarks/search_efficiency.py --budget-s 150 --seeds 3 --out runs/search_efficiency

Arms, each given the same wall-clock budget of search (``--budget-s``) from the same study config
(``studies/moasha_digits.yaml``, or ``studies/mnist1d.yaml`` with ``--dataset mnist1d``, read by the
study's own loader) and the same base model (trained and measured once; its ``base/`` folder is
copied into each run's study folder, so every run is in the same base units):

- ``a``: a plain sequential Optuna ``study.optimize`` loop with the product's TPE sampler and no
  pruning, calling the same :func:`automl._trial.run_trial` in this process (one trial at a time,
  one thread; no dry run, no repeat detection, no constraints);
- ``b``: Ray Tune + TPE (:func:`automl.run_search`, scheduler fifo, no constraints). The searcher's
  dry run and repeat detection are always on in the product, so ``b`` already has them;
- ``c``: ``b`` + constraints + MO-ASHA: the config's ``scheduler:`` (moasha) and, as constraints,
  the hypervolume's own box (``size_bytes`` and ``latency_ms`` at most :data:`COST_REFERENCE` x the
  base's: a model outside it adds nothing to the hypervolume, so it is not worth training);
- ``d``: Ray Tune + random sampling (as ``b``, sampler random).

Each run (arm, seed) is its own process (a fresh Ray), whose study is read back afterwards: the
hypervolume of its COMPLETE trials finished by time ``t`` (from its first trial's start), in the
base-relative units of :func:`automl._pareto.normalise` (the base alone has hypervolume 1) with
:func:`automl._pareto.hypervolume` (Optuna's WFG), the same helpers ``automl report`` and
``compare`` use. The table gives, per arm, the median over seeds of: the final hypervolume (at the
budget), the time to reach 95 % of the best hypervolume any run reached (runs that never reach it
count as the budget and are flagged), finished and trained trials per hour, and the ratios
(c)/(a) and TPE/random ((b)/(d)) of that time.

``--budget-s 45 --seeds 1`` is a smoke run (it proves the script works; its numbers mean little).
"""

from __future__ import annotations

import argparse
import json
import math
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

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"digits": REPO / "studies" / "moasha_digits.yaml", "mnist1d": REPO / "studies" / "mnist1d.yaml"}
ARMS = {
    "a": "plain Optuna loop, TPE, no pruning",
    "b": "Ray Tune + TPE",
    "c": "Ray Tune + TPE + costs-first + constraints + MO-ASHA",
    "d": "Ray Tune + random",
}
#: The fraction of the best hypervolume a run must reach for the time-to-target column.
TARGET = 0.95


def arm_config(args: argparse.Namespace, arm: str, seed: int) -> Any:
    """The study config of one run: the dataset's study file, changed only where the arm says."""
    from automl._config import load_config, parse_config
    from automl._pareto import COST_REFERENCE

    data = load_config(CONFIGS[args.dataset]).model_dump(mode="json")
    data.update(
        name=f"search_{arm}_s{seed}" if arm != "base" else "search_base",
        output_dir=str(Path(args.out).resolve()),
        sampler={"name": "random" if arm == "d" else "tpe", "seed": seed},
        resources={"cpus": 1, "max_concurrent": args.concurrent},
    )
    data["budget"] = {**data["budget"], "trials": 100_000, "time_limit_s": args.budget_s}
    data["latency"] = {**data["latency"], "drift_check": False}
    data["scheduler"] = {"name": "fifo"}
    data["constraints"] = {}
    if arm == "c":
        data["scheduler"] = args.scheduler
        base = json.loads((Path(args.out) / "search_base" / "base" / "base.json").read_text())["metrics"]
        data["constraints"] = {
            "max_size_bytes": COST_REFERENCE * base["size_bytes"],
            "max_latency_ms": COST_REFERENCE * base["latency_ms"],
        }
    return parse_config(data, source=f"arm {arm}")


def run_plain(cfg: Any, budget_s: float) -> None:
    """Arm a: ``study.optimize`` calling run_trial in this process, one trial at a time."""
    import torch
    from automl._study import make_sampler, objective_values, prepare_study
    from automl._trial import run_trial

    _, payload, space = prepare_study(cfg, log=lambda _: None)
    torch.set_num_threads(1)  # what one Ray trial of resources.cpus 1 gets
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url, sampler=make_sampler(cfg))

    def objective(trial: optuna.Trial) -> list[float]:
        plan = space.sample(trial)
        trial.set_user_attr("method", plan.label)
        with tempfile.TemporaryDirectory() as work:
            outcome = run_trial(plan, payload.base, payload.data, payload.settings, folder=Path(work) / "artifact", methods=payload.methods)
        return objective_values(cfg, outcome.metrics.as_dict())

    study.optimize(objective, timeout=budget_s, catch=(Exception,))


def curve(cfg: Any, budget_s: float) -> dict[str, Any]:
    """Hypervolume (base units) after each COMPLETE trial, by seconds since the first trial began."""
    from automl._pareto import hypervolume, load_view, nondominated_mask, normalise

    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    view = load_view(study)
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    if not starts:
        return {"points": [], "finished": 0, "trained": 0}
    t0 = min(starts)
    done = sorted((t for t in trials if t.datetime_complete is not None), key=lambda t: t.datetime_complete)
    points: list[tuple[float, float]] = []
    front = np.empty((0, len(view.objectives)))
    value = 0.0
    finished = trained = 0
    for t in done:
        at = (t.datetime_complete - t0).total_seconds()
        if at > budget_s:
            break  # the same wall clock for every arm
        finished += 1
        # Trained: fine-tuned at least partly (not stopped by the dry run, not a repeat).
        trained += int("infeasible" not in t.user_attrs and "duplicate_of" not in t.user_attrs and t.state != optuna.trial.TrialState.FAIL)
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        pts, ref = normalise([t.values], view.objectives, view.directions, view.base)
        front = np.vstack([front, pts])
        front = front[nondominated_mask(front)]
        value = hypervolume(front, ref)
        points.append((at, value))
    return {"points": points, "finished": finished, "trained": trained, "dry_run_latency": dry_run_latency(study)}


def dry_run_latency(study: optuna.Study) -> list[list[Any]]:
    """``[plan, dry-run latency, trained latency]`` (ms) of each trained COMPLETE trial whose dry-run
    costs are final: the same artifact timed before training (by the screen) and after (by the trial)."""
    from automl._records import DRY_RUN

    out = []
    for t in study.get_trials(deepcopy=False):
        dry = t.user_attrs.get(DRY_RUN) or {}
        trained = t.user_attrs.get("latency_ms")
        if t.state == optuna.trial.TrialState.COMPLETE and dry.get("final") and trained and "duplicate_of" not in t.user_attrs:
            out.append([t.user_attrs.get("method"), dry["latency_ms"], trained])
    return out


def dry_run_agreement(runs: list[dict[str, Any]]) -> str:
    """One line: how far the dry run's latency is from the trained model's, over every run."""
    pairs = [(dry, trained) for r in runs for _, dry, trained in r.get("dry_run_latency", [])]
    if not pairs:
        return "Dry-run latency against the trained model's: no trained trial with final dry-run costs."
    ratios = sorted(dry / trained for dry, trained in pairs)
    off = sum(not 0.8 <= x <= 1.25 for x in ratios)
    return (
        f"Dry-run latency / trained latency over {len(ratios)} trained trials (same artifact, timed before and after training): "
        f"median {median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}, {off} outside 0.8-1.25."
    )


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, hv in points if hv >= target), None)


def run_one(args: argparse.Namespace) -> None:
    """One (arm, seed) in this process; writes its curve as JSON."""
    from automl import run_search

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = arm_config(args, args.arm, args.seed)
    # The one base (weights and its measured record): every run's hypervolume is in the same units.
    shutil.copytree(Path(args.out) / "search_base" / "base", cfg.study_dir / "base", dirs_exist_ok=True)
    started = time.perf_counter()
    if args.arm == "a":
        run_plain(cfg, args.budget_s)
    else:
        run_search(cfg, log=lambda _: None)
    out = curve(cfg, args.budget_s)
    out.update(arm=args.arm, seed=args.seed, process_s=time.perf_counter() - started)
    Path(args.result).write_text(json.dumps(out))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarise(runs: list[dict[str, Any]], budget_s: float) -> str:
    best = max((hv for r in runs for _, hv in r["points"]), default=0.0)
    target = TARGET * best
    rows, t95 = [], {}
    for arm, label in ARMS.items():
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        reach = [time_to(r["points"], target) for r in mine]
        missed = sum(t is None for t in reach)
        t95[arm] = median([budget_s if t is None else t for t in reach])
        final = median([r["points"][-1][1] if r["points"] else 0.0 for r in mine])
        per_h = median([r["finished"] / budget_s * 3600 for r in mine])
        trained_h = median([r["trained"] / budget_s * 3600 for r in mine])
        flag = f" ({missed}/{len(mine)} never)" if missed else ""
        rows.append(f"| {arm}: {label} | {final:.4f} | {t95[arm]:.1f}{flag} | {per_h:.0f} | {trained_h:.0f} |")

    def ratio(x: str, y: str) -> str:
        return f"{t95[x] / t95[y]:.2f}" if x in t95 and y in t95 and t95[y] > 0 else "n/a"

    seeds = len({r["seed"] for r in runs})
    head = [
        f"Budget {budget_s:g} s of search per run, {seeds} seed(s); best hypervolume of any run {best:.4f} (base = 1); target {TARGET:.0%} of it = {target:.4f}.",
        "",
        "| arm | final hypervolume | time to 95 % of best (s) | finished trials / h | trained trials / h |",
        "|---|---|---|---|---|",
    ]
    tail = ["", dry_run_agreement(runs), "", f"Time to 95 %: (c)/(a) = {ratio('c', 'a')} (target <= 0.3); TPE/random (b)/(d) = {ratio('b', 'd')} (target <= 0.5). Medians over seeds; a run that never reaches the target counts as the budget."]
    return "\n".join(head + rows + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=75.0, help="wall-clock seconds of search per run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dataset", choices=sorted(CONFIGS), default="digits")
    ap.add_argument("--arms", default="abcd")
    ap.add_argument("--concurrent", type=int, default=2, help="concurrent Ray trials (arms b, c, d)")
    ap.add_argument("--out", default=None, help="folder for the studies and results.json (default: a temporary folder)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from automl._config import load_config

    # The scheduler of arm c is the config's own (moasha_digits.yaml), or MO-ASHA's defaults.
    own = load_config(CONFIGS[args.dataset]).scheduler
    args.scheduler = own.model_dump() if own.name == "moasha" else {"name": "moasha"}
    if args.arm:
        run_one(args)
        return
    args.out = args.out or tempfile.mkdtemp(prefix="search_efficiency_")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # The base once (trained here, outside every run's clock), then loaded by each run.
    from automl._study import prepare_study

    t = time.perf_counter()
    base_cfg = arm_config(args, "base", 0)
    prepare_study(base_cfg, log=lambda _: None)
    print(f"base ready in {time.perf_counter() - t:.0f} s: {base_cfg.study_dir / 'base'}", flush=True)
    runs = []
    for seed in range(args.seeds):
        for arm in args.arms:
            result = Path(args.out) / f"run_{arm}_s{seed}.json"
            cmd = [sys.executable, __file__, "--arm", arm, "--seed", str(seed), "--result", str(result),
                   "--budget-s", str(args.budget_s), "--dataset", args.dataset, "--concurrent", str(args.concurrent), "--out", args.out]
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0 or not result.is_file():
                print(f"arm {arm} seed {seed} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                continue
            run = json.loads(result.read_text())
            runs.append(run)
            hv = run["points"][-1][1] if run["points"] else 0.0
            print(f"arm {arm} seed {seed}: {run['finished']} finished ({run['trained']} trained), hypervolume {hv:.4f}, {time.perf_counter() - t:.0f} s", flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"budget_s": args.budget_s, "dataset": args.dataset, "runs": runs}))
    print()
    print(summarise(runs, args.budget_s))


if __name__ == "__main__":
    main()
