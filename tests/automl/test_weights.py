"""Starting weights: checkpoints in the forms users have them, hub weights from the library's cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from automl import build_model
from automl._config import ConfigError, parse_config
from automl._models import library_keys
from automl._weights import WeightsError, adapt_input_conv, hub_state_dict, load_start, read_checkpoint

SHAPE = (3, 32, 32)


def _start(name: str, path: Path, classes: int = 4):
    torch.manual_seed(1)
    model = build_model(name, input_shape=SHAPE, num_classes=classes)
    start = load_start(model, name=name, weights=None, checkpoint=str(path), input_shape=SHAPE, num_classes=classes)
    return model.eval(), start


def _same_function(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert torch.allclose(a, b, atol=1e-5), f"the loaded model computes another function (max diff {float((a - b).abs().max()):.3g})"


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18", "mobilenet_v3_small", "torchvision:mobilenet_v3_small"])
def test_a_plain_torchvision_state_dict_for_the_datasets_classes_loads_as_is(tmp_path, name):
    arch = name.partition(":")[2] or name
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(arch, num_classes=4)
    torch.save(theirs.state_dict(), tmp_path / "mine.pt")
    ours, start = _start(name, tmp_path / "mine.pt")
    assert start.fits and start.replaced == () and start.source == f"checkpoint {tmp_path / 'mine.pt'}"
    _same_function(ours, theirs)


def test_a_timm_state_dict_loads_into_timm_name(tmp_path):
    torch.manual_seed(0)
    theirs = timm.create_model("resnet18", num_classes=4)
    torch.save(theirs.state_dict(), tmp_path / "t.pth")
    ours, start = _start("timm:resnet18", tmp_path / "t.pth")
    assert start.fits
    _same_function(ours, theirs)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": s, "epoch": 3, "optimizer": {"lr": 0.1}},  # timm's train script
        lambda s: {"model": s},
        lambda s: {"model_state_dict": s, "epoch": 9},
        lambda s: {f"module.{k}": v for k, v in s.items()},  # DistributedDataParallel
        lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}, "global_step": 10},  # Lightning
        lambda s: {"state_dict": {f"module.model.{k}": v for k, v in s.items()}},
    ],
    ids=["state_dict", "model", "model_state_dict", "module_prefix", "lightning", "ddp_lightning"],
)
def test_wrapped_and_prefixed_checkpoints_load(tmp_path, wrap):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=4)
    torch.save(wrap(theirs.state_dict()), tmp_path / "w.ckpt")
    ours, start = _start("resnet18", tmp_path / "w.ckpt")
    assert start.fits
    _same_function(ours, theirs)


def test_the_base_models_own_state_dict_and_a_factory_modules_load(tmp_path):
    torch.manual_seed(0)
    own = build_model("resnet18", input_shape=SHAPE, num_classes=4)
    torch.save(own.state_dict(), tmp_path / "own.pt")
    ours, start = _start("resnet18", tmp_path / "own.pt")
    assert start.fits
    _same_function(ours, own)
    # A factory's plain module: the file holds the module's own keys, the base holds it as stage 0.
    plain = build_model("tests.fixtures.models:plain", input_shape=SHAPE, num_classes=4)
    torch.save(plain.stages[0].state_dict(), tmp_path / "plain.pt")
    ours, start = _start("tests.fixtures.models:plain", tmp_path / "plain.pt")
    assert start.fits
    _same_function(ours, plain)


def test_a_torch_export_program_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    theirs = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    torch.export.save(torch.export.export(theirs, (torch.randn(1, *SHAPE),)), str(tmp_path / "m.pt2"))
    ours, start = _start("mobilenet_v3_small", tmp_path / "m.pt2")
    assert start.fits
    _same_function(ours, theirs)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "m.safetensors"))
    ours, start = _start("torchvision:mobilenet_v3_small", tmp_path / "m.safetensors")
    assert start.fits
    _same_function(ours, theirs)


@pytest.mark.parametrize("name,arch,classifier", [("resnet18", "resnet18", ("fc.weight", "fc.bias")), ("mobilenet_v3_small", "mobilenet_v3_small", ("classifier.3.weight", "classifier.3.bias"))])
def test_a_1000_class_checkpoint_gets_a_new_classifier_and_keeps_every_other_weight(tmp_path, name, arch, classifier):
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(arch)  # ImageNet's 1000 classes
    torch.save(theirs.state_dict(), tmp_path / "in1k.pt")
    ours, start = _start(name, tmp_path / "in1k.pt")
    assert start.replaced == classifier and start.file_classes == 1000 and start.num_classes == 4, start
    assert "1000 classes, replaced by a new one of 4" in start.describe()
    mine = {v: ours.state_dict()[k] for k, v in library_keys(ours).items()}
    for key, value in theirs.state_dict().items():
        if key in classifier:
            assert mine[key].shape[0] == 4, f"{key}: {tuple(mine[key].shape)}"
        else:
            assert torch.equal(mine[key], value), f"{key} was not loaded"


def test_a_file_that_does_not_fit_names_the_first_missing_and_unexpected_keys(tmp_path):
    # resnet34 has 8 basic blocks more than resnet18, each of 12 entries (2 convs, 2 BNs of 5).
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    with pytest.raises(WeightsError, match=r"^base.checkpoint '.*r34.pt' does not fit base.model 'resnet18': 96 unexpected \(first 'layer1.2.conv1.weight'\)$"):
        _start("resnet18", tmp_path / "r34.pt")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match=r"^base.checkpoint .* base.model 'resnet34': 96 keys missing \(first 'layer1.2.conv1.weight'\)$"):
        _start("resnet34", tmp_path / "r18.pt")
    # A shape that is not the classifier's: a narrower first convolution.
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = state["conv1.weight"][:, :1]
    torch.save(state, tmp_path / "grey.pt")
    with pytest.raises(WeightsError, match=r"'conv1.weight' has shape \(64, 1, 7, 7\) in the file and \(64, 3, 7, 7\) in the model$"):
        _start("resnet18", tmp_path / "grey.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nothing.pt")
    with pytest.raises(WeightsError, match="must hold a state dict"):
        read_checkpoint(tmp_path / "nothing.pt")


def _seed_torchvision_cache(home: Path, arch: str, weights: str) -> torch.nn.Module:
    """Put a file where torchvision's weights loader looks for it, under the name it expects."""
    enum = torchvision.models.get_model_weights(arch)[weights]
    torch.manual_seed(3)
    net = torchvision.models.get_model(arch)
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / os.path.basename(enum.url))
    return net


