"""A base model whose Ray worker dies under it (SIGKILL, as the kernel's OOM killer does).

Used by ``test_recovery.py`` through the config's ``base.model: "tests.automl.crash_model:build"``:
it trains normally in the launcher (base training) and kills the process it runs in once inside a
Ray worker (a trial), which is what an out-of-memory kill looks like to Ray Tune.
"""

from __future__ import annotations

import os
import signal

import torch
from torch import nn


class _DiesInRayWorker(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            os.kill(os.getpid(), signal.SIGKILL)
        return x


def build(*, input_shape, num_classes: int) -> nn.Module:
    c = input_shape[0]
    return nn.Sequential(_DiesInRayWorker(), nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
