"""The deployable artifact (``automl._artifact``): what is written for each runtime, and why not.

Known answers: a state dict's bytes are those ``torch.save`` writes; the x86 dynamic int8 recipe
leaves exactly the model's convolutions float (PyTorch has no dynamic convolution kernel) and says
so in the artifact's record, through the notes ``ArtifactQuantization.quantize_torch`` is given.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

import searchspace
from automl._artifact import INFO_FILE, ONNX_FILE, PT2_FILE, TORCHSCRIPT_FILE, ArtifactError, build_artifact, load_artifact, state_dict_bytes, to_torchscript
from tests.conftest import make_base, random_context

SHAPE = (1, 8, 8)


def test_state_dict_bytes_are_what_torch_save_writes(tmp_path):
    model = make_base("digits_cnn", SHAPE)
    # torch.save names the zip's top folder after the file ("archive" for a buffer): same name, same bytes.
    torch.save(model.state_dict(), tmp_path / "archive.pt")
    assert state_dict_bytes(model) == (tmp_path / "archive.pt").stat().st_size


class _SuperForward(nn.Linear):
    """Static, but TorchScript cannot compile its ``super().forward`` call: it must be traced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1)) * 2


class _DynamicSuper(_SuperForward):
    """The same, declared dynamic (``searchspace.DynamicInference``): tracing would freeze one path."""

    def exit_indices(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), dtype=torch.long)

    def exit_paths(self) -> list[nn.Module]:
        return [self]


def test_a_static_model_that_does_not_script_is_traced():
    torch.manual_seed(0)
    model = _SuperForward(64, 10).eval()
    x = torch.randn(4, *SHAPE)
    scripted = to_torchscript(model, x[:1])
    assert isinstance(scripted, torch.jit.ScriptModule)
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x)), "the traced module must compute the model"


def test_a_dynamic_model_that_does_not_script_fails_with_the_reason():
    model = _DynamicSuper(64, 10).eval()
    assert isinstance(model, searchspace.DynamicInference)
    with pytest.raises(ArtifactError, match="input-dependent control flow must script"):
        to_torchscript(model, torch.randn(1, *SHAPE))


def test_float_artifact_for_onnxruntime_records_its_files_and_computes_the_model(tmp_path):
    model = make_base("digits_cnn", SHAPE)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    artifact = build_artifact(model, x[:1], tmp_path, runtime="onnxruntime")
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert info["runtime"] == "onnxruntime" and info["pt2"] == {"file": PT2_FILE, "exporter": "torch.export"}, info
    assert "quantization" not in info and not (tmp_path / TORCHSCRIPT_FILE).exists(), "a float onnxruntime artifact writes no model.ts"
    assert artifact.path == tmp_path / ONNX_FILE and artifact.size_bytes == (tmp_path / ONNX_FILE).stat().st_size
    with torch.no_grad():
        diff = (artifact(x) - model(x)).abs().max().item()
    assert diff < 1e-4, f"ONNX Runtime's outputs differ from the model's by {diff:.2e}"


def test_int8_artifact_records_what_the_recipe_quantised(tmp_path):
    base = make_base("digits_cnn", SHAPE)
    model = searchspace.get_method("int8")().apply(base, {"mode": "dynamic"}, context=random_context(SHAPE, base))
    build_artifact(model, torch.randn(1, *SHAPE), tmp_path, runtime="torchscript")
    info = json.loads((tmp_path / INFO_FILE).read_text())
    convs = sorted(n for n, m in base.named_modules() if isinstance(m, nn.Conv2d))
    assert convs == ["stages.0.0.0", "stages.0.1.0", "stages.1.0.0", "stages.1.1.0"]
    torch_notes = info["quantization"]["torch"]
    assert torch_notes["quantizer"] == "torch.ao.quantization (x86)", torch_notes
    assert sorted(torch_notes["int8.float"]) == convs, f"dynamic int8 keeps exactly the convolutions float: {torch_notes}"
    assert set(torch_notes["int8.float"].values()) == {"x86 dynamic int8 has no convolution kernel"}
    assert info["quantization"]["mode"] == "dynamic" and info["pt2"]["file"] is None, info
    assert (tmp_path / TORCHSCRIPT_FILE).is_file()


@pytest.mark.parametrize("runtime,words", [("onnxruntime", f"holds no {ONNX_FILE}"), ("torchscript", f"holds no {TORCHSCRIPT_FILE}"), ("eager", "allowed: onnxruntime, torchscript")])
def test_load_artifact_says_what_is_missing(tmp_path, runtime, words):
    with pytest.raises(ArtifactError, match=words):
        load_artifact(tmp_path, runtime=runtime)


def test_a_damaged_torchscript_file_does_not_load_and_says_so(tmp_path):
    (tmp_path / TORCHSCRIPT_FILE).write_bytes(io.BytesIO(b"not a zip").getvalue())
    with pytest.raises(ArtifactError, match=f"{TORCHSCRIPT_FILE} does not load"):
        load_artifact(tmp_path, runtime="torchscript")
