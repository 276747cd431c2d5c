"""The study report: tables and figure records built from a :class:`StudyView`, then drawn.

Data is computed apart from drawing (Optuna's ``visualization/_pareto_front.py`` style): every figure
has a small record (:class:`ScatterData`, :class:`TimelineData`, the hypervolume history) built by
a plain function and tested without a browser; :func:`render_html` only turns records into plotly
figures. Tables are pandas DataFrames so ``--format md|csv|parquet`` writes exactly what the HTML
shows.

Hypervolume and knee point are defined once in :mod:`automl._pareto` (base-relative units; the base
alone has hypervolume 1).
"""

from __future__ import annotations

import html
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from automl._pareto import (
    COST_REFERENCE,
    FrontRow,
    StudyView,
    PlanGroup,
    best_per_method,
    group_by_plan,
    hypervolume_history,
    knee_objectives,
    nondominated_mask,
    params_summary,
    review_knee,
    within_drop,
)
from automl._target import study_targets

__all__ = [
    "FORMATS",
    "ProfileHeat",
    "ReportData",
    "LatencySpread",
    "ScatterData",
    "TimelineData",
    "build_report",
    "allocation_table",
    "latency_spread",
    "pair_data",
    "profile_heat",
    "render_html",
    "scatter3d_data",
    "timeline_data",
    "trial_table",
    "write_tables",
]

FORMATS = ("html", "md", "csv", "parquet")

#: Human labels of the metrics (axis titles, table headers).
LABELS = {
    "accuracy": "accuracy",
    "size_bytes": "size (bytes)",
    "latency_ms": "latency (ms)",
    "macs": "MACs",
    "params": "parameters",
}


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    number: int
    method: str
    coords: tuple[float, ...]
    on_front: bool
    label: str  # hover text: method and parameters


@dataclass(frozen=True)
class ScatterData:
    """One objective-space figure (2 or 3 axes): every finished trial, the front, base and knee."""

    axes: tuple[str, ...]
    points: tuple[Point, ...]  # every finished trial with all axes measured
    front: tuple[Point, ...]  # non-dominated in THESE axes (for 2 axes: the staircase, sorted by x)
    base: tuple[float, ...] | None
    knee: Point | None  # the study's knee (all objectives), drawn in every figure
    best: tuple[Point, ...]  # best trial of each method

    def methods(self) -> list[str]:
        return sorted({p.method for p in self.points})


@dataclass(frozen=True)
class TimelineData:
    """Accuracy of each trial by trial number; failed trials shown at accuracy 0 with their reason."""

    finished: tuple[tuple[int, str, float | None], ...]  # (number, method, accuracy)
    failed: tuple[tuple[int, str, str], ...]  # (number, method, reason)
    base_accuracy: float | None


@dataclass(frozen=True)
class LatencySpread:
    """Per-sample latency of the dynamic trials (early exits, glance): each sample is timed alone, so
    a trial has a distribution, summarised by its mean (``latency_ms``), median and 90th percentile;
    a user with a latency budget reads the tail. Trials sorted by mean; the base's latency beside."""

    #: (number, method, mean ms, p50 ms, p90 ms, on the front)
    trials: tuple[tuple[int, str, float, float, float, bool], ...]
    base_ms: float | None


@dataclass(frozen=True)
class ProfileHeat:
    """One method's sensitivity profile as a heatmap: layer x level -> validation accuracy drop."""

    method: str
    layers: tuple[str, ...]
    levels: tuple[float, ...]
    #: Per layer, per level: the drop in points (base minus the layer alone), None where not measured.
    drops: tuple[tuple[float | None, ...], ...]
    seconds: float


#: The notes keys in which a method records the per-layer levels it used (searchspace._profile).
LEVEL_NOTES = ("prune.levels", "tucker.levels", "int8.kept_float")


def profile_heat(study_dir: str | Path | None) -> tuple[ProfileHeat, ...]:
    """The study's profile (``profile.json``, :mod:`automl._sensitivity`) as one heatmap per method;
    empty where the study measured none."""
    from automl._sensitivity import PROFILE_FILE
    from searchspace import SensitivityProfile

    path = Path(study_dir) / PROFILE_FILE if study_dir else None
    if path is None or not path.is_file():
        return ()
    profile = SensitivityProfile.from_dict(json.loads(path.read_text()))
    out = []
    for method in sorted(profile.layers):
        drop = profile.drop(method)
        levels = tuple(sorted({lv for row in drop.values() for lv in row}, reverse=method == "tucker"))
        layers = tuple(drop)
        out.append(ProfileHeat(method, layers, levels, tuple(tuple(None if lv not in drop[n] else 100 * drop[n][lv] for lv in levels) for n in layers), profile.seconds))
    return tuple(out)


