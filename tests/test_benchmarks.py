"""Every script in ``benchmarks/`` still runs: its ``--help`` works and every name it imports exists.

A benchmark is a script, not a test, so nothing else runs it; without this a function removed from
``automl`` or ``searchspace`` breaks a benchmark silently. Parametrized over the folder's listing, so
a new script is covered the moment it exists. The coverage harness (``method_coverage.py``), whose
table BENCHMARKS.md and the issue's targets rest on, also runs end to end on a built-in model.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
#: Imports from these packages are checked name by name, wherever in the script they are written.
PROJECT = ("automl", "searchspace")


def test_the_folder_has_scripts():
    assert len(SCRIPTS) >= 10, f"expected the benchmark scripts in {BENCHMARKS}, found {[p.name for p in SCRIPTS]}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_runs_and_names_the_script(script: Path, tmp_path: Path):
    # From another folder: a script must not depend on the folder it is started from.
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script.name} --help exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    assert proc.stdout.startswith(f"usage: {script.name}"), f"{script.name} --help printed no argparse usage line naming it:\n{proc.stdout[:500]}"
    assert not list(tmp_path.iterdir()), f"{script.name} --help wrote files: {[p.name for p in tmp_path.iterdir()]}"


def _project_imports(tree: ast.AST) -> list[tuple[str, str | None, int]]:
    """``(module, name or None, line)`` of every import of a project module, at any depth."""
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] in PROJECT:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.split(".")[0] in PROJECT]
    return found


def _unresolved(script: Path) -> list[str]:
    """The project imports of ``script``, at any depth, whose module or name does not exist."""
    missing = []
    for name_of_module, name, line in _project_imports(ast.parse(script.read_text(), filename=str(script))):
        try:
            imported = importlib.import_module(name_of_module)
        except ImportError as exc:
            missing.append(f"line {line}: module {name_of_module} ({exc})")
            continue
        if name is not None and name != "*" and not hasattr(imported, name):
            try:
                importlib.import_module(f"{name_of_module}.{name}")
            except ImportError:
                missing.append(f"line {line}: {name_of_module} has no {name}")
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_imports_resolve(script: Path):
    # Imported as a module (not __main__): the top-level imports run, main() does not.
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script.name} has no main() for its __main__ block to call"
    # Imports inside functions (deferred so that --help stays fast) run only with the benchmark:
    # check that each module and name they ask for exists.
    missing = _unresolved(script)
    assert not missing, f"{script.name} imports what the project no longer has: {'; '.join(missing)}"


def test_the_import_check_reports_exactly_the_missing_names(tmp_path: Path):
    # Known answer: of four deferred imports, the removed function and the missing module are reported.
    script = tmp_path / "fake_benchmark.py"
    script.write_text(
        "import torch\n"
        "def main():\n"
        "    from automl._measure import time_artifact, no_such_function\n"
        "    from automl import measure\n"
        "    import automl._no_such_module\n"
        "    from searchspace import methods\n"
    )
    assert _unresolved(script) == [
        "line 3: automl._measure has no no_such_function",
        "line 5: module automl._no_such_module (No module named 'automl._no_such_module')",
    ]


def _coverage(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "coverage"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "method_coverage.py"), "--size", "8", "--out", str(out), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    return {"json": json.loads((out / "cells.json").read_text()), "md": (out / "coverage.md").read_text()}


@pytest.mark.slow
def test_method_coverage_sweeps_resumes_and_records_a_base_that_does_not_run(tmp_path: Path):
    """The coverage harness end to end: each model in its own worker, one cell per method, the
    table's counts; --resume keeps the cells already swept (same timings) and sweeps the rest; a
    base that does not run at the size (a 1-D net given images) is recorded with its reason, no cell."""
    first = _coverage(tmp_path, "--only", "digits_cnn", "--methods", "none,prune:l1", "--cell-timeout", "120")["json"]
    assert first["size"] == 8 and first["bases"]["digits_cnn"]["base"] == "ok"
    assert [(c["method"], c["status"], c["step"]) for c in first["cells"]] == [("none", "works", "ort"), ("prune:l1", "works", "ort")]
    assert first["cells"][0]["params_after"] == first["cells"][0]["params_base"] > first["cells"][1]["params_after"]
    second = _coverage(tmp_path, "--only", "digits_cnn,mnist1d_cnn", "--methods", "none,prune:l1", "--cell-timeout", "120", "--resume")
    assert second["json"]["cells"] == first["cells"], "--resume re-ran a model it already held"
    assert second["json"]["bases"]["mnist1d_cnn"]["base"] == "fails" and "conv1d" in second["json"]["bases"]["mnist1d_cnn"]["reason"]
    assert "| none | 1 | 0 | 0 | 0 | 100% |" in second["md"] and "| prune:l1 | 1 | 0 | 0 | 0 | 100% |" in second["md"]
    assert "Models whose base builds at this size: 1 of 2." in second["md"] and "- mnist1d_cnn: RuntimeError" in second["md"]


@pytest.mark.slow
def test_method_coverage_records_a_cell_over_its_deadline_as_timeout_and_goes_on(tmp_path: Path):
    """A deadline no cell can meet: each cell is recorded as timeout with the deadline, each in a
    fresh worker, and the table counts them as applicable, not working."""
    cells = _coverage(tmp_path, "--only", "digits_cnn", "--methods", "none,prune:l1", "--cell-timeout", "0.01")["json"]["cells"]
    assert [(c["method"], c["status"], c["reason"]) for c in cells] == [("none", "timeout", "over 0 s"), ("prune:l1", "timeout", "over 0 s")]
