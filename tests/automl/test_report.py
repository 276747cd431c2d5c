"""Report: figure records and tables tested on their own, then the HTML rendered in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from automl._cli import app
from automl._pareto import load_view
from automl._records import write_trial
from automl._report import build_report, latency_spread, pair_data, render_html, timeline_data, write_tables
from tests.automl.test_pareto import make_study, pt
from tests.conftest import skip_unless_ci

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

POINTS = [("none", pt(0.92, 1000, 1.0)), ("tucker", pt(0.88, 400, 0.4)), ("tucker", pt(0.80, 200, 0.2)), ("tucker", pt(0.70, 900, 0.9))]


def test_pair_record_front_base_and_knee():
    view = load_view(make_study(POINTS))
    data = build_report(view)
    pairs = [s for s in data.scatters if len(s.axes) == 2]
    assert [s.axes for s in pairs] == [("accuracy", "size_bytes"), ("accuracy", "latency_ms"), ("size_bytes", "latency_ms")], f"pairs differ: {[s.axes for s in pairs]}"
    assert [s.axes for s in data.scatters if len(s.axes) == 3] == [("accuracy", "size_bytes", "latency_ms")], "one 3-D figure over the three objectives"
    acc_size = pair_data(view, ("accuracy", "size_bytes"), knee=data.knee)
    assert [p.number for p in acc_size.points] == [0, 1, 2, 3], f"every finished trial is drawn, got {[p.number for p in acc_size.points]}"
    assert [p.number for p in acc_size.front] == [2, 1, 0], f"2-D front (sorted by accuracy) differs: {[p.number for p in acc_size.front]}"
    assert acc_size.base == (0.9, 1000.0), f"base point differs: {acc_size.base}"
    assert acc_size.knee is not None and acc_size.knee.number == data.knee, "the study's knee is marked in every figure"
    assert {p.method: p.number for p in acc_size.best} == {"none": 0, "tucker": 1}, f"best per method differs: {acc_size.best}"


def test_tables_ratios_and_formats(tmp_path):
    data = build_report(load_view(make_study(POINTS, failed=[("wsnet", "ValueError: rank must be > 0")])))
    front = data.front.set_index("trial")
    assert front.loc[2, "compression"] == pytest.approx(5.0) and front.loc[2, "speedup"] == pytest.approx(5.0), f"ratios vs base differ: {front.loc[2].to_dict()}"
    assert front.loc[1, "accuracy_delta_pt"] == pytest.approx(-2.0), f"accuracy delta differs: {front.loc[1, 'accuracy_delta_pt']}"
    assert front.loc[2, "macs_reduction"] == pytest.approx(2.0), "MACs reduction = base MACs / MACs"
    assert list(data.trials["state"]) == ["complete"] * 4 + ["failed"], f"all trials incl. failed are tabulated: {list(data.trials['state'])}"
    assert list(data.failures["fail_reason"]) == ["ValueError: rank must be > 0"], "failure reasons are kept"
    md = write_tables(data, tmp_path / "r.md", "md")[0].read_text()
    assert "## front" in md and "## failures" in md and "rank must be > 0" in md, "markdown holds every table"
    for fmt in ("csv", "parquet"):
        files = write_tables(data, tmp_path / fmt, fmt)
        assert sorted(p.name for p in files) == sorted(f"{n}.{fmt}" for n in data.tables()), f"{fmt} files differ: {files}"
        back = pd.read_csv(files[0]) if fmt == "csv" else pd.read_parquet(files[0])
        assert list(back["trial"]) == list(data.front["trial"]), f"{fmt} front round trip differs"


def test_per_sample_latency_spread_of_dynamic_trials():
    """Trials timed per sample (p50/p90 stored, as dynamic models are) get the spread record, sorted by mean, beside the
    base's latency; a block-timed trial has none; the tables carry p50/p90 and the page draws it."""
    dynamic = [
        ("tucker", {**pt(0.89, 900, 0.6), "latency_p50_ms": 0.3, "latency_p90_ms": 1.1}),
        ("wsnet", {**pt(0.90, 950, 0.4), "latency_p50_ms": 0.2, "latency_p90_ms": 0.9}),
    ]
    view = load_view(make_study([POINTS[0], *dynamic]))
    spread = latency_spread(view)
    assert spread is not None and spread.base_ms == 1.0, f"the base's latency is drawn beside: {spread}"
    assert [(n, m, mean, p50, p90) for n, m, mean, p50, p90, _ in spread.trials] == [(2, "wsnet", 0.4, 0.2, 0.9), (1, "tucker", 0.6, 0.3, 1.1)], f"spread differs: {spread.trials}"
    assert latency_spread(load_view(make_study(POINTS))) is None, "block-timed trials have no per-sample spread"
    data = build_report(view)
    trials = data.trials.set_index("trial")
    assert trials.loc[1, "latency_p90_ms"] == pytest.approx(1.1) and pd.isna(trials.loc[0, "latency_p90_ms"]), "p90 in the table, empty for a static trial"
    assert 'id="latency-spread"' in render_html(data), "the page draws the per-sample latency"


def test_timeline_shows_failed_trials():
    t = timeline_data(load_view(make_study(POINTS[:1], failed=[("tucker", "TrialFailed: diverged")])))
    assert t.failed == ((1, "tucker", "TrialFailed: diverged"),), f"failed trials must be in the timeline: {t.failed}"


