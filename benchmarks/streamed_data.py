"""Streamed ImageFolder studies: peak memory of the whole process tree and time to the
first trial (``study`` mode), and a trial's training throughput against a plain PyTorch
``DataLoader`` loop on the same data and model (``throughput`` mode).

Data: ``benchmarks/make_imagefolder.py`` (generated locally, nothing downloaded).

    python benchmarks/make_imagefolder.py data/if15k --train 12500 --test 2500
    python benchmarks/make_imagefolder.py data/if60k --train 50000 --test 10000
    python benchmarks/streamed_data.py study data/if15k data/if60k --image-size 32
    python benchmarks/streamed_data.py throughput data/if60k --images 4000 --repeats 3

Memory is the sum of PSS (proportional set size: shared pages split between the processes that
map them, so forked workers are not double counted) over the launcher and all its descendants
(Ray's GCS and raylet, trial workers, DataLoader workers), sampled every 0.5 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in cmd if w]
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    return " ".join(Path(w).name if "/" in w else w for w in words[:3])[:60]


def tree_pss_mb(root: int) -> tuple[float, int, dict[str, float]]:
    """(PSS of ``root`` and its descendants in MiB, number of processes, MiB by process name)."""
    tree, todo, total, count = _children(), [root], 0, 0
    by_name: dict[str, float] = {}
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    kb = int(line.split()[1])
                    total += kb
                    count += 1
                    name = _name(pid)
                    by_name[name] = by_name.get(name, 0) + kb / 1024
                    break
        except OSError:
            continue
    return total / 1024, count, by_name


def _kind(name: str) -> str:
    """The kind of a process: trial workers, DataLoader workers and Ray's own processes by their role."""
    for prefix in ("ray::", "raylet", "gcs_server", "python -m automl"):
        if name.startswith(prefix):
            return name.split()[0] if prefix == "ray::" else prefix
    return "other"


def run_study(root: str, image_size: int, work: Path, trials: int, train_cap: int, model: str = "digits_cnn", concurrent: int | None = None, val_fraction: float = 0.15) -> dict:
    options = {"width": 0.5} if model == "digits_cnn" else {}
    cfg = {
        "name": f"bench12_{Path(root).name}",
        "dataset": {"name": "imagefolder", "root": root, "image_size": image_size, "workers": 2, "max_train_samples": train_cap, "val_fraction": val_fraction},
        "base": {"model": model, "options": options, "epochs": 1},
        "methods": {"none": {}, "tucker": {}},
        "objectives": ["accuracy", "size_bytes"],
        "budget": {"trials": trials, "epochs": 1, "batch_size": 128},
        "resources": {"cpus": 1, "max_concurrent": concurrent},
        "latency": {"warmup": 1, "repeats": 3, "drift_check": False},
        "output_dir": str(work / "runs"),
    }
    config = work / f"{cfg['name']}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "automl", "launch", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    peak: dict = {"mb": 0.0, "procs": 0, "by_name": {}}
    #: The peak of each kind of process on its own (summed over the processes of that kind at a
    #: sample), so a kind that grows with the data shows even when the peaks fall at other times.
    kinds: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            mb, n, by_name = tree_pss_mb(proc.pid)
            if mb > peak["mb"]:
                peak.update(mb=mb, procs=n, by_name=by_name)
            now: dict[str, float] = {}
            for name, v in by_name.items():
                now[_kind(name)] = now.get(_kind(name), 0.0) + v
            for k, v in now.items():
                kinds[k] = max(kinds.get(k, 0.0), v)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first_trial = base_done = None
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line.rstrip())
        now = time.monotonic() - start
        if base_done is None and line.startswith("base: accuracy"):
            base_done = now
        if first_trial is None and line.startswith("[1/"):
            first_trial = now
    rc = proc.wait()
    done.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"study on {root} failed ({rc}):\n" + "\n".join(lines[-20:]))
    n_files = sum(1 for _ in Path(root).rglob("*.png"))
    return {
        "root": root, "images": n_files, "image_size": image_size, "peak_pss_mib": round(peak["mb"]),
        "processes_at_peak": peak["procs"],
        "largest_at_peak_mib": {k: round(v) for k, v in sorted(peak["by_name"].items(), key=lambda kv: -kv[1])[:6]},
        "peak_by_kind_mib": {k: round(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "model": model, "concurrent": concurrent, "val_fraction": val_fraction,
        "base_ready_s": round(base_done or -1, 1),
        "first_trial_s": round(first_trial or -1, 1), "total_s": round(time.monotonic() - start, 1),
    }


def throughput(root: str, image_size: int, images: int, repeats: int, batch: int, model_name: str = "digits_cnn") -> dict:
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch.utils.data import DataLoader, Subset

    from automl import build_model
    from automl._data import load_dataset, transforms_for
    from automl._latency import gated_batches
    from automl._train import TrainOptions, fit

    torch.set_num_threads(1)  # a trial at resources.cpus 1
    splits = load_dataset("imagefolder", root=root, image_size=image_size, workers=2, max_train_samples=images)
    train_tf, _ = transforms_for("imagefolder", image_size=image_size, augment="auto")
    plain_ds = Subset(torchvision.datasets.ImageFolder(str(Path(root) / "train"), transform=train_tf), splits.train.indices)

    def model():
        torch.manual_seed(0)
        options = {"width": 0.5} if model_name == "digits_cnn" else {}
        return build_model(model_name, input_shape=splits.input_shape, num_classes=10, options=options)

    def ours() -> float:
        m = model()
        t = time.perf_counter()
        fit(m, gated_batches(splits), TrainOptions(epochs=1, lr=1e-3, batch_size=batch))  # what a trial runs
        return len(plain_ds) / (time.perf_counter() - t)

    def plain() -> float:
        m = model().train()
        t = time.perf_counter()
        loader = DataLoader(plain_ds, batch_size=batch, shuffle=True, num_workers=2, prefetch_factor=4)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=len(loader))
        for x, y in loader:
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return len(plain_ds) / (time.perf_counter() - t)

    runs: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        runs["plain"].append(plain())
        runs["ours"].append(ours())
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "root": root, "model": model_name, "train_images": len(plain_ds), "image_size": image_size, "batch": batch,
        "ours_img_s": [round(v) for v in runs["ours"]], "plain_img_s": [round(v) for v in runs["plain"]],
        "median_ratio": round(med["ours"] / med["plain"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["study", "throughput"])
    p.add_argument("roots", nargs="+")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--train-cap", type=int, default=2000, help="dataset.max_train_samples (bounds the run time)")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--model", default="digits_cnn", help="base model (both modes), e.g. resnet18")
    p.add_argument("--val-fraction", type=float, default=0.15, help="dataset.val_fraction (study mode)")
    p.add_argument("--concurrent", type=int, default=None, help="resources.max_concurrent (study mode; default: as many as fit)")
    a = p.parse_args()
    for root in a.roots:
        if a.mode == "study":
            with tempfile.TemporaryDirectory() as tmp:
                print(json.dumps(run_study(root, a.image_size, Path(tmp), a.trials, a.train_cap, a.model, a.concurrent, a.val_fraction)), flush=True)
        else:
            print(json.dumps(throughput(root, a.image_size, a.images, a.repeats, a.batch, a.model)), flush=True)


if __name__ == "__main__":
    main()
