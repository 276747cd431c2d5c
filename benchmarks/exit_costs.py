"""What deciding to stop costs in the ONNX artifact, and what a sample leaving at each exit costs.

For a base model and its ``exits`` and ``glance`` forms (untrained: only costs are measured), the
artifacts the study ships are built and timed by ONNX Runtime (1 thread, batch 1) on generated
images (``dynamic_images.py``), per sample by the study's own function.

1. Every sample runs everything (no threshold reached: the most exit machinery a sample can pay).
   Each dynamic artifact is timed twice: as shipped (each initializer inside the ``If`` branch that
   reads it, :func:`automl._onnx._scope_initializers`) and with every initializer in the main graph,
   as the exporter writes it. ONNX Runtime's per-kernel profile is summed per op type and grouped
   into the backbone (convolutions, pooling, residual adds, layout reorders), the exit heads (pooling
   matmuls, linear layers) and the decision (softmax, max, compare, Where, casts); ``If`` nodes are
   left out of the sums (their time includes their branch's kernels).
2. Every sample leaves at exit k, for each k: the latency and MACs of that path beside the base's.
   A dynamic model pays off only where the samples that leave early skip stages that cost much
   more than the heads and decisions they run.

Timings are medians over ``--rounds`` rounds, the artifacts interleaved within each round. On a
shared machine the load moves between artifacts even so; the first table therefore also gives the
paired ratio: each image run by every artifact in turn (the order rotated), and the median over
images and rounds of each run's time over the base's on the same image.

    python benchmarks/exit_costs.py --model resnet18 --size 64 --samples 40
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

BACKBONE = {"Conv", "FusedConv", "MaxPool", "Add", "Relu", "BatchNormalization", "AveragePool", "GlobalAveragePool", "ReorderInput", "ReorderOutput", "Resize", "GatherElements"}
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


def hoist(src: Path, dst: Path) -> int:
    """Write ``src`` with every subgraph initializer moved to the main graph (the exporter's layout)."""
    import onnx

    model = onnx.load(str(src))
    moved = 0

    def walk(graph) -> None:
        nonlocal moved
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    walk(sub)
                    for init in list(sub.initializer):
                        model.graph.initializer.append(init)
                        sub.initializer.remove(init)
                        moved += 1

    walk(model.graph)
    onnx.save(model, str(dst))
    return moved


def paired_ratios(paths: dict[str, Path], inputs, rounds: int) -> dict[str, float]:
    """Median over images and rounds of an artifact's time on an image over the base's on it, the
    artifacts run one after another on each image (order rotated), so slow load changes cancel."""
    import statistics
    import time

    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = list(paths)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):  # the first round warms up
        for i in range(len(inputs)):
            feed = inputs[i : i + 1].numpy()
            for n in names[r % len(names):] + names[: r % len(names)]:
                s = sessions[n]
                t0 = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: feed})
                if r:
                    times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(a / b for a, b in zip(times[n], times["base"])) for n in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--exits", type=int, default=3, help="intermediate exits, after whole stages")
    p.add_argument("--scale", type=float, default=0.5, help="glance: its resolution, a fraction of the input's")
    p.add_argument("--crop", type=float, default=0.5, help="glance: the focus patch's side, a fraction of the input's")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    import statistics

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dynamic_images import generate

    from automl import build_model
    from automl._artifact import _onnx_artifact, build_artifact
    from automl._latency import LatencySettings
    from automl._measure import count_macs
    from automl._target import time_artifact
    from searchspace import ApplyContext, get_method
    from searchspace.methods.exits import NEVER

    shape = (3, a.size, a.size)
    torch.manual_seed(0)
    base = build_model(a.model, input_shape=shape, num_classes=10).eval()
    x, _ = generate(a.samples, size=a.size, seed=7)
    inputs = (torch.from_numpy(x) - 0.5) / 0.25
    example = inputs[:1]
    dynamic = {
        "exits": get_method("exits")().apply(base, dict(points="stages", count=a.exits, head="avgpool", pool=1, training="frozen", thresholds="budget", q=1.0), context=ApplyContext(example_input=example)),
        "glance": get_method("glance")().apply(base, dict(scale=a.scale, crop=a.crop, thresholds="budget", q=1.0), context=ApplyContext(example_input=example)),
    }
    settings = LatencySettings(batch_size=1, threads=1, warmup=3, repeats=5, isolate=False, min_attempts=1, max_attempts=1)
    base_macs = count_macs(base, example)

    def leave_at(model: torch.nn.Module, k: int) -> None:
        """Every sample leaves at exit k (k = last: every sample runs everything)."""
        t = [NEVER] * (len(model.thresholds) - 1) + [-float("inf")]
        t[k] = -float("inf")
        model.thresholds.copy_(torch.tensor(t))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arts: dict[str, object] = {"base": build_artifact(base, example, tmp / "base")}
        paths = {"base": tmp / "base" / "model.onnx"}
        per_exit: dict[str, list[tuple[str, int]]] = {}
        moved = {}
        for label, model in dynamic.items():
            last = len(model.thresholds) - 1
            leave_at(model, last)
            arts[label] = build_artifact(model.eval(), example, tmp / label)
            paths[label] = tmp / label / "model.onnx"
            hoisted = tmp / f"{label}-main.onnx"
            moved[label] = hoist(paths[label], hoisted)
            arts[f"{label}, weights in main graph"] = _onnx_artifact(hoisted, "cpu", 1)
            paths[f"{label}, weights in main graph"] = hoisted
            macs = [count_macs(m, example) for m in model.exit_paths()]
            per_exit[label] = []
            for k in range(last + 1):
                name = f"{label} leaving at exit {k}" if label == "exits" else f"glance: {'glance only' if k == 0 else 'glance + focus'}"
                leave_at(model, k)
                arts[name] = arts[label] if k == last else build_artifact(model.eval(), example, tmp / f"{label}-{k}", like=tmp / label)
                per_exit[label].append((name, macs[k]))
        times: dict[str, list[float]] = {name: [] for name in arts}
        for r in range(a.rounds):
            order = list(arts) if r % 2 == 0 else list(arts)[::-1]
            for name in order:
                times[name].append(time_artifact(arts[name], inputs, settings, per_sample=True).median_ms)
        ms = {name: statistics.median(v) for name, v in times.items()}
        profiles = {name: kernel_us(path, inputs, tmp / f"profile-{i}") for i, (name, path) in enumerate(paths.items())}
        paired = paired_ratios(paths, inputs, 2 * a.rounds)

    b = ms["base"]
    print(f"{a.model} at {a.size} px, ONNX Runtime 1 thread, batch 1, {a.samples} generated images, "
          f"per-sample mean latency, median of {a.rounds} rounds; exits after {a.exits} stages, glance scale {a.scale}, crop {a.crop}\n")
    print("Every sample runs everything (kernel sums from ONNX Runtime's profile, us per sample):\n")
    print("| artifact | backbone us | exit heads us | decision us | other us | per-sample latency ms | ratio to base | paired ratio to base |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, us in profiles.items():
        g = grouped(us)
        print(f"| {name} | {g['backbone']:.0f} | {g['head']:.0f} | {g['decision']:.0f} | {g['other']:.0f} | {ms[name]:.3f} | {ms[name] / b:.2f} | {paired[name]:.3f} |")
    print("\n(" + "; ".join(f"{label}: {n} initializers moved back to the main graph" for label, n in moved.items()) + ")")
    print("\nEvery sample leaves at one exit (as shipped):\n")
    print("| path | per-sample latency ms | latency / base | MACs | MACs / base |")
    print("|---|---:|---:|---:|---:|")
    print(f"| base | {b:.3f} | 1.00 | {base_macs / 1e6:.1f} M | 1.00 |")
    for rows in per_exit.values():
        for name, macs in rows:
            print(f"| {name} | {ms[name]:.3f} | {ms[name] / b:.2f} | {macs / 1e6:.1f} M | {macs / base_macs:.2f} |")
    print()
    for name, us in profiles.items():
        print(f"{name}: " + ", ".join(f"{op} {t:.0f}" for op, t in sorted(us.items(), key=lambda kv: -kv[1])[:12]))


if __name__ == "__main__":
    main()
