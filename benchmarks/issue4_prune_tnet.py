"""Issue 4 benchmark, one run, side by side (1 thread):

1. our filter pruning (each criterion) vs Torch-Pruning's MagnitudePruner used alone (its default
   group L2 MagnitudeImportance), same base, same ratio, same fine-tune budget: accuracy, params,
   latency;
2. per-layer Tucker-2 vs T-Net at matched parameter counts, same fine-tune budget.

    PYTHONPATH=. python benchmarks/issue4_prune_tnet.py --dataset mnist1d --ratio 0.5 --epochs 3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch_pruning as tp

import searchspace
from automl import build_model, load_dataset
from automl._artifact import eager_artifact
from automl._latency import LatencySettings
from automl._measure import param_count, state_dict_bytes, time_artifact
from automl._train import TrainOptions, evaluate, fit
from searchspace import ApplyContext
from searchspace.methods.prune import prunable_output_layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs after compression")
    ap.add_argument("--base-epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, seed=0)
    if args.dataset == "mnist1d":
        name, options = "mnist1d_cnn", {"channels": 64}
    else:
        name, options = "digits_cnn", {"depth": 2}
    torch.manual_seed(0)
    base = build_model(name, input_shape=data.input_shape, num_classes=10, options=options)
    t0 = time.perf_counter()
    base = fit(base, data, TrainOptions(epochs=args.base_epochs, lr=3e-3)).eval()
    print(f"base {name} {options}: trained in {time.perf_counter() - t0:.0f}s")
    lat = LatencySettings(runtime="eager", batch_size=1, threads=1, warmup=10, repeats=args.repeats)
    example = data.x_test[:1]
    ft = TrainOptions(epochs=args.epochs, lr=2e-3)

    def ctx() -> ApplyContext:
        return ApplyContext(
            example_input=data.x_train[:1],
            calibration=lambda: data.batches("train", 100, shuffle=True, seed=0),
            fit=lambda m, epochs=1, extra_loss=None: fit(m, data, TrainOptions(epochs=epochs, lr=2e-3), extra_loss=extra_loss),
            base=base,
        )

    models: dict[str, torch.nn.Module] = {"base (no compression)": base}
    for crit in ("l1", "apoz", "thinet", "gates"):
        params = {"criterion": crit, "ratio": args.ratio, "per_stage": False, "gate_epochs": 1, "gate_l1": 0.01}
        pruned = searchspace.get_method("prune")().apply(base, params, context=ctx())
        models[f"ours prune/{crit}"] = fit(pruned, data, ft)
    tp_model = copy.deepcopy(base)
    pruner = tp.pruner.MagnitudePruner(
        tp_model, example, importance=tp.importance.MagnitudeImportance(), pruning_ratio=args.ratio,
        ignored_layers=prunable_output_layers(tp_model, example),
    )
    pruner.step()
    models["Torch-Pruning MagnitudePruner alone"] = fit(tp_model, data, ft)

    # Tucker-2 vs T-Net at matched parameter counts.
    tnet = searchspace.get_method("tnet")()
    tucker = searchspace.get_method("tucker")()
    grid = [r / 20 for r in range(1, 21)]
    for frac in (0.5, 0.3):
        tp_params = {"rank_layers": 1.0, "rank_out": frac, "rank_in": frac, "rank_kernel": 1.0}
        t_model = tnet.apply(base, tp_params, context=ApplyContext(example_input=example))
        target = param_count(t_model)
        best = min(
            ((ro, ri) for ro in grid for ri in grid),
            key=lambda r: abs(param_count(tucker.apply(base, {"rank_out": r[0], "rank_in": r[1]}, context=ApplyContext(example_input=example))) - target),
        )
        k_model = tucker.apply(base, {"rank_out": best[0], "rank_in": best[1]}, context=ApplyContext(example_input=example))
        models[f"tnet ranks out/in {frac}"] = fit(t_model, data, ft)
        models[f"tucker ranks {best[0]}/{best[1]} (matched)"] = fit(k_model, data, ft)

    print(f"\nratio {args.ratio}, fine-tune {args.epochs} epochs, latency batch 1, 1 thread, median of {args.repeats} blocks\n")
    print("| model | test acc | params | size bytes | latency ms (IQR) |")
    print("|---|---|---|---|---|")
    for label, m in models.items():
        m.eval()
        acc = evaluate(m, data)
        med, iqr = time_artifact(eager_artifact(m), example, lat, per_sample=False)
        print(f"| {label} | {acc:.4f} | {param_count(m)} | {state_dict_bytes(m)} | {med:.4f} ({iqr:.4f}) |")


if __name__ == "__main__":
    main()
