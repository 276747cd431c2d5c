"""Method coverage: every registered method on every torchvision classifier and a sample of timm.

Each cell is one method (each pruning criterion its own) at its middle settings on one base model
at a small input size, judged by :func:`automl._coverage.check_cell`: supports / dry-run apply /
forward / output shape / ONNX export through the trial's artifact path / ONNX Runtime against
PyTorch (relative to the largest logit, within :func:`automl._coverage.ort_tolerance` of the base's
own difference) / parameters before and after, with each failure's reason.
The base is made input dependent first (BatchNorm statistics from the inputs, see
:func:`automl._coverage.input_dependent`).

Models run smallest first (parameter count, both libraries merged), so a sweep cut short has
covered the most models. Each model runs in its own subprocess (``--jobs`` of them at once); a cell
that exceeds ``--cell-timeout`` is recorded as ``timeout`` and the model's remaining cells go on in
a fresh subprocess. Writes ``cells.csv``, ``cells.json`` and ``coverage.md`` (per-method counts:
works / n/a / fails / timeout, then every failure and every n/a reason) into ``--out``;
``cells.json`` is rewritten after every model, and ``--resume`` skips the models it already holds,
so a long sweep can be stopped and continued.

    python benchmarks/method_coverage.py --models all --jobs 2 --out coverage
    python benchmarks/method_coverage.py --models torchvision --limit 15 --methods prune,tucker
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

#: timm models across families (at least 40): ResNet / ResNet-D, EfficientNet(V2), MobileNetV2/V3,
#: GhostNet, RegNet, ConvNeXt, RepVGG, FastViT, DenseNet, DLA, MixNet, MNASNet, LCNet, ReXNet, VGG...
TIMM_MODELS = [
    "resnet18", "resnet10t", "resnet18d", "resnet26d", "resnet34d", "resnet50d", "seresnet18", "resnext26ts",
    "efficientnet_b0", "efficientnet_lite0", "efficientnet_es", "tf_efficientnet_b0", "efficientnetv2_rw_t",
    "tf_efficientnetv2_b0",
    "mobilenetv2_050", "mobilenetv2_100", "mobilenetv3_small_050", "mobilenetv3_small_100",
    "mobilenetv3_large_100", "tf_mobilenetv3_small_minimal_100",
    "ghostnet_050", "ghostnet_100", "ghostnetv2_100",
    "regnetx_002", "regnetx_004", "regnety_002", "regnety_004",
    "convnext_atto", "convnext_femto", "convnextv2_atto",
    "repvgg_a0", "repvgg_b0",
    "fastvit_t8", "fastvit_t12",
    "densenet121", "dla34", "dla46_c", "mixnet_s", "mnasnet_small", "mnasnet_100", "lcnet_050", "lcnet_100",
    "rexnet_100", "skresnet18", "vgg11", "cspresnet50",
]
MARK = "@@CELL "


def torchvision_models() -> dict[str, int]:
    """Every torchvision classifier with its parameter count (from its weights' metadata), smallest first."""
    import torchvision

    def params(name: str) -> int:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])

    names = sorted(torchvision.models.list_models(module=torchvision.models), key=params)
    return {f"torchvision:{n}": params(n) for n in names}


def timm_models() -> dict[str, int]:
    """:data:`TIMM_MODELS` that this timm has, with parameter counts (built on the meta device), smallest first."""
    import timm
    import torch

    known = set(timm.list_models())
    counts = {}
    for name in TIMM_MODELS:
        if name in known:
            with torch.device("meta"):
                counts[f"timm:{name}"] = sum(p.numel() for p in timm.create_model(name).parameters())
    return dict(sorted(counts.items(), key=lambda kv: kv[1]))