def latency_spread(view: StudyView) -> LatencySpread | None:
    """The per-sample latency record of the finished trials timed per sample (None: the study has none)."""
    front = {r.number for r in view.front}
    rows = []
    for r in view.trials:
        mean, p50, p90 = r.metrics.get("latency_ms"), r.attrs.get("latency_p50_ms"), r.attrs.get("latency_p90_ms")
        if mean is not None and p50 is not None and p90 is not None:
            rows.append((r.number, r.method, float(mean), float(p50), float(p90), r.number in front))
    if not rows:
        return None
    base = view.base.get("latency_ms")
    return LatencySpread(tuple(sorted(rows, key=lambda t: (t[2], t[0]))), None if base is None else float(base))


def allocation_table(view: StudyView) -> pd.DataFrame:
    """Per trial on the front, the per-layer levels its methods read from the profile (none: uniform)."""
    rows = []
    for r in view.front:
        notes = r.attrs.get("notes") or {}
        if isinstance(notes, str):
            notes = json.loads(notes)
        for key in LEVEL_NOTES:
            if key in notes:
                rows.append((r.number, r.method, key, json.dumps(notes[key])))
    return pd.DataFrame(rows, columns=["trial", "method", "levels", "value"])


@dataclass(frozen=True)
class ReportData:
    view: StudyView
    front: pd.DataFrame
    trials: pd.DataFrame
    best: pd.DataFrame
    failures: pd.DataFrame
    hypervolume: pd.DataFrame
    knee: int | None
    scatters: tuple[ScatterData, ...] = ()
    timeline: TimelineData | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: The accuracy tolerance the knee was taken within (``review.max_drop``; None: the whole front).
    max_drop: float | None = None
    #: The base's sensitivity profile, one heatmap per method (empty: the study measured none).
    profile: tuple[ProfileHeat, ...] = ()
    #: The per-layer levels the front's trials used (empty: all uniform).
    allocation: pd.DataFrame | None = None
    #: Per-sample latency of the dynamic trials (None: no trial was timed per sample).
    spread: LatencySpread | None = None

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "front": self.front,
            "trials": self.trials,
            "best_per_method": self.best,
            "hypervolume": self.hypervolume,
            "failures": self.failures,
        }


# --- tables ------------------------------------------------------------------------------

_COLUMNS = [
    "trial", "state", "method", "params", "accuracy", "accuracy_delta_pt", "size_bytes", "compression",
    "latency_ms", "latency_iqr_ms", "latency_p50_ms", "latency_p90_ms", "speedup", "macs", "macs_reduction", "n_params", "on_front", "knee",
    "count", "same_plan", "within_max_drop", "finalized_from", "checkpoint", "fail_reason",
]


