"""What deciding to stop costs in the ONNX artifact: exit heads, confidence tests and If, per exit.

For a base model and its ``exits`` and ``glance`` forms (untrained: only costs are measured), the
artifacts the study ships are built, put in the setting where every sample runs everything (no
threshold reached: the most exit machinery a sample can pay), and profiled by ONNX Runtime (1
thread, batch 1) on generated images (``dynamic_images.py``). Kernel time is summed per op type and
grouped into the backbone (convolutions, pooling, residual adds), the exit heads (pooling matmuls,
linear layers) and the decision (softmax, max, compare, all, Where, casts); ``If`` nodes are left
out of the sums (their time includes their branch's kernels). The per-sample latency of each
artifact, timed by the study's own function, is printed beside. A dynamic model pays off only where
the decision plus the head at an exit cost much less than the stages a sample leaving there skips.

    python benchmarks/exit_costs.py --model resnet18 --size 64 --samples 50
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

BACKBONE = {"Conv", "MaxPool", "Add", "Relu", "BatchNormalization", "AveragePool", "GlobalAveragePool", "ReorderInput", "ReorderOutput", "Resize", "GatherElements"}
HEAD = {"MatMul", "Gemm", "ReduceMean", "Flatten", "Reshape", "LogSoftmax", "ReduceLogSumExp"}
DECISION = {"Softmax", "ReduceMax", "GreaterOrEqual", "ReduceMin", "Where", "Cast", "Identity", "Not", "And", "Unsqueeze", "Expand", "Concat", "Shape", "Squeeze"}


def kernel_us(path: Path, inputs, prefix: Path) -> dict[str, float]:
    """Mean kernel microseconds per run, by op type, over one run per input sample (If excluded)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for x in inputs[:5]:
        session.run(None, {name: x[None].numpy()})  # warm-up runs are profiled too: dropped below
    for x in inputs:
        session.run(None, {name: x[None].numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    start = runs[min(5, len(inputs))]["ts"] if len(runs) > 5 else 0
    total: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"].get("op_name", "?")
            if op != "If":
                total[op] += e["dur"] / len(inputs)
    return dict(total)


def grouped(us: dict[str, float]) -> dict[str, float]:
    out = {"backbone": 0.0, "head": 0.0, "decision": 0.0, "other": 0.0}
    for op, t in us.items():
        out["backbone" if op in BACKBONE else "head" if op in HEAD else "decision" if op in DECISION else "other"] += t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--exits", type=int, default=3, help="intermediate exits, after whole stages")
    a = p.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dynamic_images import generate

    from automl import build_model
    from automl._artifact import build_artifact
    from automl._latency import LatencySettings
    from automl._target import time_artifact
    from searchspace import ApplyContext, get_method
    from searchspace.methods.exits import NEVER

    shape = (3, a.size, a.size)
    torch.manual_seed(0)
    base = build_model(a.model, input_shape=shape, num_classes=10).eval()
    x, _ = generate(a.samples, size=a.size, seed=7)
    inputs = (torch.from_numpy(x) - 0.5) / 0.25
    ctx = ApplyContext(example_input=inputs[:1])
    models = {
        "base": base,
        "exits": get_method("exits")().apply(base, dict(points="stages", count=a.exits, head="avgpool", pool=1, training="frozen", thresholds="budget", q=1.0), context=ctx),
        "glance": get_method("glance")().apply(base, dict(scale=0.5, crop=0.5, thresholds="budget", q=1.0), context=ApplyContext(example_input=inputs[:1])),
    }
    settings = LatencySettings(batch_size=1, threads=1, warmup=3, repeats=5, isolate=False, min_attempts=1, max_attempts=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models.items():
            dynamic = label != "base"
            if dynamic:
                model.thresholds.fill_(NEVER)
                model.thresholds[-1] = -float("inf")
            art = build_artifact(model.eval(), inputs[:1], Path(tmp) / label)
            us = kernel_us(Path(tmp) / label / "model.onnx", inputs, Path(tmp) / f"{label}-profile")
            timing = time_artifact(art, inputs, settings, per_sample=True)
            rows.append((label, grouped(us), timing.median_ms, us))
    exits = a.exits
    print(f"{a.model} at {a.size} px, ONNX Runtime 1 thread, batch 1, {a.samples} generated images; every sample runs everything\n")
    print("| artifact | backbone us | exit heads us | decision us | other us | per-sample latency ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, g, ms, _ in rows:
        print(f"| {label} | {g['backbone']:.0f} | {g['head']:.0f} | {g['decision']:.0f} | {g['other']:.0f} | {ms:.3f} |")
    base_g, exit_g = rows[0][1], rows[1][1]
    extra = (exit_g["head"] - base_g["head"]) + (exit_g["decision"] - base_g["decision"])
    print(f"\nexits: head + decision per intermediate exit {extra / exits:.0f} us "
          f"({100 * extra / exits / max(base_g['backbone'], 1e-9):.1f} % of the base's backbone kernels)")
    for label, _, _, us in rows:
        print(f"{label}: " + ", ".join(f"{op} {t:.0f}" for op, t in sorted(us.items(), key=lambda kv: -kv[1])[:12]))


if __name__ == "__main__":
    main()
