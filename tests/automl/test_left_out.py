"""A configured method that cannot apply to the base is left out before the study starts, with the
reason from its ``supports()``: out of the search space (never a failed trial), on the study as the
``left_out`` user attribute, and in the report's notes."""

from __future__ import annotations

import pytest

from automl import build_model, parse_config
from automl._pareto import load_view
from automl._report import build_report
from automl._study import LEFT_OUT, StudyError, build_space, left_out_methods
from tests.automl.test_pareto import make_study, pt

#: A module whose forward torch.fx cannot trace: it stays one stage with no head, so exits and
#: iSQRT-COV cannot attach to it.
UNTRACEABLE = ("tests.fixtures.models:export_fixture", (1, 8, 8), {"kind": "early_exit"})


def _config(methods: dict) -> object:
    return parse_config({"name": "t", "dataset": {"name": "digits"}, "base": {"model": "digits_cnn"}, "methods": methods})


def _untraceable():
    name, shape, options = UNTRACEABLE
    return build_model(name, input_shape=shape, num_classes=10, options=options)


def test_methods_that_cannot_apply_are_left_out_of_the_space_with_their_reason():
    cfg = _config({"none": {}, "tucker": {}, "exits": {}, "isqrtcov": {}})
    base = _untraceable()
    left_out = left_out_methods(cfg.method_instances(), base)
    assert sorted(left_out) == ["exits", "isqrtcov"], f"exactly the methods whose supports() refuses the base: {left_out}"
    assert all("torch.fx cannot trace" in r for r in left_out.values()), left_out
    space = build_space(cfg, base, left_out=left_out)
    assert sorted(space.methods) == ["none", "tucker"], f"left-out methods must not be searched: {sorted(space.methods)}"
    assert sorted(build_space(cfg, build_model("digits_cnn", input_shape=(1, 8, 8), num_classes=10)).methods) == ["exits", "isqrtcov", "none", "tucker"]


def test_no_structure_method_left_is_a_study_error_naming_each_reason():
    cfg = _config({"exits": {}, "isqrtcov": {}})
    with pytest.raises(StudyError, match=r"none of the enabled methods applies.*exits: .*torch\.fx cannot trace.*isqrtcov: "):
        build_space(cfg, _untraceable())


def test_the_report_notes_each_left_out_method_and_its_reason():
    study = make_study([("none", pt(0.9, 1000, 1.0))])
    study.set_user_attr(LEFT_OUT, {"isqrtcov": "the model's head is an identity", "exits": "a single stage with no block boundary."})
    notes = build_report(load_view(study)).notes
    assert "Method exits was left out of the search: a single stage with no block boundary." in notes, notes
    assert "Method isqrtcov was left out of the search: the model's head is an identity." in notes, notes
