"""How far ONNX Runtime's int8 is from PyTorch's (fbgemm) on small FX-quantised models.

For each model: quantise statically (x86 qconfig, calibrated on the inputs), script, export through
``automl._onnx.to_onnx``, and count logits that differ by more than 1e-4, with ONNX Runtime's graph
optimisations on (QLinear fusion) and off (QuantizeLinear/DequantizeLinear around float ops).

Usage: python benchmarks/int8_onnx_rounding.py [--inputs 256]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from automl._onnx import to_onnx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=256)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    models = {
        "linear": nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
        "conv -> flatten -> linear": nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 10)),
        "conv -> relu -> flatten -> linear": nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)),
    }
    print("| model | ORT optimisations | logits > 1e-4 off | max abs diff | same prediction |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            x = torch.randn(args.inputs, 1, 8, 8)
            prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (x[:1],))
            prepared(x)
            path = Path(tmp) / "m.ts"
            torch.jit.script(convert_fx(prepared)).save(str(path))
            ts = torch.jit.load(str(path))
            to_onnx(ts, x[:1], Path(tmp) / "m.onnx")
            with torch.no_grad():
                ref = ts(x).numpy()
            for level, opt in (("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL), ("none", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
                so = ort.SessionOptions()
                so.graph_optimization_level = opt
                got = ort.InferenceSession(str(Path(tmp) / "m.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
                d = np.abs(got - ref)
                same = int((got.argmax(1) == ref.argmax(1)).sum())
                print(f"| {name} | {level} | {int((d > 1e-4).sum())} of {d.size} | {d.max():.3g} | {same} of {len(x)} |")


if __name__ == "__main__":
    main()