def trial_table(rows: Sequence[FrontRow | PlanGroup], view: StudyView, *, knee: int | None = None, max_drop: float | None = None) -> pd.DataFrame:
    """One row per trial (or per plan: a :class:`PlanGroup` is its trained trial's row, with
    ``count`` trials and the others' numbers in ``same_plan``), every measured number and its ratio
    to the base model.

    ``compression`` = base size / size, ``speedup`` = base latency / latency, ``macs_reduction`` =
    base MACs / MACs, ``accuracy_delta_pt`` = accuracy - base accuracy in percentage points;
    ``within_max_drop``: at most ``max_drop`` below the base's accuracy (the knee's candidates).
    """
    front = {r.number for r in view.front}
    base_macs = view.base.get("macs")
    records = []
    for item in rows:
        group = item if isinstance(item, PlanGroup) else PlanGroup(row=item, numbers=(item.number,))
        r = group.row
        m = r.metrics
        records.append(
            {
                "count": group.count,
                "same_plan": ", ".join(map(str, group.numbers[1:])),
                "within_max_drop": r.state == "complete" and within_drop(r, max_drop),
                "trial": r.number,
                "state": r.state,
                "method": r.method,
                "params": params_summary(_search_params(r), limit=10_000),
                "accuracy": m.get("accuracy"),
                "accuracy_delta_pt": None if r.accuracy_delta is None else 100.0 * r.accuracy_delta,
                "size_bytes": m.get("size_bytes"),
                "compression": r.compression,
                "latency_ms": m.get("latency_ms"),
                "latency_iqr_ms": m.get("latency_iqr_ms"),
                # Recorded beside the metrics (user attributes) for a model timed per sample.
                "latency_p50_ms": r.attrs.get("latency_p50_ms"),
                "latency_p90_ms": r.attrs.get("latency_p90_ms"),
                "speedup": r.speedup,
                "macs": m.get("macs"),
                "macs_reduction": float(base_macs) / float(m["macs"]) if base_macs and m.get("macs") else None,
                "n_params": m.get("params"),
                "on_front": r.number in front,
                "knee": knee is not None and r.number == knee,
                "finalized_from": r.finalized_from,
                "checkpoint": r.checkpoint,
                "fail_reason": r.fail_reason,
            }
        )
    df = pd.DataFrame.from_records(records, columns=_COLUMNS)
    # Nullable dtypes keep integers integers when some rows (failed trials) lack a value.
    for col in ("size_bytes", "macs", "n_params"):
        values = pd.to_numeric(df[col], errors="coerce").astype("Float64")
        integral = bool(((values.round() == values) | values.isna()).all())
        df[col] = values.astype("Int64") if integral else values
    for col in ("accuracy", "accuracy_delta_pt", "compression", "latency_ms", "latency_iqr_ms", "latency_p50_ms", "latency_p90_ms", "speedup", "macs_reduction"):
        df[col] = df[col].astype("Float64")
    return df


def _search_params(r: FrontRow) -> dict[str, Any]:
    # The chain's stage picks are already in ``method``; show the settings only.
    return {k: v for k, v in r.params.items() if k != "method" and not k.endswith((":prune", ":quantize"))}


# --- figure records ------------------------------------------------------------------------


def _point(r: FrontRow, axes: Sequence[str], front: set[int]) -> Point | None:
    values = [r.metrics.get(a) for a in axes]
    if any(v is None for v in values):
        return None
    return Point(r.number, r.method, tuple(float(v) for v in values), r.number in front, f"trial {r.number}: {r.method} {params_summary(_search_params(r), 120)}")


def pair_data(view: StudyView, axes: Sequence[str], *, knee: int | None = None) -> ScatterData:
    """Record of one objective-space figure over ``axes`` (2 or 3 of the study's objectives)."""
    directions = dict(zip(view.objectives, view.directions))
    maximise = [directions.get(a, "minimize") == "maximize" for a in axes]
    front_numbers = {r.number for r in view.front}
    points = tuple(p for p in (_point(r, axes, front_numbers) for r in sorted(view.trials, key=lambda r: r.number)) if p is not None)
    signs = np.array([-1.0 if mx else 1.0 for mx in maximise])
    mask = nondominated_mask(np.array([p.coords for p in points]).reshape(len(points), len(axes)) * signs) if points else []
    local = sorted((p for p, k in zip(points, mask) if k), key=lambda p: p.coords)
    base = tuple(float(view.base[a]) for a in axes) if all(view.base.get(a) is not None for a in axes) else None
    by_number = {p.number: p for p in points}
    best = tuple(by_number[r.number] for r in best_per_method(view) if r.number in by_number)
    return ScatterData(tuple(axes), points, tuple(local), base, by_number.get(knee) if knee is not None else None, best)


def scatter3d_data(view: StudyView, *, knee: int | None = None) -> ScatterData | None:
    """The 3-D figure over the first three objectives (None for a study with fewer than three)."""
    return pair_data(view, view.objectives[:3], knee=knee) if len(view.objectives) >= 3 else None


def timeline_data(view: StudyView) -> TimelineData:
    return TimelineData(
        finished=tuple((r.number, r.method, r.metrics.get("accuracy")) for r in sorted(view.trials, key=lambda r: r.number)),
        failed=tuple((r.number, r.method, r.fail_reason or "unknown") for r in sorted(view.failed, key=lambda r: r.number)),
        base_accuracy=view.base.get("accuracy"),
    )