def test_torchvision_hub_weights_come_from_torchs_cache_and_replace_the_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    net = _seed_torchvision_cache(tmp_path / "torch", "resnet18", "IMAGENET1K_V1")
    state = hub_state_dict("resnet18", "DEFAULT", input_shape=SHAPE)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items()), "the cached file's tensors were not the ones returned"
    for name in ("resnet18", "torchvision:resnet18"):
        torch.manual_seed(0)
        model = build_model(name, input_shape=SHAPE, num_classes=4)
        start = load_start(model, name=name, weights="IMAGENET1K_V1", checkpoint=None, input_shape=SHAPE, num_classes=4)
        assert start.source == "torchvision weights IMAGENET1K_V1" and start.replaced == ("fc.weight", "fc.bias") and start.file_classes == 1000
    with pytest.raises(WeightsError, match="base.weights: torchvision model 'resnet18' has the weights DEFAULT, IMAGENET1K_V1, got 'IMAGENET1K_V3'"):
        hub_state_dict("resnet18", "IMAGENET1K_V3", input_shape=SHAPE)


def test_hub_weights_on_grey_images_see_a_grey_image_as_the_same_image_in_rgb(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    net = _seed_torchvision_cache(tmp_path / "torch", "resnet18", "IMAGENET1K_V1")
    model = build_model("resnet18", input_shape=(1, 32, 32), num_classes=10)
    start = load_start(model, name="resnet18", weights="IMAGENET1K_V1", checkpoint=None, input_shape=(1, 32, 32), num_classes=10)
    assert start.replaced == ("fc.weight", "fc.bias")
    grey = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    first = model.stages[0][0]
    with torch.no_grad():
        assert torch.allclose(first(grey), net.conv1(grey.expand(-1, 3, -1, -1)), atol=1e-4), "the adapted first conv responds differently"
    # More channels than 3: the RGB kernel repeated (R, G, B, R, G) and scaled by 3/5, as timm does.
    w = torch.randn(4, 3, 3, 3)
    five = adapt_input_conv(w, 5)
    assert torch.equal(five, torch.cat([w, w[:, :2]], dim=1) * (3 / 5))


def test_timm_pretrained_weights_come_from_the_hugging_face_cache(tmp_path):
    """timm fetches its weights through huggingface_hub: a snapshot in that cache stands for the
    download (in a fresh process, which reads the cache location and offline mode at import)."""
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg("resnet18")
    repo = tmp_path / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(5)
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(repo / "snapshots" / commit / "model.safetensors"))
    code = (
        "import torch; from automl import build_model; from automl._weights import load_start\n"
        "m = build_model('timm:resnet18', input_shape=(3, 32, 32), num_classes=4)\n"
        "s = load_start(m, name='timm:resnet18', weights='pretrained', checkpoint=None, input_shape=(3, 32, 32), num_classes=4)\n"
        "torch.manual_seed(5); import timm; ref = timm.create_model('resnet18').state_dict()\n"
        "from automl._models import library_keys; mine = {v: m.state_dict()[k] for k, v in library_keys(m).items()}\n"
        "assert all(torch.equal(mine[k], v) for k, v in ref.items() if not k.startswith('fc.')), 'weights differ'\n"
        "print(s.describe())\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded timm weights pretrained; its classifier (fc.weight, fc.bias) has 1000 classes, replaced by a new one of 4" in proc.stdout, proc.stdout


def _config(**base):
    return {
        "name": "w", "dataset": {"name": "digits"}, "base": {"model": "resnet18", **base},
        "methods": {"none": {}}, "objectives": [{"metric": "accuracy"}],
    }


@pytest.mark.parametrize(
    "base,says",
    [
        ({"weights": "IMAGENET1K_V9"}, "base.weights: torchvision model 'resnet18' has the weights DEFAULT, IMAGENET1K_V1, got 'IMAGENET1K_V9'"),
        ({"model": "digits_cnn", "weights": "DEFAULT"}, "base.weights: hub weights need a torchvision or timm model"),
        ({"model": "timm:resnet18", "weights": "DEFAULT"}, "a timm model's hub weights are named 'pretrained', got 'DEFAULT'"),
        ({"model": "timm:resnet188"}, "base.model: unknown timm model 'resnet188'"),
        ({"model": "torchvision:resnet99"}, "base.model: unknown torchvision classification model 'resnet99'; allowed: alexnet,"),
    ],
)
def test_bad_weights_and_library_names_are_config_errors(base, says):
    with pytest.raises(ConfigError) as err:
        parse_config(_config(**base))
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_weights_and_checkpoint_together_are_refused(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="base.weights and base.checkpoint: set one of them"):
        parse_config(_config(weights="DEFAULT", checkpoint=str(tmp_path / "c.pt")))


def test_library_names_and_weights_are_valid_config():
    cfg = parse_config(_config(model="timm:resnet18", weights="pretrained"))
    assert cfg.base.model == "timm:resnet18" and cfg.base.weights == "pretrained"
    assert parse_config(_config(model="torchvision:squeezenet1_0", weights="IMAGENET1K_V1")).base.weights == "IMAGENET1K_V1"