def worker(model_name: str, labels: list[str], size: int) -> None:
    """Build the base once, then print one marked JSON line per cell (parent reads them as they come)."""
    import torch

    from automl._coverage import Cell, check_cell, input_dependent, ort_rel_diff, variants
    from automl._models import build_model

    torch.set_num_threads(1)
    wanted = {v[0]: v for v in variants() if v[0] in labels}
    shape = (3, size, size)
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        options = {"image_size": size} if model_name.startswith("torchvision:vit_") else None
        base = build_model(model_name, input_shape=shape, num_classes=10, options=options)
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
        spread = input_dependent(base, x)
        base_diff = ort_rel_diff(base, x)[2]  # sets every cell's ONNX Runtime tolerance
    except Exception as exc:  # noqa: BLE001 - the model itself does not build (or export) at this size
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:250]}"
        print(MARK + json.dumps({"base": "fails", "reason": reason, "seconds": time.perf_counter() - start}), flush=True)
        return
    print(MARK + json.dumps({"base": "ok", "spread": spread, "ort_rel_diff": base_diff, "seconds": time.perf_counter() - start}), flush=True)
    for label in labels:
        _, method, fixed = wanted[label]
        try:
            cell = check_cell(model_name, base, x, label, method, fixed, base_diff=base_diff)
        except BaseException as exc:  # noqa: BLE001 - check_cell catches the method's errors; this is the harness's
            cell = Cell(model=model_name, method=label, status="fails", step="harness", reason=f"{type(exc).__name__}: {exc}"[:300])
        print(MARK + json.dumps(cell.as_dict()), flush=True)


