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

    def export_parts(self) -> list[str]:
        return []


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


# --- ONNX with external data (a model too large for one file) ---------------------------------
#
# torch's exporter keeps the weights beside the graph (``model.onnx.data``) once they pass its
# ``_LARGE_MODEL_THRESHOLD`` (1.5 GiB); lowered to 0 here, ``build_artifact`` writes that layout for
# a small model through the same code a 2.5 GB ViT-H/14 would take.


@pytest.fixture
def external_data(monkeypatch):
    from torch.onnx._internal.exporter import _onnx_program

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)


def test_an_onnx_artifact_with_external_data_counts_and_runs_all_its_files(tmp_path, external_data):
    from automl._artifact import artifact_bytes, onnx_files

    model = make_base("digits_cnn", SHAPE)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    artifact = build_artifact(model, x[:1], tmp_path, runtime="onnxruntime")
    graph, data = tmp_path / ONNX_FILE, tmp_path / f"{ONNX_FILE}.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([INFO_FILE, ONNX_FILE, f"{ONNX_FILE}.data", PT2_FILE]), "nothing but the artifact's files is left"
    assert onnx_files(graph) == [graph, data], f"the graph's external-data references must name exactly its data file: {onnx_files(graph)}"
    assert data.stat().st_size > graph.stat().st_size, "the weights must be in the data file, not the graph"
    assert artifact.size_bytes == artifact_bytes(graph) == graph.stat().st_size + data.stat().st_size, f"size_bytes {artifact.size_bytes} must count the graph and its data"
    with torch.no_grad():
        diff = (artifact(x) - model(x)).abs().max().item()
    assert diff < 1e-4, f"ONNX Runtime's outputs differ from the model's by {diff:.2e}"
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    held = [ExternalDataInfo(t) for t in _get_all_tensors(onnx.load(str(graph), load_external_data=False)) if uses_external_data(t)]
    assert data.stat().st_size == sum(i.length for i in held), "the data file holds the external tensors' bytes, packed"


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_of_a_float_model_with_external_data_is_the_same_int8_and_leaves_no_float_file(tmp_path, monkeypatch, mode):
    """ONNX Runtime's quantiser is told the float file keeps external data (it must be for > 2 GiB);
    the int8 model it writes computes what the int8 of the same float model in one file computes."""
    from torch.onnx._internal.exporter import _onnx_program

    from automl._artifact import artifact_bytes, onnx_files

    base = make_base("digits_cnn", SHAPE)
    model = searchspace.get_method("int8")().apply(base, {"mode": mode}, context=random_context(SHAPE, base))
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1))
    one_file = build_artifact(model, x[:1], tmp_path / "one", runtime="onnxruntime")
    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    folder = tmp_path / "external"
    artifact = build_artifact(model, x[:1], folder, runtime="onnxruntime")
    graph = folder / ONNX_FILE
    assert sorted(p.name for p in folder.iterdir()) == sorted([INFO_FILE, ONNX_FILE, f"{ONNX_FILE}.data"]), "no float model (model.float.onnx*) or quantiser file may be left"
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["onnx"]["quantization"].get("external_data") is True, f"the record must say the quantiser wrote external data: {info['onnx']}"
    assert onnx_files(graph) == [graph, folder / f"{ONNX_FILE}.data"]
    assert artifact.size_bytes == artifact_bytes(graph) == sum(f.stat().st_size for f in onnx_files(graph))
    diff = (artifact(x) - one_file(x)).abs().max().item()
    assert diff <= 1e-6, f"the int8 model from an external-data float file differs from the one-file int8 by {diff:.2e}"
    assert one_file.size_bytes < 0.5 * build_artifact(base, x[:1], tmp_path / "float", runtime="onnxruntime").size_bytes, "int8 weights must shrink the artifact"


def _save_external(model_proto, path, *, one_file: bool) -> None:
    import onnx

    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=one_file, location=f"{path.name}.data" if one_file else None, size_threshold=0)


def _tiny_onnx():
    """A two-initializer ONNX model (y = x @ W + b) built by hand."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    b = numpy_helper.from_array(np.ones(3, dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])], [w, b],
    )
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_onnx_files_reads_every_external_data_file_and_refuses_missing_or_outside_ones(tmp_path):
    import numpy as np

    from automl._artifact import artifact_bytes, onnx_files, remove_artifact

    path = tmp_path / ONNX_FILE
    _save_external(_tiny_onnx(), path, one_file=False)  # one file per tensor, named after it (as the legacy exporter writes)
    assert onnx_files(path) == [path, tmp_path / "W", tmp_path / "b"]
    assert artifact_bytes(path) == path.stat().st_size + 12 * 4 + 3 * 4, "the data files hold the tensors' raw bytes"
    got = load_artifact(tmp_path)(torch.ones(2, 4))
    assert torch.equal(got, torch.from_numpy(np.ones((2, 4), np.float32) @ np.arange(12, dtype=np.float32).reshape(4, 3) + 1))
    (tmp_path / "b").unlink()
    with pytest.raises(ArtifactError, match="keeps tensor 'b' in 'b', which is missing"):
        load_artifact(tmp_path)
    remove_artifact(path)
    assert list(tmp_path.iterdir()) == [], "removing an artifact removes the files it references that exist"

    outside = tmp_path / "in"
    outside.mkdir()
    import onnx

    model = _tiny_onnx()
    onnx.save_model(model, str(tmp_path / "x.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    moved = onnx.load(str(tmp_path / "x.onnx"), load_external_data=False)
    for t in moved.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../w.data"
    onnx.save_model(moved, str(outside / ONNX_FILE))
    with pytest.raises(ArtifactError, match="must lie in its folder"):
        onnx_files(outside / ONNX_FILE)
