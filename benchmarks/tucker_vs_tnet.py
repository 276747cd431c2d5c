"""Per-layer Tucker-2 against T-Net at matched parameter counts, same base, same fine-tuning (1 thread).

T-Net (``tnet``) shares one Tucker tensor across a group of same-shaped convolutions; Tucker-2
(``tucker``) factorises each convolution on its own. For each T-Net setting the Tucker-2 ranks are
picked on a 0.05 grid to the parameter count closest to the T-Net model's, both are fine-tuned with
the same options, and the table gives test accuracy, parameters, state-dict bytes and eager latency
(the trials' own timing function, batch 1). The pruning criteria are compared by
``benchmarks/prune_criteria.py``.

    python benchmarks/tucker_vs_tnet.py --dataset mnist1d --epochs 3
"""

from __future__ import annotations

import argparse
import time

import torch

import searchspace
from automl import LatencySettings, build_model, load_dataset
from automl._artifact import eager_artifact, state_dict_bytes
from automl._measure import param_count, time_artifact
from automl._train import TrainOptions, evaluate, fit
from searchspace import ApplyContext


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"])
    ap.add_argument("--ranks", type=float, nargs="+", default=[0.5, 0.3], help="T-Net out/in ranks (fractions), one model each")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs after compression")
    ap.add_argument("--base-epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, seed=0)
    # T-Net needs repeated same-shaped convolutions: the MNIST-1D CNN has two, the digits CNN at depth 2.
    name, options = ("mnist1d_cnn", {"channels": 64}) if args.dataset == "mnist1d" else ("digits_cnn", {"depth": 2})
    torch.manual_seed(0)
    base = build_model(name, input_shape=data.input_shape, num_classes=10, options=options)
    t0 = time.perf_counter()
    base = fit(base, data, TrainOptions(epochs=args.base_epochs, lr=3e-3)).eval()
    print(f"base {name} {options}: trained in {time.perf_counter() - t0:.0f}s")
    lat = LatencySettings(runtime="eager", batch_size=1, threads=1, warmup=10, repeats=args.repeats)
    example = data.x_test[:1]
    ft = TrainOptions(epochs=args.epochs, lr=2e-3)
    context = ApplyContext(example_input=example)

    models: dict[str, torch.nn.Module] = {"base (no compression)": base}
    tnet = searchspace.get_method("tnet")()
    tucker = searchspace.get_method("tucker")()
    grid = [r / 20 for r in range(1, 21)]
    for frac in args.ranks:
        t_model = tnet.apply(base, {"rank_layers": 1.0, "rank_out": frac, "rank_in": frac, "rank_kernel": 1.0}, context=context)
        target = param_count(t_model)
        best = min(
            ((ro, ri) for ro in grid for ri in grid),
            key=lambda r: abs(param_count(tucker.apply(base, {"rank_out": r[0], "rank_in": r[1]}, context=context)) - target),
        )
        k_model = tucker.apply(base, {"rank_out": best[0], "rank_in": best[1]}, context=context)
        models[f"tnet ranks out/in {frac}"] = fit(t_model, data, ft)
        models[f"tucker ranks {best[0]}/{best[1]} (matched)"] = fit(k_model, data, ft)

    print(f"\nfine-tune {args.epochs} epochs, latency batch 1, 1 thread, median of {args.repeats} blocks\n")
    print("| model | test acc | params | size bytes | latency ms (IQR) |")
    print("|---|---|---|---|---|")
    for label, m in models.items():
        m.eval()
        acc = evaluate(m, data)
        timing = time_artifact(eager_artifact(m), example, lat, per_sample=False)
        med, iqr = timing.median_ms, timing.iqr_ms
        print(f"| {label} | {acc:.4f} | {param_count(m)} | {state_dict_bytes(m)} | {med:.4f} ({iqr:.4f}) |")


if __name__ == "__main__":
    main()
