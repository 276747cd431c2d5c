"""Export every trial on a study's front and tabulate what export verified and re-measured.

For each front trial: wall time of ``automl export`` (all checks plus the fresh-process latency
run), recorded vs re-verified accuracy (TorchScript and ONNX Runtime), the largest ONNX-vs-PyTorch
output difference, and latency as recorded by the trial vs re-measured on the exported TorchScript
and ONNX files in a fresh process (batch and threads from the study config).

Usage: python benchmarks/export_front.py STUDY_DIR [--out /tmp/exports]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna

from automl._pareto import load_view
from automl._study import load_study_config, open_storage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("study_dir")
    ap.add_argument("--out", default="/tmp/automl-export-bench")
    args = ap.parse_args()
    cfg = load_study_config(args.study_dir)
    view = load_view(optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.storage_url)))
    out_root = Path(args.out)
    shutil.rmtree(out_root, ignore_errors=True)
    print("| trial | method | export wall s | acc recorded | acc TorchScript | acc ONNX | max abs diff ONNX vs torch | latency recorded ms | latency TorchScript fresh ms (IQR) | latency ONNX Runtime fresh ms (IQR) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in sorted(view.front, key=lambda r: r.number):
        out = out_root / f"trial_{row.number:05d}"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "automl._cli", "export", args.study_dir, "--trial", str(row.number), "--out", str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"| {row.number} | {row.method} | {wall:.1f} | export failed: {proc.stderr.strip()[-200:]} |")
            continue
        card = json.loads((out / "card.json").read_text())
        rec, exp, onnx = card["metrics"]["recorded"], card["metrics"]["exported"], card["onnx"]
        print(
            f"| {row.number} | {row.method} | {wall:.1f} | {rec['accuracy']:.4f} | {exp['accuracy']:.4f} | "
            f"{exp['accuracy_onnx'] if exp['accuracy_onnx'] is None else format(exp['accuracy_onnx'], '.4f')} | "
            f"{onnx.get('max_abs_diff_vs_torch', float('nan')):.2e} | {rec['latency_ms']:.3f} | "
            f"{exp['latency_ms']:.3f} ({exp['latency_iqr_ms']:.3f}) | {exp['latency_onnxruntime_ms']:.3f} ({exp['latency_onnxruntime_iqr_ms']:.3f}) |"
        )


if __name__ == "__main__":
    main()
