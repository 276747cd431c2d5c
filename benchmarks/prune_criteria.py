"""The pruning criteria as their papers define them, against Torch-Pruning alone, in one run.

Same trained base, same pruning ratio on every prunable layer, same fine-tune budget, side by side
(1 thread): each of our criteria (l1, apoz, thinet, gates, slimming, and thinet without its
least-squares step) and Torch-Pruning's ``MagnitudePruner`` used alone (its default group-L2
``MagnitudeImportance``). Accuracy right after the cut (what the criterion alone keeps) and after
fine-tuning (mean and spread over fine-tune seeds), parameters, latency, and the time the
criterion itself took. Latency is the trials' own function on the eager module (one attempt per
round; rounds interleaved over all models).

    python benchmarks/prune_criteria.py --ratio 0.5 --epochs 3 --seeds 3 --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
import torch_pruning as tp

import searchspace
from automl import LatencySettings, build_model, load_dataset
from automl._artifact import eager_artifact
from automl._measure import param_count, time_artifact
from automl._train import TrainOptions, evaluate, fit
from searchspace import ApplyContext
from searchspace.methods.prune import CRITERIA, ThiNet, prunable_output_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs after pruning")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tune seeds per pruned model")
    ap.add_argument("--base-epochs", type=int, default=20)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved latency rounds over all models")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", seed=0)
    options = {"channels": args.channels}
    torch.manual_seed(0)
    base = build_model("mnist1d_cnn", input_shape=data.input_shape, num_classes=10, options=options)
    t0 = time.perf_counter()
    base = fit(base, data, TrainOptions(epochs=args.base_epochs, lr=3e-3)).eval()
    print(f"base mnist1d_cnn {options}: trained {args.base_epochs} epochs in {time.perf_counter() - t0:.0f}s")
    example = data.x_test[:1]
    lat = LatencySettings(runtime="eager", batch_size=1, threads=1, warmup=10, repeats=args.repeats, min_attempts=1, max_attempts=1)

    def ctx(notes: dict) -> ApplyContext:
        return ApplyContext(
            example_input=data.x_train[:1],
            calibration=lambda: data.batches("train", 100, shuffle=True, seed=0),
            fit=lambda m, epochs=1, extra_loss=None: fit(m, data, TrainOptions(epochs=epochs, lr=2e-3), extra_loss=extra_loss),
            base=base,
            notes=notes,
        )

    def ours(crit: str, factory: Callable | None = None) -> Callable[[dict], torch.nn.Module]:
        params = {"criterion": crit, "ratio": args.ratio, "per_stage": False, "gate_steps": 30, "gate_epochs": 1, "gate_l1": 0.01}

        def run(notes: dict) -> torch.nn.Module:
            if factory is None:
                return searchspace.get_method("prune")().apply(base, params, context=ctx(notes))
            saved = CRITERIA[crit]
            CRITERIA[crit] = factory
            try:
                return searchspace.get_method("prune")().apply(base, params, context=ctx(notes))
            finally:
                CRITERIA[crit] = saved

        return run

    def torch_pruning_alone(notes: dict) -> torch.nn.Module:
        model = copy.deepcopy(base)
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(), pruning_ratio=args.ratio,
            ignored_layers=prunable_output_layers(model, example),
        )
        pruner.step()
        return model

    runs: dict[str, Callable[[dict], torch.nn.Module]] = {
        **{f"ours prune/{c}": ours(c) for c in ("l1", "apoz", "thinet", "gates", "slimming")},
        "ours prune/thinet without least squares": ours("thinet", lambda: ThiNet(least_squares=False)),
        "Torch-Pruning MagnitudePruner alone": torch_pruning_alone,
    }
    rows = [("base (no compression)", evaluate(base, data), [evaluate(base, data)], base, 0.0, {})]
    for label, make in runs.items():
        notes: dict = {}
        t0 = time.perf_counter()
        pruned = make(notes).eval()
        took = time.perf_counter() - t0
        cut = evaluate(pruned, data)
        accs = []
        for seed in range(args.seeds):
            tuned = fit(copy.deepcopy(pruned), data, TrainOptions(epochs=args.epochs, lr=2e-3, seed=seed)).eval()
            accs.append(evaluate(tuned, data))
        rows.append((label, cut, accs, tuned, took, notes))
        print(f"{label}: cut {cut:.4f}, fine-tuned {accs}, criterion+prune {took:.1f}s", flush=True)

    # Latency side by side: every model once per round, rounds interleaved, so that load changes on
    # the shared machine hit all models alike; the table gives the median over rounds of each
    # round's median, the spread of the round medians, and their minimum (the least disturbed
    # round: on a loaded machine interference only ever adds time).
    per_model: list[list[float]] = [[] for _ in rows]
    for _ in range(args.rounds):
        for i, (_, _, _, model, _, _) in enumerate(rows):
            per_model[i].append(time_artifact(eager_artifact(model), example, lat, per_sample=False)[0])
    print(
        f"\nratio {args.ratio}, fine-tune {args.epochs} epochs x {args.seeds} seeds, latency batch 1, 1 thread, "
        f"median of {args.rounds} interleaved rounds of {args.repeats} blocks\n"
    )
    print("| model | acc after cut | acc after fine-tune (mean, min-max) | params | latency ms, median (min-max of rounds) | min-round latency / base | prune s |")
    print("|---|---|---|---|---|---|---|")
    base_min = min(per_model[0])
    for (label, cut, accs, model, took, _), lats in zip(rows, per_model):
        med = statistics.median(lats)
        spread = f"{statistics.mean(accs):.4f} ({min(accs):.4f}-{max(accs):.4f})"
        print(f"| {label} | {cut:.4f} | {spread} | {param_count(model)} | {med:.4f} ({min(lats):.4f}-{max(lats):.4f}) | {min(lats) / base_min:.2f} | {took:.1f} |")
    for label, *_, notes in rows:
        keep = {k: v for k, v in notes.items() if k not in ("prune.channels", "prune.criterion")}
        if keep:
            print(f"notes {label}: {keep}")


if __name__ == "__main__":
    main()
