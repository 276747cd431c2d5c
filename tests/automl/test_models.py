"""Base models: built-ins, torchvision and timm by name, user factories; all are StagedNets."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from automl import StagedNet, build_model, list_models
from automl._models import library_keys
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


# --- every name a user can give ---------------------------------------------------------------

#: Library models beside the short names, one per family, small enough for the suite; the full zoo
#: is the coverage benchmark's. Each with the input side it needs (GoogLeNet's pools need 64 px).
LIBRARY_SAMPLE = [
    ("torchvision:squeezenet1_0", 32),
    ("torchvision:shufflenet_v2_x0_5", 32),
    ("torchvision:regnet_x_400mf", 32),
    ("torchvision:mnasnet0_5", 32),
    ("torchvision:densenet121", 32),
    ("torchvision:googlenet", 64),
    ("timm:resnet18d", 32),
    ("timm:mobilenetv3_small_050", 32),
    ("timm:regnetx_002", 32),
    ("timm:convnext_atto", 32),
    ("timm:repvgg_a0", 32),
    ("timm:ghostnet_050", 32),
]


def _shape_of(name: str, side: int = 32) -> tuple[int, ...]:
    return {"digits_cnn": (1, 8, 8), "mnist1d_cnn": (40,)}.get(name, (3, side, side))


def _forward_and_train_step(name: str, shape: tuple[int, ...], classes: int = 5) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=classes).train()
    x, y = torch.randn(4, *shape), torch.arange(4) % classes
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, classes), f"{name}: training output {type(out).__name__} {getattr(out, 'shape', '')}"
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}: a parameter got no or a non-finite gradient"
    assert sum(float(g.abs().sum()) for g in grads) > 0, f"{name}: every gradient is zero"
    # Clipped: on 1x1 final feature maps and a batch of 4, batch norm makes some gradients huge.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    with torch.no_grad():
        after = model(x)
        assert torch.isfinite(after).all(), f"{name}: training output after a step is not finite"
        assert model.eval()(x).shape == (4, classes), f"{name}: eval output shape"


@pytest.mark.parametrize("name", list_models())
def test_every_listed_model_runs_forward_and_a_training_step(name):
    _forward_and_train_step(name, _shape_of(name))


@pytest.mark.parametrize("name,side", LIBRARY_SAMPLE, ids=[n for n, _ in LIBRARY_SAMPLE])
def test_library_models_run_forward_and_a_training_step(name, side):
    _forward_and_train_step(name, _shape_of(name, side))


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:resnet18", "timm:mobilenetv3_small_050"])
def test_a_library_model_holds_the_librarys_own_modules_under_its_key_names(name):
    """Split into stages from its traced graph (automl._layout), each entry is the library's module's
    under the library's key name, with the library's shape."""
    library, _, arch = name.partition(":")
    torch.manual_seed(0)
    ours = build_model(name, input_shape=(3, 32, 32), num_classes=6)
    theirs = torchvision.models.get_model(arch, num_classes=6) if library == "torchvision" else timm.create_model(arch, num_classes=6)
    names = library_keys(ours)
    assert sorted(names.values()) == sorted(theirs.state_dict()), f"{name}: the library keys are not the library's state dict keys"
    state = ours.state_dict()
    assert {names[k]: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    for k in names:
        own, lib = k.rpartition(".")[0], names[k].rpartition(".")[0]
        assert type(ours.get_submodule(own)) is type(theirs.get_submodule(lib)), f"{name}: {k} is not held by the library's module {lib}"


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"])
def test_short_torchvision_names_map_every_key_to_torchvisions_and_compute_its_function(name):
    """The staged model holds torchvision's modules: under the key mapping, torchvision's state dict
    loads into it and both compute the same logits."""
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name, num_classes=6).eval()
    ours = build_model(name, input_shape=(3, 32, 32), num_classes=6).eval()
    names = library_keys(ours)
    assert sorted(names.values()) == sorted(theirs.state_dict()), f"{name}: keys without a torchvision name"
    state = theirs.state_dict()
    ours.load_state_dict({k: state[v] for k, v in names.items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5), f"{name}: the staged model computes another function than torchvision's"


def test_unknown_library_names_list_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown torchvision classification model 'resnet99'; allowed: .*resnet18.*squeezenet1_0"):
        build_model("torchvision:resnet99", input_shape=(3, 32, 32), num_classes=4)
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet188'; allowed: any of timm.list_models\(\) \(\d+ names\), e.g. .*resnet18"):
        build_model("timm:resnet188", input_shape=(3, 32, 32), num_classes=4)
    with pytest.raises(ValueError, match="takes images"):
        build_model("timm:resnet18", input_shape=(40,), num_classes=4)


def test_a_grey_input_gets_a_first_convolution_of_one_channel():
    for name in ("torchvision:squeezenet1_0", "timm:resnet18"):
        model = build_model(name, input_shape=(1, 32, 32), num_classes=3).eval()
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3), name
