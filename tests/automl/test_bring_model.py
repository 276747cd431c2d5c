"""A study from the checkpoint a user already has: a 1000-class torchvision or timm state dict on a
4-class image folder gets a new classifier, is fine-tuned with the base recipe and says so; a file
that does not fit is a one-line config error that writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import timm
import torch
import torchvision
import yaml
from PIL import Image

from automl._config import parse_config
from automl._data import dataset_from_config
from automl._study import prepare_base

CLASSES = 4


def _image_folder(root: Path, *, train: int = 6, test: int = 2, size: int = 16) -> Path:
    """``root/{train,test}/class_k/*.png``: each class its own colour gradient with noise."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for split, n in (("train", train), ("test", test)):
        for k in range(CLASSES):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            angle = 2 * np.pi * k / CLASSES
            base = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
            for i in range(n):
                rgb = np.stack([base, np.roll(base, k, axis=0), 1 - base], axis=-1)
                img = np.clip((rgb * 0.6 + 0.2 + rng.normal(0, 0.1, rgb.shape)) * 255, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def _config(tmp_path: Path, model: str, checkpoint: Path) -> dict:
    return {
        "name": "mine",
        "dataset": {"name": "imagefolder", "root": str(_image_folder(tmp_path / "images")), "image_size": 16, "workers": 0, "val_fraction": 0.25},
        "base": {"model": model, "checkpoint": str(checkpoint), "epochs": 1, "lr": 1e-3},
        "methods": {"none": {}},
        "budget": {"trials": 1, "epochs": 1, "batch_size": 8},
        "resources": {"cpus": 1},
        "latency": {"warmup": 1, "repeats": 3, "min_attempts": 1, "max_attempts": 1, "drift_check": False},
        "output_dir": str(tmp_path / "runs"),
    }


def _launch(tmp_path: Path, config: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "automl", "launch", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _close_to(trained: torch.Tensor, start: torch.Tensor, name: str) -> None:
    """Fine-tuned from ``start``: changed by training, yet far nearer to it than a fresh init would be."""
    assert not torch.equal(trained, start), f"{name} did not change: the model was not fine-tuned"
    cos = torch.nn.functional.cosine_similarity(trained.flatten(), start.flatten(), dim=0)
    assert cos > 0.9, f"{name} is not the checkpoint's fine-tuned (cosine {float(cos):.3f} to it)"


@pytest.mark.slow
def test_a_study_from_a_1000_class_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18()
    torch.save(r18.state_dict(), tmp_path / "r18.pt")
    proc = _launch(tmp_path, _config(tmp_path, "resnet18", tmp_path / "r18.pt"))
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-3000:]} {proc.stderr[-3000:]}"
    out = proc.stdout
    assert "its classifier (fc.weight, fc.bias) has 1000 classes, replaced by a new one of 4" in out, out[-3000:]
    assert "base: fine-tuning resnet18 for 1 epochs" in out and "base: epoch 1/1 loss" in out, out[-3000:]
    folder = tmp_path / "runs" / "mine" / "base"
    record = json.loads((folder / "base.json").read_text())
    assert record["start"] == {"source": f"checkpoint {tmp_path / 'r18.pt'}", "classifier_replaced": ["fc.weight", "fc.bias"], "file_classes": 1000, "num_classes": 4}, record
    assert record["train_seconds"] > 0, record
    weights = torch.load(folder / "weights.pt", weights_only=True)
    _close_to(weights["stages.0.0.weight"], r18.conv1.weight.detach(), "conv1.weight")
    assert weights["head.fc.weight"].shape == (CLASSES, 512)
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'runs' / 'mine' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE], [t.user_attrs.get("fail_reason") for t in study.trials]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,make,probe",
    [
        ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), ("stages.0.0.0.weight", "features.0.0.weight")),
        ("timm:resnet18", lambda: timm.create_model("resnet18"), ("stages.0.conv1.weight", "conv1.weight")),
    ],
    ids=["mobilenet_v3_small", "timm_resnet18"],
)
def test_the_base_of_a_1000_class_state_dict_is_fine_tuned_for_the_datasets_classes(tmp_path, model, make, probe):
    torch.manual_seed(0)
    net = make()
    torch.save(net.state_dict(), tmp_path / "in1k.pt")
    cfg = parse_config(_config(tmp_path, model, tmp_path / "in1k.pt"))
    lines: list[str] = []
    (tmp_path / "study").mkdir()
    base, metrics = prepare_base(cfg, dataset_from_config(cfg.dataset), tmp_path / "study", log=lines.append)
    said = "\n".join(lines)
    assert "has 1000 classes, replaced by a new one of 4" in said and f"base: fine-tuning {model} for 1 epochs" in said, said
    record = json.loads((tmp_path / "study" / "base" / "base.json").read_text())
    assert record["start"]["file_classes"] == 1000 and record["start"]["classifier_replaced"], record
    ours, theirs = probe
    _close_to(base.state_dict()[ours], net.state_dict()[theirs], theirs)
    assert base.eval()(torch.randn(2, 3, 16, 16)).shape == (2, CLASSES)


def test_a_checkpoint_that_does_not_fit_exits_2_with_one_line_and_writes_nothing(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    proc = _launch(tmp_path, _config(tmp_path, "resnet18", tmp_path / "r34.pt"), timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert len(lines) == 1, lines
    assert "base.checkpoint" in lines[0] and "does not fit base.model 'resnet18'" in lines[0] and "unexpected (first 'layer1.2.conv1.weight')" in lines[0], lines[0]
    assert not (tmp_path / "runs" / "mine").exists(), f"a misfit checkpoint wrote {list((tmp_path / 'runs').rglob('*'))}"
