"""Fixed pruning plans on a trained base, each allocation at matched parameter counts, fine-tuned.

No search: the base's uniform, global and sensitivity allocations at amounts that remove about the
same parameters, each pruned (l1), fine-tuned for ``--epochs`` with the study's fine-tuning
learning rate, and measured on the test split, for several fine-tuning seeds. It separates the
allocation from the search: if one allocation keeps more accuracy at the same parameters, a
search that samples it should find the better front.

The base and its profile are read from a study folder (``base/weights.pt``, ``profile.json``),
e.g. the ``allocation_base`` folder that ``benchmarks/allocation.py --out DIR`` leaves.

    PYTHONPATH=. python benchmarks/allocation_fixed.py --study DIR/allocation_base --epochs 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
#: Rows of plans at about the same parameters on the 128-channel MNIST-1D base (~10x, ~13x, ~20x).
PLANS = [
    [{"ratio": 0.7}, {"allocation": "global", "ratio": 0.7}, {"allocation": "sensitivity", "share": 0.9}],
    [{"ratio": 0.75}, {"allocation": "global", "ratio": 0.75}, {"allocation": "sensitivity", "share": 0.93}],
    [{"ratio": 0.8}, {"allocation": "global", "ratio": 0.8}, {"allocation": "sensitivity", "share": 0.95}],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--study", required=True, help="a study folder holding base/weights.pt and profile.json")
    ap.add_argument("--config", default=str(REPO / "studies" / "mnist1d_allocation.yaml"), help="the study config the base was trained by (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (default: %(default)s)")
    args = ap.parse_args()
    import searchspace
    from automl._config import load_config
    from automl._data import dataset_from_config
    from automl._measure import param_count
    from automl._study import _build_base
    from automl._train import TrainOptions, evaluate, fit
    from searchspace import ApplyContext, SensitivityProfile

    torch.set_num_threads(1)
    cfg = load_config(Path(args.config))
    data = dataset_from_config(cfg.dataset)
    study = Path(args.study)
    base = _build_base(cfg, data)
    base.load_state_dict(torch.load(study / "base" / "weights.pt", map_location="cpu", weights_only=True))
    base.eval()
    profile = SensitivityProfile.from_dict(json.loads((study / "profile.json").read_text()))
    prune = searchspace.get_method("prune")()
    print(f"base: {param_count(base)} params, test accuracy {evaluate(base, data):.4f}; fine-tuning {args.epochs} epochs at lr {cfg.budget.lr}, seeds {args.seeds}")
    print()
    print("| plan | params | reduction | channels kept per layer | test accuracy per seed | median |")
    print("|---|---:|---:|---|---|---:|")
    for row in PLANS:
        for plan in row:
            accs, model = [], None
            for seed in args.seeds:
                ctx = ApplyContext(example_input=data.example(), base=base, profile=profile)
                model = prune.apply(base, {"criterion": "l1", **plan}, context=ctx)
                fit(model, data, TrainOptions(epochs=args.epochs, lr=cfg.budget.lr, batch_size=cfg.budget.batch_size, seed=seed))
                accs.append(evaluate(model, data))
            kept = ", ".join(str(after) for _, after in ctx.notes["prune.channels"].values())
            label = plan.get("allocation", "uniform") + " " + ", ".join(f"{k} {v}" for k, v in plan.items() if k != "allocation")
            print(f"| {label} | {param_count(model):,} | {param_count(base) / param_count(model):.1f}x | {kept} | {' / '.join(f'{a:.3f}' for a in accs)} | {statistics.median(accs):.3f} |", flush=True)


if __name__ == "__main__":
    main()
