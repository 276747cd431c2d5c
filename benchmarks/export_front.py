"""Export every trial on a study's front and tabulate what export verified and re-measured.

For each front trial: wall time of ``automl export`` (all checks plus the fresh-process latency
run), recorded vs re-verified accuracy (the measured artifact, TorchScript and ONNX Runtime), the
largest ONNX-vs-TorchScript output difference, and latency as recorded by the trial vs re-timed on
the exported artifact of the study's runtime in a fresh process (the study's latency settings).

With ``--per-method``: instead of the front, one trial per method the study ran (the most accurate
among the shortest chains holding it), so every method family's export is measured.

Usage: python benchmarks/export_front.py STUDY_DIR [--out exports_bench] [--per-method]
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", help="a finished study's folder, e.g. runs/digits")
    ap.add_argument("--out", default="exports_bench", help="folder for the exports (replaced)")
    ap.add_argument("--per-method", action="store_true", help="one trial per method instead of the front")
    args = ap.parse_args()
    cfg = load_study_config(args.study_dir)
    view = load_view(optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.storage_url)))
    out_root = Path(args.out)
    shutil.rmtree(out_root, ignore_errors=True)
    print("| trial | method | export wall s | acc recorded | acc verified (runtime) | acc TorchScript | acc ONNX | max abs diff ONNX vs TorchScript | latency recorded ms | latency fresh ms (IQR) | fresh / recorded |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in _per_method(view.trials) if args.per_method else sorted(view.front, key=lambda r: r.number):
        out = out_root / f"trial_{row.number:05d}"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "automl._cli", "export", args.study_dir, "--trial", str(row.number), "--out", str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"| {row.number} | {row.method} | {wall:.1f} | export failed: {proc.stderr.strip()[-200:]} |")
            continue
        card = json.loads((out / "card.json").read_text())
        rec, exp, onnx = card["metrics"]["recorded"], card["metrics"]["exported"], card["onnx"]
        ratio = exp["latency_ms"] / rec["latency_ms"] if exp.get("latency_ms") and rec.get("latency_ms") else None
        print(
            f"| {row.number} | {row.method} | {wall:.1f} | {_f(rec['accuracy'], '.4f')} | {_f(exp['accuracy'], '.4f')} ({exp['accuracy_runtime']}) | "
            f"{_f(onnx.get('accuracy_pytorch_artifact'), '.4f')} | {_f(exp['accuracy_onnx'], '.4f')} | {_f(onnx.get('max_abs_diff_vs_torch'), '.2e')} | "
            f"{_f(rec['latency_ms'], '.3f')} | {_f(exp['latency_ms'], '.3f')} ({_f(exp['latency_iqr_ms'], '.3f')}) | {_f(ratio, '.2f')} |"
            + ("" if onnx["status"] == "ok" else f" ONNX {onnx['status']}: {onnx.get('reason', '')[:120]} |")
        )


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _per_method(rows):
    chosen = {}
    for method in sorted({m for r in rows for m in r.method.split("+")}):
        holding = [r for r in rows if method in r.method.split("+")]
        shortest = min(len(r.method.split("+")) for r in holding)
        chosen[method] = max((r for r in holding if len(r.method.split("+")) == shortest), key=lambda r: r.metrics.get("accuracy") or 0.0)
    return sorted({r.number: r for r in chosen.values()}.values(), key=lambda r: r.number)


if __name__ == "__main__":
    main()
