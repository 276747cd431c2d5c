"""Early exits on the MNIST-1D CNN at its plateau: per-exit fractions and accuracy, expected MACs vs
measured mean batch-1 latency, eager and TorchScript, all side by side in one run.

    python benchmarks/exits_mnist1d.py [--base runs/mnist1d_exits/base/weights.pt]

Every exit model is trained once (``run_trial``: apply, fine-tune, calibrate on validation) and then
measured at its own MSDNet budget and at every q of the variant grid, with no retraining.
Latency: mean per-sample time over the 1000 test samples fed one at a time (1 thread), median over
``--repeats`` passes; the base is measured with the same loop in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from automl import build_model, load_dataset
from automl._artifact import build_artifact
from automl._latency import LatencySettings
from automl._measure import count_macs, time_artifact
from automl._train import TrainOptions, evaluate, fit
from automl._trial import TrialSettings, run_trial
from searchspace import Plan


def per_sample_ms(model: torch.nn.Module, x: torch.Tensor, settings: LatencySettings, runtime: str) -> float:
    """Mean per-sample latency of ``model``'s artifact for ``runtime`` on ``x`` (the study's one function)."""
    with tempfile.TemporaryDirectory() as tmp:
        artifact = build_artifact(model, x[:1], Path(tmp), runtime=runtime, threads=settings.threads)
        return time_artifact(artifact, x, settings, per_sample=True)[0]

CONFIGS = {
    "avgpool(4), frozen, after conv1+conv2": dict(points="blocks", count=2, head="avgpool", pool=4, training="frozen", thresholds="budget", q=0.5),
    "iSQRT-COV(d=8, N=3), frozen, after conv1": dict(points="stages", count=1, head="isqrtcov", cov_dim=8, iterations=3, training="frozen", thresholds="budget", q=0.5),
    "iSQRT-COV(d=16, N=5), frozen, after conv1": dict(points="stages", count=1, head="isqrtcov", cov_dim=16, iterations=5, training="frozen", thresholds="budget", q=0.5),
    "iSQRT-COV(d=16, N=3), joint (linear weights), after conv1": dict(points="stages", count=1, head="isqrtcov", cov_dim=16, iterations=3, training="joint", weighting="linear", thresholds="budget", q=0.5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="weights of a trained 128-channel base (else trained here)")
    ap.add_argument("--epochs", type=int, default=120, help="base training epochs")
    ap.add_argument("--finetune", type=int, default=8, help="exit training epochs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="config names to run (substring match)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist1d", seed=0)
    base = build_model("mnist1d_cnn", input_shape=data.input_shape, num_classes=10, options={"channels": 128})
    if args.base:
        base.load_state_dict(torch.load(args.base, weights_only=True))
    else:
        fit(base, data, TrainOptions(epochs=args.epochs, lr=0.003, batch_size=100))
    base.eval()
    lat = LatencySettings(warmup=10, repeats=args.repeats)
    base_acc = evaluate(base, data, "test")
    base_macs = count_macs(base, data.x_test[:1])
    base_eager = per_sample_ms(base, data.x_test, lat, "eager")
    base_ts = per_sample_ms(base, data.x_test, lat, "torchscript")
    base_ort = per_sample_ms(base, data.x_test, lat, "onnxruntime")
    print(f"base: {data.describe()}; params {sum(p.numel() for p in base.parameters())}, accuracy {base_acc:.4f}, "
          f"MACs {base_macs}, per-sample latency eager {base_eager * 1e3:.1f} us, TorchScript {base_ts * 1e3:.1f} us, ONNX Runtime {base_ort * 1e3:.1f} us\n")
    settings = TrialSettings(epochs=args.finetune, lr=0.002, batch_size=100, latency=lat)
    for name, params in CONFIGS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            out = run_trial(Plan(chain=(("exits", params),), finetune={"distill": False}), base, data, settings, folder=Path(work))
        print(f"### {name}  (trained + measured in {time.perf_counter() - start:.0f} s; MACs up to each exit {out.metrics.exit_macs})\n")
        print("| q | exit fractions (test) | accuracy per exit | accuracy | Δ vs base (pt) | expected MACs | MACs-predicted eager latency (us) | eager (us) | speed-up eager | TorchScript (us) | speed-up TorchScript | ONNX Runtime (us) | speed-up ONNX Runtime |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        model = out.model
        rows = [(params["q"], out.metrics, out.notes["calibrated"])] + [(v.params["exits.q"], v.metrics, v.state) for v in out.variants]
        for q, m, state in sorted(rows, key=lambda r: r[0]):
            model.use_setting({"state": state})
            eager = per_sample_ms(model, data.x_test, lat, "eager")
            ts = per_sample_ms(model, data.x_test, lat, "torchscript")
            ort = m.latency_ms if m.runtime == "onnxruntime" else per_sample_ms(model, data.x_test, lat, "onnxruntime")
            predicted = base_eager * m.macs / base_macs
            fr = " / ".join(f"{f:.3f}" for f in m.exit_fractions)
            acc = " / ".join("-" if a is None else f"{a:.3f}" for a in m.exit_accuracy)
            print(f"| {q:.3f} | {fr} | {acc} | {m.accuracy:.3f} | {100 * (m.accuracy - base_acc):+.1f} | {m.macs} | {predicted * 1e3:.0f} | "
                  f"{eager * 1e3:.0f} | {base_eager / eager:.2f}x | {ts * 1e3:.0f} | {base_ts / ts:.2f}x | {ort * 1e3:.0f} | {base_ort / ort:.2f}x |")
        model.use_setting({"state": out.notes["calibrated"]})
        print()


if __name__ == "__main__":
    main()