def build_report(view: StudyView, *, max_drop: float | None = None) -> ReportData:
    """Every table and figure record of a study's report (works with no finished trial at all).

    The front table lists each plan once (:func:`automl._pareto.group_by_plan`, its repeats counted);
    the knee is taken among the models within ``max_drop`` of the base's accuracy
    (``review.max_drop``; None: the whole front), as ``export --pick knee`` takes it.
    """
    knee = review_knee(view, max_drop)
    all_rows = sorted((*view.trials, *view.failed), key=lambda r: r.number)
    hv = hypervolume_history(view)
    hv_df = pd.DataFrame(hv, columns=["trial", "hypervolume"])
    failures = pd.DataFrame([(r.number, r.method, r.fail_reason) for r in view.failed], columns=["trial", "method", "fail_reason"])
    scatters = tuple(pair_data(view, pair, knee=knee) for pair in itertools.combinations(view.objectives, 2))
    three = scatter3d_data(view, knee=knee)
    notes = []
    if not view.trials:
        notes.append(f"No finished trial yet ({len(view.failed)} failed, {view.n_running} running): there is no front to show.")
    elif view.n_running:
        notes.append(f"The study is still running ({view.n_running} trials in progress): this report shows the {len(view.trials)} trials finished so far.")
    if view.front and knee is None and max_drop is not None:
        notes.append(f"No model on the front is within review.max_drop {max_drop:g} of the base accuracy: there is no knee (widen it with --max-drop).")
    where = study_targets(view.base, view.trials)
    notes.extend(text[0].upper() + text[1:] + "." for text in (where.line, where.warning) if text)
    # Written by automl._study.prepare_study (LEFT_OUT): methods whose supports() refused the base.
    for method, reason in sorted((view.attrs.get("left_out") or {}).items()):
        notes.append(f"Method {method} was left out of the search: {reason.rstrip('.')}.")
    return ReportData(
        view=view,
        front=trial_table(group_by_plan(view.front), view, knee=knee, max_drop=max_drop),
        trials=trial_table(all_rows, view, knee=knee, max_drop=max_drop),
        best=trial_table(best_per_method(view), view, knee=knee, max_drop=max_drop),
        failures=failures,
        hypervolume=hv_df,
        knee=knee,
        scatters=(*scatters, *((three,) if three else ())),
        timeline=timeline_data(view),
        notes=tuple(notes),
        max_drop=max_drop,
        profile=profile_heat(view.study_dir),
        allocation=allocation_table(view),
        spread=latency_spread(view),
    )


# --- tables to files ---------------------------------------------------------------------


def write_tables(data: ReportData, out: Path, fmt: str) -> list[Path]:
    """Write the report's tables through pandas: one ``.md`` file, or one ``.csv``/``.parquet`` per table.

    Returns:
        The files written.
    """
    if fmt not in ("md", "csv", "parquet"):
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    tables = data.tables()
    if fmt == "md":
        parts = [f"# Study {data.view.name}", "", *_summary_lines(data), ""]
        for name, df in tables.items():
            parts += [f"## {name}", "", df.to_markdown(index=False) if len(df) else "_(empty)_", ""]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(parts))
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in tables.items():
        path = out / f"{name}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False)
        written.append(path)
    return written


def _knee_line(data: ReportData) -> str:
    if data.knee is None:
        return "- knee point: none (no finished trial)" if not data.view.trials else "- knee point: none (no model on the front within review.max_drop)"
    costs = ", ".join(knee_objectives(data.view, data.max_drop))
    within = "" if data.max_drop is None else f" (among the models within {100 * data.max_drop:g} points of the base accuracy, review.max_drop, trading off {costs or 'nothing: the most accurate'})"
    return f"- knee point: trial {data.knee}{within}"


def _summary_lines(data: ReportData) -> list[str]:
    v = data.view
    b = v.base
    lines = [
        f"- objectives: {', '.join(f'{o} ({d})' for o, d in zip(v.objectives, v.directions))}",
        f"- trials: {len(v.trials)} finished, {v.n_failed} failed, {v.n_running} running; front: {len(v.front)}",
        "- base model: " + ", ".join(f"{k} {b[k]:.4g}" for k in ("accuracy", "size_bytes", "latency_ms", "macs") if b.get(k) is not None),
        _knee_line(data),
    ]
    if len(data.hypervolume):
        lines.append(f"- hypervolume (base = 1): {data.hypervolume['hypervolume'].iloc[-1]:.4f}")
    return [*lines, *(f"- {n}" for n in data.notes)]


