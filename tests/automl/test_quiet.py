"""Quiet: a launch, a report and an export of a small digits study (the CLI, in fresh processes,
with Python's default warning filters, as a user runs it) print no DeprecationWarning or
FutureWarning of PyTorch, ONNX, ONNX Runtime or Ray. The study includes int8 (static, through
ONNX Runtime's quantiser) besides the default study's methods."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

NOISE = ("DeprecationWarning", "FutureWarning")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([str(Path(sys.executable).with_name("automl")), *args], capture_output=True, text=True, timeout=1200, cwd=cwd, env=env)


@pytest.mark.slow
def test_launch_report_export_print_no_deprecation_warnings(tmp_path):
    cfg = {
        "name": "quiet",
        "dataset": {"name": "digits"},
        "base": {"model": "digits_cnn", "epochs": 2, "lr": 0.003},
        "methods": {"none": {}, "tucker": {}, "int8": {"mode": ["static"]}},
        "enqueue": [{"method": "none", "none:quantize": "int8", "int8.mode": "static", "distill": False}],
        "objectives": ["accuracy", "size_bytes", "latency_ms"],
        "budget": {"trials": 3, "epochs": 1, "lr": 0.001},
        "sampler": {"name": "random", "seed": 0},
        "resources": {"cpus": 1},
        "latency": {"batch_size": 1, "threads": 1, "warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1},
        "output_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "quiet.yaml").write_text(yaml.safe_dump(cfg))
    study = tmp_path / "runs" / "quiet"
    steps = {
        "launch": _run("launch", str(tmp_path / "quiet.yaml"), cwd=tmp_path),
        "report": _run("report", str(study), cwd=tmp_path),
        "export": _run("export", str(study), "--trial", "0", "--out", str(tmp_path / "exported"), cwd=tmp_path),
    }
    for step, proc in steps.items():
        assert proc.returncode == 0, f"automl {step} failed ({proc.returncode}): {proc.stderr[-2000:]}"
        noisy = [line for line in proc.stderr.splitlines() if any(w in line for w in NOISE)]
        assert not noisy, f"automl {step} printed deprecation warnings: {noisy[:5]}"
    card = yaml.safe_load((tmp_path / "exported" / "card.json").read_text())
    assert card["method"] == "none+int8", f"trial 0 must be the enqueued int8 trial, is {card['method']}"
