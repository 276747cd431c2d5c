"""User code next to the config: importable at launch, shipped to Ray workers, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

MODELS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """Defined here only: a worker can unpickle the base model only if this module reaches it."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build(input_shape, num_classes, **options):
    return TinyNet(num_classes)
'''

DATA = '''
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset


class Digits(Dataset):
    def __init__(self, part):
        d = load_digits()
        n = len(d.target)
        keep = [i for i in range(n) if (i % 5 == 0) == (part == "test")]
        self.x = torch.tensor(d.images[keep] / 16.0, dtype=torch.float32)[:, None]
        self.targets = [int(d.target[i]) for i in keep]
        self.classes = list(range(10))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def build():
    return Digits("train"), Digits("test")
'''


def _project(tmp_path: Path, *, model: str = "mymodels:build", dataset: str = "mydata:build", trials: int = 1) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir(exist_ok=True)
    (proj / "mymodels.py").write_text(MODELS)
    (proj / "mydata.py").write_text(DATA)
    config = {
        "name": "usercode",
        "dataset": {"name": dataset, "workers": 0},
        "base": {"model": model, "epochs": 1},
        "methods": {"none": {}, "tucker": {}},
        "budget": {"trials": trials, "epochs": 1},
        "resources": {"cpus": 1},
        "latency": {"warmup": 1, "repeats": 3, "min_attempts": 1, "max_attempts": 1, "drift_check": False},
        "output_dir": str(tmp_path / "runs"),
    }
    (proj / "study.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    return proj / "study.yaml"


def _launch(tmp_path: Path, config: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    # From another folder, without PYTHONPATH: only the config's folder can make mymodels importable.
    return subprocess.run(
        [sys.executable, "-m", "automl", "launch", str(config)],
        cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize(
    "field,changes,says",
    [
        ("base.model", {"model": "mymodels:buidl"}, "has no function 'buidl'; it has: TinyNet, build"),
        ("base.model", {"model": "mymodelz:build"}, "module 'mymodelz' cannot be imported (ModuleNotFoundError"),
        ("dataset.name", {"dataset": "mydat:build"}, "module 'mydat' cannot be imported"),
    ],
)
def test_a_misspelt_reference_exits_2_with_one_line_and_writes_nothing(tmp_path, field, changes, says):
    proc = _launch(tmp_path, _project(tmp_path, **changes), timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr: {proc.stderr[-2000:]}"
    assert len(lines) == 1 and f": {field}: " in lines[0] and says in lines[0], f"expected one line naming {field}: {lines}"
    assert not (tmp_path / "runs").exists(), f"a bad config wrote {list((tmp_path / 'runs').rglob('*'))}"


@pytest.mark.slow
def test_a_study_whose_model_and_data_live_in_the_config_folder_runs(tmp_path):
    config = _project(tmp_path, trials=2)
    proc = _launch(tmp_path, config)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-3000:]} {proc.stderr[-3000:]}"
    study = optuna.load_study(study_name="usercode", storage=f"sqlite:///{tmp_path / 'runs' / 'usercode' / 'optuna.db'}")
    states = [t.state for t in study.trials]
    fails = [t.user_attrs.get("fail_reason") for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2, f"states {states}, failures {fails}"
    base = study.user_attrs["base"]
    # The user's model: TinyNet's closed-form count (conv 1*8*3*3 + 8, linear 8*8*8*10 + 10).
    assert base["params"] == 1 * 8 * 3 * 3 + 8 + 8 * 8 * 8 * 10 + 10, f"the base is not the user's TinyNet: {base}"
    # The user's dataset: its test split holds the digits with index % 5 == 0 (360 of 1,797).
    assert "test 360," in proc.stdout, f"the base did not train on the user's splits: {proc.stdout[-2000:]}"
    # Trained: above chance (0.1) by more than 3 standard errors of an untrained model on 360
    # samples (0.016 each). One epoch's level varies with the start (0.297 in one fresh-clone run),
    # so the bound is chance, not a level of accuracy.
    assert base["accuracy"] > 0.15, f"the user model on the user dataset stayed at chance: {base['accuracy']:.3f} after one epoch"
    assert "base: epoch 1/1 loss" in proc.stdout, f"no per-epoch progress line for the base: {proc.stdout[-2000:]}"