# --- drawing -------------------------------------------------------------------------------

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var asc = th.dataset.order !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { delete h.dataset.order; });
      th.dataset.order = asc ? 'asc' : 'desc';
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.sortable { border-collapse: collapse; font-size: 13px; }
table.sortable th { cursor: pointer; background: #eee; position: sticky; top: 0; }
table.sortable th[data-order=asc]::after { content: ' \\25B2'; }
table.sortable th[data-order=desc]::after { content: ' \\25BC'; }
table.sortable td, table.sortable th { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
table.sortable td.t { text-align: left; max-width: 36em; }
tr.knee td { background: #fff3c4; }
.note { background: #fdecea; padding: .6em 1em; border-left: 4px solid #c0392b; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
"""


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or v is pd.NA:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


def _html_table(df: pd.DataFrame, *, table_id: str, columns: Sequence[str]) -> str:
    if not len(df):
        return "<p><em>(empty)</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for rec in df.to_dict("records"):
        cells = []
        for c in columns:
            v = rec.get(c)
            v = None if v is pd.NA else v
            sort_key = "" if v is None else (str(float(v)) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else str(v))
            cls = ' class="t"' if c in ("method", "params", "fail_reason", "checkpoint") else ""
            cells.append(f'<td{cls} data-v="{html.escape(sort_key)}">{html.escape(_fmt(v))}</td>')
        tr_cls = ' class="knee"' if rec.get("knee") else ""
        rows.append(f"<tr{tr_cls}>{''.join(cells)}</tr>")
    return f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _palette(methods: Sequence[str]) -> dict[str, str]:
    import plotly.express as px

    colors = px.colors.qualitative.Plotly + px.colors.qualitative.Dark24
    return {m: colors[i % len(colors)] for i, m in enumerate(methods)}


def _scatter_figure(d: ScatterData, colors: dict[str, str]):
    import plotly.graph_objects as go

    three = len(d.axes) == 3
    Scatter = go.Scatter3d if three else go.Scatter

    def xyz(points: Sequence[Point] | Sequence[tuple[float, ...]]) -> dict[str, list[float]]:
        coords = [p.coords if isinstance(p, Point) else p for p in points]
        keys = ("x", "y", "z")[: len(d.axes)]
        return {k: [c[i] for c in coords] for i, k in enumerate(keys)}

    fig = go.Figure()
    for method in d.methods():
        pts = [p for p in d.points if p.method == method]
        fig.add_trace(
            Scatter(
                **xyz(pts),
                mode="markers",
                name=method,
                text=[p.label for p in pts],
                hoverinfo="text",
                marker={"color": colors[method], "size": 5 if three else 9, "symbol": ["diamond" if p.on_front else "circle" for p in pts] if three else ["diamond" if p.on_front else "circle-open" for p in pts]},
            )
        )
    if not three and len(d.front) > 1:
        fig.add_trace(Scatter(**xyz(d.front), mode="lines", name=f"front ({d.axes[0]} vs {d.axes[1]})", line={"shape": "hv", "color": "#555", "dash": "dot"}, hoverinfo="skip"))
    if d.best:
        fig.add_trace(Scatter(**xyz(d.best), mode="markers", name="best per method", text=[p.label for p in d.best], hoverinfo="text", marker={"size": 8 if three else 16, "color": "#222", "line": {"color": "#222", "width": 2}, "symbol": "circle-open" if three else "square-open"}))
    if d.base is not None:
        fig.add_trace(Scatter(**xyz([d.base]), mode="markers", name="base model", text=["base model (uncompressed)"], hoverinfo="text", marker={"size": 8 if three else 16, "color": "black", "symbol": "x" if three else "star"}))
    if d.knee is not None:
        fig.add_trace(Scatter(**xyz([d.knee]), mode="markers", name=f"knee (trial {d.knee.number})", text=[f"knee: {d.knee.label}"], hoverinfo="text", marker={"size": 9 if three else 20, "color": "#f1c40f", "symbol": "diamond" if three else "star-diamond", "line": {"color": "black", "width": 1}}))
    title = " vs ".join(LABELS.get(a, a) for a in d.axes)
    if three:
        fig.update_layout(scene={"xaxis_title": LABELS.get(d.axes[0], d.axes[0]), "yaxis_title": LABELS.get(d.axes[1], d.axes[1]), "zaxis_title": LABELS.get(d.axes[2], d.axes[2])})
    else:
        fig.update_layout(xaxis_title=LABELS.get(d.axes[0], d.axes[0]), yaxis_title=LABELS.get(d.axes[1], d.axes[1]))
    fig.update_layout(title=f"Pareto front: {title}", height=560 if three else 430, width=900 if three else 600, margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


def _timeline_figure(t: TimelineData, colors: dict[str, str]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in sorted({m for _, m, _ in t.finished}):
        pts = [(n, a) for n, m, a in t.finished if m == method and a is not None]
        fig.add_trace(go.Scatter(x=[n for n, _ in pts], y=[a for _, a in pts], mode="markers", name=method, marker={"color": colors.get(method, "#888"), "size": 9}))
    if t.failed:
        fig.add_trace(
            go.Scatter(
                x=[n for n, _, _ in t.failed],
                y=[0.0] * len(t.failed),
                mode="markers",
                name=f"failed ({len(t.failed)})",
                text=[f"trial {n} ({m}) failed: {html.escape(r[:300])}" for n, m, r in t.failed],
                hoverinfo="text",
                marker={"symbol": "x", "color": "#c0392b", "size": 11},
            )
        )
    if t.base_accuracy is not None:
        fig.add_hline(y=t.base_accuracy, line_dash="dash", line_color="black", annotation_text="base accuracy")
    fig.update_layout(title="Every trial: accuracy by trial number (failed trials at 0, hover for the reason)", xaxis_title="trial", yaxis_title="accuracy", height=380, width=900)
    return fig


def _spread_figure(d: LatencySpread, colors: dict[str, str]):
    import plotly.graph_objects as go

    fig = go.Figure()
    labels = [f"trial {n}" + (" *" if front else "") for n, *_, front in d.trials]
    for method in sorted({m for _, m, *_ in d.trials}):
        rows = [(label, t) for label, t in zip(labels, d.trials) if t[1] == method]
        color = colors.get(method, "#888")
        for label, (n, _, mean, p50, p90, _) in rows:
            fig.add_trace(go.Scatter(x=[p50, p90], y=[label, label], mode="lines", line={"color": color, "width": 6}, showlegend=False, hoverinfo="text", text=[f"trial {n}: p50 {p50:.3f} ms", f"trial {n}: p90 {p90:.3f} ms"]))
        fig.add_trace(
            go.Scatter(
                x=[t[2] for _, t in rows], y=[label for label, _ in rows], mode="markers", name=method,
                marker={"color": "white", "size": 9, "line": {"color": color, "width": 2}},
                text=[f"trial {t[0]}: mean {t[2]:.3f} ms, p50 {t[3]:.3f}, p90 {t[4]:.3f}" for _, t in rows], hoverinfo="text",
            )
        )
    if d.base_ms is not None:
        fig.add_vline(x=d.base_ms, line_dash="dash", line_color="black", annotation_text="base")
    fig.update_layout(
        title="Per-sample latency of the dynamic trials: bar from p50 to p90, circle at the mean (* on the front)",
        xaxis_title="latency (ms)", yaxis={"categoryorder": "array", "categoryarray": labels[::-1]},
        height=max(300, 26 * len(d.trials) + 120), width=900,
    )
    return fig


def _hypervolume_figure(hv: pd.DataFrame):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=hv["trial"], y=hv["hypervolume"], mode="lines+markers", name="hypervolume", line={"shape": "hv"}))
    fig.add_hline(y=1.0, line_dash="dash", line_color="black", annotation_text="base model alone")
    fig.update_layout(title="Hypervolume of the finished trials by trial number (base-relative units; base alone = 1)", xaxis_title="trial", yaxis_title="hypervolume", height=380, width=900)
    return fig


def _profile_section(data: ReportData) -> str:
    if not data.profile:
        return ""
    parts = [
        "<h2>Sensitivity profile of the base</h2>",
        f"<p>Validation accuracy drop in points with one layer compressed alone at each level, without fine-tuning "
        f"(measured once, in {data.profile[0].seconds:.1f} s); sensitivity allocations read it.</p>",
        *(_heat_html(h) for h in data.profile),
    ]
    if data.allocation is not None and len(data.allocation):
        parts.append("<h3>Per-layer levels of the front's trials</h3>")
        parts.append(_html_table(data.allocation, table_id="allocation-table", columns=list(data.allocation.columns)))
    return "".join(parts)


def _heat_html(h: ProfileHeat) -> str:
    """A heatmap as a table: each cell's red grows with the accuracy drop (white: none)."""
    top = max((d for row in h.drops for d in row if d is not None), default=0.0) or 1.0
    head = "".join(f"<th>{lv:g}</th>" for lv in h.levels)
    body = []
    for layer, row in zip(h.layers, h.drops):
        cells = []
        for d in row:
            if d is None:
                cells.append("<td>-</td>")
            else:
                alpha = max(0.0, min(1.0, d / top))
                cells.append(f'<td style="background: rgba(214, 39, 40, {alpha:.2f})">{d:+.1f}</td>')
        body.append(f"<tr><th>{html.escape(layer)}</th>{''.join(cells)}</tr>")
    return f'<table class="sortable"><tr><th>{html.escape(h.method)}: layer / level</th>{head}</tr>{"".join(body)}</table>'


def render_html(data: ReportData) -> str:
    """One self-contained HTML page: plotly's JavaScript is inlined once, so it opens offline."""
    import plotly
    import plotly.io as pio

    v = data.view
    colors = _palette(sorted({r.method for r in (*v.trials, *v.failed)}))
    figures: list[tuple[str, Any]] = []
    if v.trials:
        figures += [(f"pair-{i}", _scatter_figure(s, colors)) for i, s in enumerate(data.scatters) if len(s.axes) == 2]
        figures += [("pareto-3d", _scatter_figure(s, colors)) for s in data.scatters if len(s.axes) == 3]
        figures.append(("hypervolume", _hypervolume_figure(data.hypervolume)))
    if data.spread is not None:
        figures.append(("latency-spread", _spread_figure(data.spread, colors)))
    if data.timeline is not None and (data.timeline.finished or data.timeline.failed):
        figures.append(("timeline", _timeline_figure(data.timeline, colors)))
    divs = []
    for i, (div_id, fig) in enumerate(figures):
        divs.append(pio.to_html(fig, full_html=False, include_plotlyjs=(i == 0), div_id=div_id, config={"displaylogo": False}))
    table_cols = ["trial", "method", "params", "accuracy", "accuracy_delta_pt", "size_bytes", "compression", "latency_ms", "latency_p90_ms", "speedup", "macs", "macs_reduction", "within_max_drop", "knee"]
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in data.notes)
    summary = "".join(f"<li>{html.escape(line[2:])}</li>" for line in _summary_lines(data) if not any(line.endswith(n) for n in data.notes))
    explain = (
        "<p>Hypervolume and knee point are computed in base-relative units: each cost objective is divided by the "
        f"base model's value (reference point {COST_REFERENCE:g}x the base), accuracy by the base's accuracy "
        "(reference 0); the base alone has hypervolume 1. The knee is the front point farthest from the hyperplane "
        "through the front's extreme points (objectives scaled to [0, 1] over the front), on the side of the ideal "
        "point. Diamonds are trials on the front; speed-up and compression are base / trial.</p>"
    )
    failures = _html_table(data.failures, table_id="failures", columns=["trial", "method", "fail_reason"]) if len(data.failures) else "<p>No failed trial.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Study {html.escape(v.name)}: compression report</title>
<style>{_CSS}</style></head>
<body>
<h1>Study {html.escape(v.name)}</h1>
{notes}
<ul>{summary}</ul>
{explain}
<div class="grid">{''.join(divs)}</div>
<h2>Pareto front ({len(data.front)} trials; click a column to sort)</h2>
{_html_table(data.front, table_id="front-table", columns=[*table_cols[:1], "count", "same_plan", *table_cols[1:]])}
{_profile_section(data)}
<h2>Best trial per method</h2>
{_html_table(data.best, table_id="best-table", columns=table_cols)}
<h2>Failed trials ({len(data.failures)})</h2>
{failures}
<h2>All trials</h2>
{_html_table(data.trials, table_id="trials-table", columns=["trial", "state", *table_cols[1:], "on_front"])}
<p><small>plotly {html.escape(plotly.__version__)}; generated by automl report. Data: {html.escape(json.dumps({"study_dir": v.study_dir}))}</small></p>
<script>{_SORT_JS}</script>
</body></html>
"""
