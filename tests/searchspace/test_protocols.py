"""A Protocol is a promise: every registered method's models implement theirs with its exact signatures.

Driven by the registry: each method is applied to a small base model, and whatever its model (or
the recipe it carries, ``artifact_quantization``) implements of :data:`searchspace.PROTOCOLS` is
checked method by method against the protocol. A new method is checked the moment it exists.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import searchspace
from searchspace import METHOD_PROTOCOLS, PROTOCOLS, ArtifactQuantization, Calibrated, DynamicInference, Profiled, artifact_quantization
from tests.conftest import make_base, random_context, sample_params

METHODS = searchspace.list_methods()
#: Small bases, tried in order until one the method supports.
SMALL = [("digits_cnn", (1, 8, 8)), ("mnist1d_cnn", (40,))]


def protocol_members(protocol: type) -> list[str]:
    """The methods a protocol declares (its own public functions)."""
    return sorted(n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_"))


@functools.lru_cache(maxsize=None)
def implementations(name: str) -> dict[type, object]:
    """{protocol: implementing object} of method ``name``'s model on the first small base it supports."""
    method = searchspace.get_method(name)()
    for model_name, shape in SMALL:
        base = make_base(model_name, shape)
        if method.supports(base) is None:
            break
    else:
        return {}
    params, _ = sample_params(method, seed=0)
    out = method.apply(base, params, context=random_context(shape, base))
    candidates = [out, artifact_quantization(out)]
    return {p: c for p in PROTOCOLS for c in candidates if c is not None and isinstance(c, p)}


def mismatches(protocol: type, impl: object) -> list[str]:
    """Each protocol method whose signature on ``impl``'s class differs from the protocol's."""
    out = []
    for member in protocol_members(protocol):
        want = inspect.signature(getattr(protocol, member))
        got = inspect.signature(getattr(type(impl), member))
        if got != want:
            out.append(f"{type(impl).__qualname__}.{member}{got} != {protocol.__name__}.{member}{want}")
    return out


def test_protocol_members_are_listed():
    assert protocol_members(ArtifactQuantization) == ["describe", "quantize_onnx", "quantize_torch"]
    assert protocol_members(Calibrated) == ["calibrate", "use_setting"]
    assert protocol_members(DynamicInference) == ["exit_indices", "exit_paths", "export_parts"]
    assert protocol_members(Profiled) == ["compress_layer", "needs_profile", "profile_extra", "profile_layers", "profile_levels"]


def test_a_wrong_signature_is_caught():
    class Recipe:
        def describe(self) -> dict[str, Any]: ...

        def quantize_onnx(self, float_onnx: Path, out: Path) -> dict[str, Any]: ...

        def quantize_torch(self, model: nn.Module) -> nn.Module: ...  # the old, broken promise

    assert isinstance(Recipe(), ArtifactQuantization), "runtime_checkable checks names only"
    found = mismatches(ArtifactQuantization, Recipe())
    assert len(found) == 1 and "quantize_torch" in found[0] and "notes" in found[0], found


@pytest.mark.parametrize("name", METHODS)
def test_models_implement_their_protocols_with_its_signatures(name):
    method = searchspace.get_method(name)
    found = implementations(name)
    problems = [m for p, impl in found.items() for m in mismatches(p, impl)]
    assert not problems, f"{name}: {problems}"
    # The class flags say what the model will offer, so orchestration can plan before applying.
    assert (ArtifactQuantization in found) == method.quantizes_artifact, (
        f"{name}: quantizes_artifact={method.quantizes_artifact} but its model carries a recipe: {ArtifactQuantization in found}"
    )
    if DynamicInference in found:
        assert method.costs_after_training, f"{name}: a dynamic model's costs depend on training; set costs_after_training"


def test_every_protocol_has_a_registered_implementation():
    """The checks above are not vacuous: each protocol is implemented by some registered method."""
    found = {p: [n for n in METHODS if p in implementations(n)] for p in PROTOCOLS}
    assert all(found.values()), f"protocols no registered method implements: {[p.__name__ for p, v in found.items() if not v]}"


@pytest.mark.parametrize("name", METHODS)
def test_methods_implement_their_protocols_with_its_signatures(name):
    """A method-level protocol (:data:`searchspace.METHOD_PROTOCOLS`: ``Profiled``) is a promise too."""
    method = searchspace.get_method(name)()
    problems = [m for p in METHOD_PROTOCOLS if isinstance(method, p) for m in mismatches(p, method)]
    assert not problems, f"{name}: {problems}"


def test_every_method_protocol_has_a_registered_implementation():
    found = {p: [n for n in METHODS if isinstance(searchspace.get_method(n)(), p)] for p in METHOD_PROTOCOLS}
    assert found == {Profiled: ["int8", "prune", "tucker"]}, found
