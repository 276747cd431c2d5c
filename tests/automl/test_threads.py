"""The thread plan: derived from the config with known answers, set in the launcher and in every
trial process, one thread per data-loader worker (automl._threads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from torch.utils.data import Dataset

from automl import parse_config, run_search
from automl._data import Splits, loader_workers
from automl._threads import ThreadPlan, training_threads

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, *, cpus: float = 1, threads: int = 1, dataset: str = "digits", workers: int = 2, trials: int = 2):
    return parse_config(
        {
            "name": "threads",
            "dataset": {"name": dataset, "workers": workers, **({"root": str(tmp_path)} if dataset != "digits" else {})},
            "base": {"model": "digits_cnn", "epochs": 2, "options": {"width": 0.5}},
            "methods": {"none": {}, "tucker": {}},
            "budget": {"trials": trials, "epochs": 1},
            "sampler": {"name": "random", "seed": 0},
            "resources": {"cpus": cpus},
            "latency": {"threads": threads, "warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1},
            "output_dir": str(tmp_path / "runs"),
        }
    )


@pytest.mark.parametrize(("cpus", "threads"), [(0.25, 1), (0.5, 1), (1, 1), (2, 2), (3, 3), (16, 16)])
def test_training_threads_are_the_whole_cpus_at_least_one(cpus, threads):
    assert training_threads(cpus) == threads, f"resources.cpus {cpus} must give {threads} training threads, got {training_threads(cpus)}"


def test_the_plan_follows_the_config_and_warns_past_the_cores(tmp_path):
    plan = ThreadPlan.from_config(_config(tmp_path, cpus=2, threads=3))
    # digits is held in memory: no DataLoader, so dataset.workers (2) starts no worker.
    assert plan == ThreadPlan(training=2, data_workers=0, timing=3), plan
    assert plan.warnings(cores=4) == [], f"2 training and 3 timing threads fit 4 cores: {plan.warnings(4)}"
    training, timing = plan.warnings(cores=1.5)
    assert "resources.cpus" in training and "1.5 cores" in training, training
    assert "latency.threads" in timing and "3 threads" in timing, timing
    (timing_only,) = plan.warnings(cores=2)
    assert "latency.threads" in timing_only, f"2 training threads fit 2 cores, 3 timing threads do not: {timing_only}"
    streamed = ThreadPlan.from_config(_config(tmp_path, cpus=2, dataset="cifar10", workers=3))
    assert streamed.data_workers == 3 == loader_workers("cifar10", 3), streamed
    (both,) = streamed.warnings(cores=4)
    assert "5 threads in all" in both and "dataset.workers" in both, f"2 training threads + 3 workers exceed 4 cores: {both}"
    assert "3 data-loader workers" in streamed.describe() and "training 2" in streamed.describe(), streamed.describe()


def test_set_threads_sets_torch_and_the_child_environment_and_may_run_twice():
    # A fresh process: the inter-op pool can be sized only once per process, and a second plan
    # (a reused Ray worker, a second study in one launcher) must not crash on it.
    code = (
        "import os, torch\n"
        "from automl._threads import set_threads\n"
        "a = set_threads(1); b = set_threads(2)\n"
        "print(a, b, torch.get_num_threads(), torch.get_num_interop_threads(), os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True).stdout.split()
    assert out == ["1", "2", "2", "1", "2", "2"], f"(first, second, intra-op, inter-op, OMP, MKL) = {out}"


class _ThreadCount(Dataset):
    """Each sample is the PyTorch thread count of the process that loads it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(torch.get_num_threads())]), 0


def test_each_data_loader_worker_computes_with_one_thread():
    ds = _ThreadCount()
    splits = Splits("counts", ds, ds, ds, num_classes=1, input_shape=(1,), workers=2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = torch.cat([x for x, _ in splits.batches("train", 2)]).flatten().tolist()
    finally:
        torch.set_num_threads(before)
    assert seen == [1.0] * 8, f"DataLoader workers of a 2-thread process must compute with 1 thread each, got {seen}"


def test_base_and_trials_train_with_the_configured_threads(tmp_path, ray_session):
    import ray

    # Timing asks for one thread more than the machine has (latency.threads allows 256 at most):
    # the launcher must warn.
    timing = min((os.cpu_count() or 1) + 1, 256)
    cfg = _config(tmp_path, cpus=1, threads=timing)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what PyTorch's default gives on two cores: the plan must replace it
    ray.shutdown()  # the study starts its own Ray, whose workers run at the launcher's niceness (Ray's default is 15)
    lines: list[str] = []
    try:
        study = run_search(cfg, log=lines.append)
    finally:
        torch.set_num_threads(before)
    plan_lines = [ln for ln in lines if ln.startswith("threads:")]
    assert plan_lines == [ThreadPlan(training=1, data_workers=0, timing=timing).describe()], f"the plan must be printed once: {lines}"
    base = json.loads((cfg.study_dir / "base" / "base.json").read_text())
    assert base.get("torch_threads") == 1, f"the base trained with {base.get('torch_threads')} threads, resources.cpus is 1: {base}"
    assert base.get("nice") == os.nice(0), f"the base trained at niceness {base.get('nice')}, the launcher runs at {os.nice(0)}"
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == cfg.budget.trials, [(t.state, t.user_attrs.get("fail_reason")) for t in study.trials]
    for t in complete:
        notes = t.user_attrs["notes"]
        assert notes.get("torch_threads") == 1, f"trial {t.number} trained with {notes.get('torch_threads')} threads, resources.cpus is 1: {notes}"
        assert notes.get("nice") == os.nice(0), f"trial {t.number} ran at niceness {notes.get('nice')}, the launcher at {os.nice(0)}: {notes}"
    ray_cores = ray.cluster_resources().get("CPU", 0)
    warned = [ln for ln in lines if ln.startswith("warning:") and "latency.threads" in ln]
    assert bool(warned) == (timing > ray_cores), f"latency.threads {timing} against {ray_cores} cores Ray sees; warnings: {warned}"
