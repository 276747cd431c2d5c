"""GPU placement on a CPU-only machine: Ray's logical GPUs (a local Ray started with ``num_gpus``).

Four trials at ``resources.gpus: 0.25`` must share one (logical) GPU at the same time, each handed
its GPU id by Ray; as torch finds no CUDA, each trial (and the base, trained as a Ray task with the
same resources) records that it fell back to the CPU.
"""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from automl import parse_config, run_search


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_four_trials_share_one_logical_gpu_at_once_and_record_the_cpu_fallback(tmp_path, monkeypatch, ray_session):
    import ray

    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    monkeypatch.setenv("AUTOML_RENDEZVOUS", str(arrivals))
    monkeypatch.setenv("AUTOML_RENDEZVOUS_N", "4")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = parse_config(
        {
            "name": "gpus",
            "plugins": ["tests.fixtures.rendezvous"],
            "dataset": {"name": "digits"},
            "base": {"model": "digits_cnn", "epochs": 1, "options": {"width": 0.25}},
            "methods": {"rendezvous": {}},
            "finetune": {"distill": [False]},
            "budget": {"trials": 4, "epochs": 0},
            "resources": {"cpus": 0.5, "gpus": 0.25},
            "latency": {"warmup": 1, "repeats": 3, "min_attempts": 1, "max_attempts": 1, "drift_check": False, "isolate": False},
            "output_dir": str(tmp_path / "runs"),
        }
    )
    ray.shutdown()
    # Two CPUs' worth of slots at 0.5 each, one logical GPU at 0.25 each: four trials fit at once.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        study = run_search(cfg, log=lambda _m: None)
    finally:
        ray.shutdown()
    trials = study.get_trials()
    failed = [t.user_attrs.get("fail_reason") for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4 and not failed, f"{len(trials)} trials, failures: {failed}"
    assert len(list(arrivals.iterdir())) == 4, f"arrivals {sorted(p.name for p in arrivals.iterdir())}"
    for t in trials:
        notes = t.user_attrs["notes"]
        assert notes.get("gpu_ids") == ["0"], f"trial {t.number} was not handed GPU 0: {notes}"
        assert notes.get("device") == "cpu" and "no CUDA" in notes.get("gpu_fallback", ""), f"trial {t.number} did not record the CPU fallback: {notes}"
    base = json.loads((cfg.study_dir / "base" / "base.json").read_text())
    assert base.get("gpu_ids") == ["0"] and "gpu_fallback" in base, f"the base was not trained as a Ray task with a GPU: {base}"
