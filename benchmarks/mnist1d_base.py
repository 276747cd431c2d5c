"""Reproduce the MNIST-1D paper's CNN (Greydanus & Kobak 2020: ~94% test accuracy) with our trainer.

Trains automl's MNIST1DCNN (3 Conv1d, kernel 5/3/3, stride 2) at several widths on the offline
MNIST-1D split the studies use, with the same `fit` every trial uses, and prints test accuracy.

    python benchmarks/mnist1d_base.py --channels 25 64 128 --epochs 160 --lr 0.01 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from automl import build_model, load_dataset
from automl._measure import LatencySettings, measure
from automl._train import TrainOptions, evaluate, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[25, 64])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--schedule", choices=["onecycle", "constant"], default="constant")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", seed=0, val_fraction=args.val_fraction)
    rows = []
    for ch in args.channels:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = build_model("mnist1d_cnn", input_shape=data.input_shape, num_classes=10, options={"channels": ch})
            t0 = time.perf_counter()
            fit(model, data, TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=100, seed=seed, schedule=args.schedule))
            secs = time.perf_counter() - t0
            m = measure(model, data, LatencySettings())
            rows.append({"channels": ch, "seed": seed, "params": m.params, "val_acc": round(evaluate(model, data, "val"), 4),
                         "test_acc": round(m.accuracy, 4), "train_s": round(secs, 1), "latency_ms": round(m.latency_ms, 4),
                         "steps": args.epochs * ((len(data.x_train) + 99) // 100), "schedule": args.schedule})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