def test_no_finished_trial_says_so():
    data = build_report(load_view(make_study([], failed=[("tucker", "boom")], running=1)))
    assert data.knee is None and data.front.empty, "nothing finished: no knee, empty front"
    assert any("No finished trial yet" in n for n in data.notes), f"the report must say so plainly: {data.notes}"
    page = render_html(data)
    assert "No finished trial yet" in page and 'id="timeline"' in page, "the page states it and still shows the failed trial"


def test_running_study_is_reported_as_such():
    data = build_report(load_view(make_study(POINTS, running=2)))
    assert any("still running" in n for n in data.notes), f"a running study must be flagged: {data.notes}"
    assert len(data.front) == 3, "the finished trials are reported"


def _chromium(args: list[str], tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_headless_chromium(small_study, tmp_path):
    if CHROMIUM is None:
        skip_unless_ci("chromium is not installed (apt-get install -y chromium); the browser check needs it")
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(small_study.study_dir), "--output", str(out)])
    assert result.exit_code == 0, f"automl report failed: {result.output}"
    page = out.read_text()
    # Inlined plotly.js mentions CDN URLs (map tiles) as data; what must not exist is a script to fetch.
    assert not re.search(r"<script[^>]*\bsrc=", page), "plotly must be inlined (the page opens offline), found a <script src=...>"
    assert "Plotly.newPlot" in page and len(page) > 1_000_000, "plotly.js (several MB) must be inlined in the page"
    # --dump-dom prints the DOM after scripts ran: plotly has turned each div into SVG/WebGL plots.
    dom = _chromium(["--virtual-time-budget=15000", "--dump-dom", out.as_uri()], tmp_path).stdout
    view = load_view(optuna.load_study(study_name=small_study.name, storage=small_study.storage_url))
    expected = ["pair-0", "pair-1", "pair-2", "pareto-3d", "hypervolume", "timeline"] if view.trials else ["timeline"]
    for div in expected:
        m = re.search(rf'<div id="{div}"[^>]*class="[^"]*js-plotly-plot', dom)
        assert m, f"plot {div!r} was not rendered by plotly in Chromium"
    n_svg = dom.count('class="main-svg"')
    assert n_svg >= len(expected), f"expected >= {len(expected)} rendered plotly SVGs, found {n_svg}"
    assert 'class="scatterlayer' in dom, "no scatter trace was drawn"
    assert '<table class="sortable" id="front-table">' in dom, "the sortable front table is missing"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    _chromium(["--virtual-time-budget=15000", "--window-size=1400,2600", f"--screenshot={shot}", out.as_uri()], tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000, f"screenshot {shot} was not written"


def test_cli_report_formats(small_study, tmp_path):
    runner = CliRunner()
    for fmt, target in (("md", tmp_path / "r.md"), ("csv", tmp_path / "csv"), ("parquet", tmp_path / "pq")):
        r = runner.invoke(app, ["report", str(small_study.study_dir), "--format", fmt, "--output", str(target)])
        assert r.exit_code == 0, f"report --format {fmt} failed: {r.output}"
        assert "knee point: trial" in r.output, f"report must name the knee: {r.output}"
    assert "## front" in (tmp_path / "r.md").read_text(), "markdown report lacks the front"
    front_csv, front_pq = pd.read_csv(tmp_path / "csv" / "front.csv"), pd.read_parquet(tmp_path / "pq" / "front.parquet")
    assert list(front_csv["trial"]) == list(front_pq["trial"]) and len(front_csv), "csv and parquet must hold the same front"
    r = runner.invoke(app, ["report", str(small_study.study_dir), "--format", "xlsx"])
    assert r.exit_code == 2 and "--format must be one of html, md, csv, parquet" in r.output, f"bad format must exit 2: {r.output}"


def test_cli_report_on_a_study_with_no_finished_trial(small_study, tmp_path):
    """A study folder whose Optuna study holds only a failed trial: the report says so and still renders."""
    import yaml

    from automl._study import open_storage

    config = yaml.safe_load((small_study.study_dir / "config.yaml").read_text())
    config.update(name="empty", output_dir=str(tmp_path))
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    study = optuna.create_study(study_name="empty", storage=open_storage(f"sqlite:///{folder / 'optuna.db'}"), directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("base", {"accuracy": 0.9, "size_bytes": 1000, "latency_ms": 1.0})
    study.set_user_attr("objectives", ["accuracy", "size_bytes", "latency_ms"])
    dist = {"method": optuna.distributions.CategoricalDistribution(["tucker"])}
    write_trial(study, None, state=optuna.trial.TrialState.FAIL, params={"method": "tucker"}, distributions=dist, attrs={"method": "tucker", "fail_reason": "TrialFailed: diverged"})
    r = CliRunner().invoke(app, ["report", str(folder)])
    assert r.exit_code == 0 and "No finished trial yet" in r.output, f"report must say plainly there is no finished trial: {r.output}"
    page = (folder / "report.html").read_text()
    assert "No finished trial yet" in page and "TrialFailed: diverged" in page, "the page must state it and list the failure"
    r = CliRunner().invoke(app, ["show", str(folder)])
    assert r.exit_code == 0 and "front is empty" in r.output, f"show must say the front is empty: {r.output}"
    r = CliRunner().invoke(app, ["export", str(folder), "--pick", "knee"])
    assert r.exit_code == 2 and "no finished trial" in r.output, f"export from an empty study must exit 2: {r.output}"
