"""Least-squares initialisation from the base conv vs random initialisation, same fine-tuning.

For ``wsnet`` and ``dwsep`` on the trained MNIST-1D base of studies/mnist1d.yaml (128 channels; the
study caches it in runs/mnist1d/base/weights.pt), apply the method with ``init = "lstsq"`` and with
``init = "random"``, fine-tune both with exactly the same options (epochs, lr, seed, no distillation)
and report test accuracy right after ``apply`` and after fine-tuning, over a few seeds.

    python benchmarks/reparam_init.py --epochs 10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import statistics

import torch

from automl import build_model, load_config, load_dataset
from automl._train import TrainOptions, evaluate, fit
from searchspace import ApplyContext, get_method

CASES = {
    "wsnet S=1 C=4": ("wsnet", {"stride": 1, "repeat": 4}),
    "wsnet S=2 C=8": ("wsnet", {"stride": 2, "repeat": 8}),
    "dwsep linear": ("dwsep", {"width": 1.0, "activation": False, "first_layer": False}),
    "dwsep BN+ReLU": ("dwsep", {"width": 1.0, "activation": True, "first_layer": False}),
    "dwsep BN+ReLU, first layer too": ("dwsep", {"width": 1.0, "activation": True, "first_layer": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="studies/mnist1d.yaml", help="the study whose base model is used")
    ap.add_argument("--base", default="runs/mnist1d/base/weights.pt", help="that study's trained base weights")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    data = load_dataset(cfg.dataset.name, seed=cfg.dataset.seed)
    base = build_model(cfg.base.model, input_shape=data.input_shape, num_classes=data.num_classes, options=cfg.base.options)
    base.load_state_dict(torch.load(args.base, map_location="cpu", weights_only=True))
    base.eval()
    print(f"base: test accuracy {evaluate(base, data):.4f}, {sum(p.numel() for p in base.parameters())} params; "
          f"fine-tuning {args.epochs} epochs, lr {cfg.budget.lr}, batch {cfg.budget.batch_size}, seeds {args.seeds}\n")
    print("| case | init | params | acc after apply | acc after fine-tuning (per seed) | median |")
    print("|---|---|---|---|---|---|")
    for label, (name, params) in CASES.items():
        for init in ("lstsq", "random"):
            accs, before, n = [], None, 0
            for seed in args.seeds:
                torch.manual_seed(seed)
                ctx = ApplyContext(example_input=data.x_train[:1])
                model = get_method(name)().apply(base, {**params, "init": init}, context=ctx)
                n = sum(p.numel() for p in model.parameters())
                before = evaluate(model, data)
                fit(model, data, TrainOptions(epochs=args.epochs, lr=cfg.budget.lr, batch_size=cfg.budget.batch_size, seed=seed))
                accs.append(evaluate(model, data))
            print(f"| {label} | {init} | {n:,} | {before:.4f} | {' / '.join(f'{a:.4f}' for a in accs)} | {statistics.median(accs):.4f} |", flush=True)


if __name__ == "__main__":
    main()
