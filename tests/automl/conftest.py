"""A small real study (Ray Tune x Optuna, SQLite), built once per test session and shared.

It enables every registered method that applies to the digits CNN and enqueues one trial per method
(Optuna's ``enqueue_trial``, which ``OptunaSearch`` honours through ``study.ask()``), so each method
family that exists has at least one trained, checkpointed trial for report and export tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import yaml

import searchspace
from automl import build_model, parse_config

#: Registered methods that can apply to the study's base model, with the stage that picks them.
BASE = ("digits_cnn", (1, 8, 8))


def applicable_methods() -> list[str]:
    base = build_model(BASE[0], input_shape=BASE[1], num_classes=10)
    return [n for n in searchspace.list_methods() if searchspace.get_method(n)().supports(base) is None]


def _enqueue_params(name: str) -> dict[str, str]:
    """The shortest chain holding ``name``: every other stage off, so each family is exported alone
    (a chain ending in int8 would make every family's ONNX check an int8 check)."""
    method = searchspace.get_method(name)
    chain = [name] if method.stage == searchspace.Stage.STRUCTURE else ["none", name]
    params = {"method": chain[0]}
    picked = [chain[0]]
    for stage in (searchspace.Stage.PRUNE, searchspace.Stage.QUANTIZE):
        key = f"{'+'.join(picked)}:{stage.param}"
        if method.stage == stage:
            params[key] = name
            picked.append(name)
        else:
            params[key] = "off"
    return params


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """(config, study folder) of a finished small study with one trial per applicable method."""
    from automl._search import run_search
    from automl._study import open_storage

    methods = applicable_methods()
    root = tmp_path_factory.mktemp("studies")
    cfg = parse_config(
        {
            "name": "tiny",
            "dataset": {"name": "digits"},
            "base": {"model": BASE[0], "epochs": 4, "lr": 0.003},
            "methods": {m: {} for m in methods},
            "objectives": ["accuracy", "size_bytes", "latency_ms"],
            "budget": {"trials": len(methods) + 1, "epochs": 1, "lr": 0.001},
            "sampler": {"name": "random", "seed": 0},
            "resources": {"cpus": 1},
            "latency": {"batch_size": 1, "threads": 1, "warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1},
            "output_dir": str(root),
        }
    )
    cfg.study_dir.mkdir(parents=True)
    study = optuna.create_study(
        storage=open_storage(cfg.storage_url),
        study_name=cfg.name,
        directions=[o.resolved_direction for o in cfg.objectives],
    )
    for m in methods:
        study.enqueue_trial(_enqueue_params(m))
    import ray

    try:
        run_search(cfg, log=lambda _m: None)
    finally:
        ray.shutdown()
    return cfg


def copy_study(cfg, dest: Path):
    """An independent copy of a study folder (own SQLite file), safe to damage in a test."""
    from automl import load_config

    target = dest / cfg.name
    shutil.copytree(cfg.study_dir, target, ignore=shutil.ignore_patterns("ray", "exports", "report*"))
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["output_dir"] = str(dest)
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return load_config(target / "config.yaml")
