"""Base models: built-ins, torchvision by name, user factories; all are StagedNets."""

from __future__ import annotations

import pytest
import torch

from automl import StagedNet, build_model
from tests.conftest import BASE_MODELS


@pytest.mark.parametrize("name,shape", BASE_MODELS, ids=[n for n, _ in BASE_MODELS])
def test_builtin_and_torchvision_models_are_staged(name, shape):
    model = build_model(name, input_shape=shape, num_classes=7).eval()
    assert isinstance(model, StagedNet) and len(model.stages) >= 2, f"{name}: {type(model).__name__}"
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7), f"{name}: output {tuple(out.shape)}"


def test_paper_mnist1d_cnn_has_the_papers_size():
    model = build_model("mnist1d_cnn", input_shape=(40,), num_classes=10, options={"channels": 25})
    n = sum(p.numel() for p in model.parameters())
    assert n == 5210, f"the MNIST-1D paper's CNN has 5.2K parameters, got {n}"


@pytest.mark.parametrize("name", ["digits_cnn", "mnist1d_cnn"])
def test_builtin_models_scale(name):
    shape = (1, 8, 8) if name == "digits_cnn" else (40,)
    base = build_model(name, input_shape=shape, num_classes=10)
    wide = base.scaled(width=2.0, depth=1.0)
    deep = base.scaled(width=1.0, depth=2.0)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wide) > count(base) and count(deep) > count(base), "scaling did not grow the model"
    assert wide(torch.randn(1, *shape)).shape == (1, 10)


def test_user_factory_and_plain_module():
    staged = build_model("tests.fixtures.models:tiny", input_shape=(3, 8, 8), num_classes=4, options={"width": 6})
    assert isinstance(staged, StagedNet) and staged(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    plain = build_model("tests.fixtures.models:plain", input_shape=(3, 8, 8), num_classes=4)
    assert isinstance(plain, StagedNet) and len(plain.stages) == 1
    with pytest.raises(ValueError, match="cannot be imported"):
        build_model("tests.fixtures.models:missing", input_shape=(3, 8, 8), num_classes=4)
    with pytest.raises(ValueError, match="unknown base model 'vgg99'"):
        build_model("vgg99", input_shape=(3, 8, 8), num_classes=4)
