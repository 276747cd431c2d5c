"""Shared fixtures: tiny real datasets and the base models every method is checked on."""

from __future__ import annotations

import pytest
import torch

from automl import build_model, load_dataset

#: (model name, one sample's input shape). Every registered method is applied to each of these.
BASE_MODELS = [
    ("digits_cnn", (1, 8, 8)),
    ("mnist1d_cnn", (40,)),
    ("resnet18", (3, 32, 32)),
    ("mobilenet_v2", (3, 32, 32)),
]


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def mnist1d():
    return load_dataset("mnist1d", seed=0)


def make_base(name: str, shape: tuple[int, ...], num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, input_shape=shape, num_classes=num_classes).eval()


def sample_params(method, seed: int) -> tuple[dict, dict]:
    """(method params, raw Optuna params) of one random draw from ``method.space``."""
    import optuna

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    return method.space(trial), trial.params


def random_context(shape, base, seed: int = 0):
    """An ApplyContext with 64 seeded random samples of ``shape`` as two calibration batches."""
    from searchspace import ApplyContext

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, *shape, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    return ApplyContext(
        example_input=x[:1],
        calibration=lambda: iter([(x[:32], y[:32]), (x[32:], y[32:])]),
        fit=lambda module, **kw: module,
        base=base,
    )


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray for the session; workers import this checkout (and tests.fixtures plugins)."""
    import os

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()