def run_model(model_name: str, labels: list[str], size: int, cell_timeout: float, base_timeout: float) -> tuple[dict, list[dict]]:
    """Every cell of one model, each in a subprocess with a deadline; a stuck cell becomes ``timeout``."""
    cells: list[dict] = []
    base: dict = {}
    todo = list(labels)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    while todo:
        cmd = [sys.executable, __file__, "--worker", model_name, "--methods", ",".join(todo), "--size", str(size)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        buf = b""
        deadline = time.monotonic() + base_timeout + cell_timeout
        got_base = False
        while True:
            left = deadline - time.monotonic()
            ready = select.select([proc.stdout], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                proc.kill()
                proc.wait()
                if not got_base:
                    base = {"base": "timeout", "reason": f"building the base took over {base_timeout:.0f} s"}
                    return base, cells
                cells.append({"model": model_name, "method": todo.pop(0), "status": "timeout", "step": "", "reason": f"over {cell_timeout:.0f} s"})
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:  # the worker ended
                proc.wait()
                if todo and got_base:
                    cells.append({"model": model_name, "method": todo.pop(0), "status": "fails", "step": "crash", "reason": f"the process died (exit {proc.returncode})"})
                elif not got_base:
                    return {"base": "fails", "reason": f"the process died (exit {proc.returncode})"}, cells
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.startswith(MARK.encode()):
                    continue
                record = json.loads(line[len(MARK):])
                if "base" in record:
                    base, got_base = record, True
                    if record["base"] != "ok":
                        proc.wait()
                        return base, cells
                else:
                    cells.append(record)
                    todo.remove(record["method"])
                deadline = time.monotonic() + cell_timeout
            if not todo:
                proc.wait()
                break
    return base, cells


def table(cells: list[dict], labels: list[str], bases: dict[str, dict]) -> str:
    """Markdown: per-method counts, then each failure and each n/a reason with its models."""
    counts = {label: collections.Counter() for label in labels}
    names = collections.Counter(m.split(":", 1)[-1] for m in bases)

    def short(model: str) -> str:
        """The name without its library, where no model of the other library has it."""
        name = model.split(":", 1)[-1]
        return name if names[name] == 1 else model
    for c in cells:
        counts[c["method"]][c["status"]] += 1
    ok = [m for m, b in bases.items() if b.get("base") == "ok"]
    lines = [
        f"Models whose base builds at this size: {len(ok)} of {len(bases)}.", "",
        "| method | works | n/a | fails | timeout | works / applicable |", "|---|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        n = counts[label]
        applicable = n["works"] + n["fails"] + n["timeout"]
        share = f"{n['works'] / applicable:.0%}" if applicable else "-"
        lines.append(f"| {label} | {n['works']} | {n['n/a']} | {n['fails']} | {n['timeout']} | {share} |")
    for title, statuses in (("Failures (supports() said yes)", ("fails", "timeout")), ("Not applicable (supports()'s reason)", ("n/a",))):
        grouped: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        for c in cells:
            if c["status"] in statuses:
                # A reason naming its own model ("timm:x is not declared to scale") groups with the others.
                reason = c["reason"].replace(c["model"], "the model")
                grouped[(c["method"], f"{c['status']} at {c.get('step') or '-'}: {reason}")].append(c["model"])
        lines += ["", f"**{title}**", ""]
        lines += [f"- {m}: {r} ({len(ms)}: {', '.join(short(x) for x in ms)})" for (m, r), ms in sorted(grouped.items())] or ["- none"]
    failed = {m: b for m, b in bases.items() if b.get("base") != "ok"}
    if failed:
        lines += ["", "**Bases that do not build at this size (no cell counted)**", ""]
        lines += [f"- {m}: {b.get('reason', b.get('base'))}" for m, b in sorted(failed.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", choices=("torchvision", "timm", "all"), default="all")
    ap.add_argument("--limit", type=int, default=None, help="the N smallest models of each library")
    ap.add_argument("--only", default=None, help="comma-separated model names (e.g. torchvision:resnet18), instead of --models")
    ap.add_argument("--methods", default=None, help="comma-separated methods or variants (prune:l1); default every registered method, prune per criterion")
    ap.add_argument("--size", type=int, default=64, help="input side in pixels (3 x size x size)")
    ap.add_argument("--cell-timeout", type=float, default=120.0, help="seconds a cell may take before it is recorded as timeout")
    ap.add_argument("--base-timeout", type=float, default=120.0, help="seconds to build a base and set its BatchNorm statistics")
    ap.add_argument("--out", type=Path, default=Path("method_coverage"))
    ap.add_argument("--jobs", type=int, default=1, help="models swept at once, each in its own processes (at most the cores)")
    ap.add_argument("--stop-after", type=float, default=None, help="minutes after which no further model starts (the table lists those not swept)")
    ap.add_argument("--resume", action="store_true", help="keep the models already in OUT/cells.json and sweep the rest")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    from automl._coverage import variants

    all_labels = [v[0] for v in variants()]
    if args.methods:
        asked = [m.strip() for m in args.methods.split(",") if m.strip()]
        labels = [lab for lab in all_labels if lab in asked or lab.split(":")[0] in asked]
        unknown = [m for m in asked if not any(lab == m or lab.split(":")[0] == m for lab in all_labels)]
        if unknown:
            ap.error(f"--methods: unknown {unknown}; allowed: {', '.join(all_labels)}")
    else:
        labels = all_labels
    if args.worker:
        worker(args.worker, labels, args.size)
        return

    if args.only:
        models = [m.strip() for m in args.only.split(",") if m.strip()]
    else:
        sizes: dict[str, int] = {}
        if args.models in ("torchvision", "all"):
            sizes.update(list(torchvision_models().items())[: args.limit])
        if args.models in ("timm", "all"):
            sizes.update(list(timm_models().items())[: args.limit])
        models = sorted(sizes, key=sizes.get)
    args.out.mkdir(parents=True, exist_ok=True)
    cells: list[dict] = []
    bases: dict[str, dict] = {}
    done_file = args.out / "cells.json"
    if args.resume and done_file.exists():
        done = json.loads(done_file.read_text())
        if done.get("size") != args.size:
            ap.error(f"--resume: {done_file} was swept at --size {done.get('size')}, not {args.size}")
        bases, cells = done["bases"], done["cells"]
        print(f"resuming: {len(bases)} models already in {done_file}", flush=True)
    todo = [m for m in models if m not in bases]
    lock = threading.Lock()

    began = time.monotonic()
    skipped: list[str] = []

    def one(model: str) -> None:
        if args.stop_after is not None and time.monotonic() - began > 60 * args.stop_after:
            with lock:
                skipped.append(model)
            return
        start = time.perf_counter()
        base, got = run_model(model, labels, args.size, args.cell_timeout, args.base_timeout)
        summary = collections.Counter(c["status"] for c in got)
        with lock:
            bases[model] = base
            cells.extend(got)
            print(f"[{len(bases)}/{len(models)}] {model}: base {base.get('base')} {dict(summary)} ({time.perf_counter() - start:.0f} s)", flush=True)
            tmp = done_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"size": args.size, "bases": bases, "cells": cells}, indent=1))
            tmp.replace(done_file)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one, m) for m in todo]:
            future.result()
    order = {m: i for i, m in enumerate(models)}
    cells.sort(key=lambda c: (order.get(c["model"], len(order)), labels.index(c["method"]) if c["method"] in labels else len(labels)))
    fields = ["model", "method", "status", "step", "reason", "params_base", "params_after", "rel_diff", "seconds"]
    with open(args.out / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(cells)
    md = table(cells, labels, bases)
    if skipped:
        skipped.sort(key=order.get)
        md += f"\n**Not swept** (no model starts after --stop-after {args.stop_after:g} min): {len(skipped)}: {', '.join(skipped)}\n"
    (args.out / "coverage.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
