"""The ``automl`` command line.

Bad input (config, study name, storage URL) exits with code 2 and one line on stderr naming what
is wrong and what is allowed; nothing is written before the input is known to be good.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from automl._config import ConfigError, StudyConfig, load_config
from automl._pareto import PICK_NAMES

#: The ``--pick`` choices as the help and the messages show them.
_PICKS = ", ".join(PICK_NAMES)
#: The one-line message for a command given both or neither of ``--trial`` and ``--pick``.
_TRIAL_OR_PICK = f"give exactly one of --trial N or --pick {{{','.join(PICK_NAMES)}}}"

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Multi-objective AutoML search over neural-network compression methods.",
)
# Tables stay readable when the output is a file or a pipe (rich assumes 80 columns there).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit (2 = bad input)."""
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _log(msg: str) -> None:
    console.print(msg, markup=False, soft_wrap=True)


def _exit_now(code: int) -> NoReturn:
    """End the launcher at once with ``code``, without the interpreter's teardown.

    After Ctrl-C, Ray Tune's loop is still running in its daemon thread
    (:func:`automl._search._fit_interruptibly`). A normal exit runs Ray's ``atexit`` shutdown under
    that thread, and its next call into Ray ends the process from Ray's C++ core with exit code 1
    ("The core worker has already been shutdown"), so a Ctrl-C could exit 1 instead of 130.
    Nothing is left to write by then (the running trials are closed and re-queued
    in the Optuna storage, every finished one was stored when it finished), and the launcher's local
    Ray processes end with it (Ray starts them to share its fate), as after a kill.
    """
    import logging

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def _resolve_study(study: str, runs: Path) -> StudyConfig:
    from automl._study import StudyError, load_study_config

    try:
        return load_study_config(study if Path(study).is_dir() else runs / study)
    except (StudyError, ConfigError) as exc:
        fail(str(exc))


def _launch(cfg: StudyConfig, trials: int | None) -> None:
    from automl._search import run_search
    from automl._study import StudyError

    created = not cfg.study_dir.exists()
    started = False

    def log(msg: str) -> None:
        nonlocal started
        started = started or msg.startswith("search:")
        _log(msg)

    try:
        study = run_search(cfg, trials=trials, log=log)
    except StudyError as exc:
        if created and not started:
            shutil.rmtree(cfg.study_dir, ignore_errors=True)
        fail(str(exc), exc.code)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished trials are saved; continue with `automl resume {cfg.study_dir}`", markup=False, soft_wrap=True)
        _exit_now(130)
    except BaseException:
        if created and not started:
            shutil.rmtree(cfg.study_dir, ignore_errors=True)
        raise
    _print_front(study, max_drop=cfg.review.max_drop)


@app.command()
def launch(
    config: Path = typer.Argument(..., help="Study config (YAML), e.g. studies/digits.yaml."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Override budget.trials."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: SQLite in the study folder)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Folder holding study folders (default: config's output_dir)."),
) -> None:
    """Run a search study from a config until its trial budget is spent."""
    try:
        cfg = load_config(config)
        changes = {"ray_address": address, "storage": storage, "output_dir": output_dir}
        if trials is not None:
            changes["budget"] = {**cfg.budget.model_dump(), "trials": trials}
        cfg = cfg.with_overrides(**changes)
    except ConfigError as exc:
        fail(str(exc))
    _launch(cfg, None)


@app.command()
def resume(
    study: str = typer.Argument(..., help="Study folder, or a study name under --runs."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="New total trial budget."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding study folders."),
) -> None:
    """Continue a study (after Ctrl-C, a crash, or to raise its budget)."""
    cfg = _resolve_study(study, runs)
    _launch(cfg, trials)


@app.command("list")
def list_studies(runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding study folders.")) -> None:
    """List the studies under a folder with their trial counts."""
    import optuna

    from automl._study import StudyError, open_storage

    table = Table("study", "folder", "complete", "failed", "running", "front")
    found = False
    for cfg_file in sorted(runs.glob("*/config.yaml")):
        try:
            cfg = load_config(cfg_file)
            storage = open_storage(cfg.storage_url)
            s = optuna.load_study(study_name=cfg.name, storage=storage)
        except (ConfigError, StudyError, KeyError) as exc:
            table.add_row(cfg_file.parent.name, str(cfg_file.parent), "-", "-", "-", f"unreadable: {exc}")
            continue
        found = True
        states = [t.state for t in s.get_trials(deepcopy=False)]
        count = lambda st: sum(x == st for x in states)  # noqa: E731
        complete = count(optuna.trial.TrialState.COMPLETE)
        table.add_row(cfg.name, str(cfg_file.parent), str(complete), str(count(optuna.trial.TrialState.FAIL)), str(count(optuna.trial.TrialState.RUNNING)), str(len(s.best_trials) if complete else 0))
    if not found and not table.row_count:
        _log(f"no studies under {runs}/")
        return
    console.print(table)


def _load_study(study: str, runs: Path):
    """(config, Optuna study) of an existing study folder or name; exits 2 with one line if absent.

    What the command then computes (export's checks, finalize, the report) runs with the study's
    thread plan (automl._threads).
    """
    import optuna

    from automl._study import StudyError, open_storage
    from automl._threads import ThreadPlan

    cfg = _resolve_study(study, runs)
    ThreadPlan.from_config(cfg).apply()
    try:
        return cfg, optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.storage_url))
    except StudyError as exc:
        fail(str(exc))
    except KeyError:
        fail(f"study {cfg.name!r} has no Optuna study in {cfg.storage_url}")


@dataclasses.dataclass(frozen=True)
class FrontTable:
    """What ``show`` prints, computed apart from drawing it."""

    #: The study's one-line summary (trial counts, the base's numbers).
    summary: str
    title: str
    #: The plans to draw (:class:`automl._pareto.PlanGroup`, a plan and its repeats as one row),
    #: most accurate first, within ``review.max_drop`` of the base (empty when ``empty`` says why).
    rows: tuple
    #: Why no table is drawn (no finished trial, or none meets the bounds); None when there is one.
    empty: str | None
    #: ``(trial number, reason)`` of the first failed trials, printed under the table.
    failures: tuple[tuple[int, str], ...] = ()
    #: Where the latencies were measured, and a warning when the records disagree.
    where: tuple[str, ...] = ()
    #: The plans more than ``max_drop`` below the base's accuracy, listed apart under their own title.
    beyond: tuple = ()
    beyond_title: str = ""
    #: The knee among ``rows`` (the trial ``export --pick knee`` exports), None when there is none.
    knee: int | None = None
    #: The accuracy tolerance the rows were split by (None: every row is in ``rows``).
    max_drop: float | None = None


#: The columns of ``show``'s table, and whether each is right-aligned (a number).
FRONT_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("trial", True), ("count", True), ("method", False), ("accuracy", True), ("Δacc", True), ("size (B)", True),
    ("x smaller", True), ("latency (ms)", True), ("x faster", True), ("MACs", True), ("params", False),
)


def _front_rows(view, constraints, all_trials: bool):
    """(title, rows) that ``show`` prints: the front (or every finished trial), most accurate first,
    filtered by the bounds; rows is None when no trial meets them."""
    from automl._pareto import Constraints

    pool = sorted(view.trials, key=lambda r: -(r.metrics.get("accuracy") or 0.0)) if all_trials else list(view.front)
    what = "finished trials" if all_trials else "Pareto front"
    if constraints is None or constraints == Constraints():
        return f"{what} ({len(pool)} trials)", pool
    rows = constraints.filter(pool)
    return f"{what}: {len(rows)} of {len(pool)} trials with {constraints.describe()}", rows


def _points(max_drop: float) -> str:
    return f"{100 * max_drop:g} point{'' if max_drop == 0.01 else 's'}"


def front_table(view, constraints=None, *, all_trials: bool = False, max_drop: float | None = None) -> FrontTable:
    """The record ``show`` draws for ``view`` (see :class:`FrontTable`).

    Rows are plans (:func:`automl._pareto.group_by_plan`): a plan and its repeats are one row with
    their count. With ``max_drop`` (``review.max_drop``) the plans more than that below the base's
    accuracy are listed apart, and the knee is taken among the others, as ``export --pick knee``
    takes it.
    """
    from automl._pareto import Constraints, group_by_plan, pick, within_drop

    base = view.base
    summary = (
        f"study {view.name}: {len(view.trials)} complete, {view.n_failed} failed, {view.n_running} running; "
        f"base accuracy {base.get('accuracy', float('nan')):.4f}, {base.get('size_bytes')} bytes, "
        f"{base.get('latency_ms', float('nan')):.3f} ms"
    )
    title, rows = _front_rows(view, constraints, all_trials)
    if base.get("accuracy") is None:
        max_drop = None
    close = [r for r in rows if within_drop(r, max_drop)]
    far = [r for r in rows if not within_drop(r, max_drop)]
    groups, beyond = group_by_plan(close), group_by_plan(far)
    if max_drop is not None:
        title += f"; within {_points(max_drop)} of the base accuracy (review.max_drop): {len(groups)} plans"
    empty = None
    if not view.front:
        empty = "no finished trial yet: the front is empty"
    elif not rows:
        empty = f"no trial on the {'study' if all_trials else 'front'} meets {constraints.describe()}"
    elif not groups:
        empty = f"no trial on the {'study' if all_trials else 'front'} is within {_points(max_drop)} of the base accuracy (review.max_drop {max_drop:g}; widen it with --max-drop)"
    beyond_title = f"beyond review.max_drop (more than {_points(max_drop)} below the base accuracy): {len(beyond)} plans" if beyond else ""
    knee = None
    if groups:
        try:  # exactly what `export --pick knee` would export with these bounds
            knee = pick(view, "knee", constraints or Constraints(), max_drop=max_drop).number
        except ValueError:
            knee = None
    return FrontTable(
        summary=summary, title=title, rows=tuple(groups) if empty is None else (), empty=empty, failures=tuple(view.failures[:5]),
        where=tuple(_target_lines(view)), beyond=tuple(beyond) if view.front and rows else (), beyond_title=beyond_title,
        knee=knee, max_drop=max_drop,
    )


def front_cells(group, *, knee: int | None = None) -> tuple[str, ...]:
    """One row of ``show``'s table (a :class:`automl._pareto.PlanGroup`, or one trial's row) as
    text, in :data:`FRONT_COLUMNS` order ("-" where unmeasured); the knee's method says so."""
    from automl._pareto import PlanGroup, params_summary

    if not isinstance(group, PlanGroup):
        group = PlanGroup(row=group, numbers=(group.number,))
    r = group.row
    m = r.metrics
    others = group.numbers[1:]
    return (
        str(r.number) + (f" (+{', '.join(map(str, others))})" if others else ""),
        str(group.count),
        r.method + (f" (finalized from {r.finalized_from})" if r.finalized_from is not None else "") + (" (knee)" if knee is not None and r.number == knee else ""),
        f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else "-",
        f"{100 * r.accuracy_delta:+.2f}pt" if r.accuracy_delta is not None else "-",
        f"{int(m['size_bytes'])}" if m.get("size_bytes") is not None else "-",
        f"{r.compression:.2f}" if r.compression else "-",
        f"{m['latency_ms']:.3f}" if m.get("latency_ms") is not None else "-",
        f"{r.speedup:.2f}" if r.speedup else "-",
        f"{int(m['macs']):,}" if m.get("macs") is not None else "-",
        params_summary(r.params),
    )


def front_json(record: FrontTable) -> list[dict]:
    """``show --json``: one object per plan, its repeats in ``trials``, whether it is within
    ``review.max_drop`` and whether it is the knee."""
    return [
        {
            "trial": g.row.number, "trials": list(g.numbers), "count": g.count, "method": g.row.method, "finalized_from": g.row.finalized_from,
            **g.row.metrics, "params": g.row.params, "within_max_drop": within, "knee": g.row.number == record.knee,
        }
        for within, groups in ((True, record.rows), (False, record.beyond))
        for g in groups
    ]


def _print_front(study, constraints=None, *, all_trials: bool = False, as_json: bool = False, max_drop: float | None = None) -> None:
    from automl._pareto import load_view

    view = load_view(study)
    record = front_table(view, constraints, all_trials=all_trials, max_drop=max_drop)
    if as_json:
        print(json.dumps(front_json(record), default=str))
        return
    console.print(record.summary, markup=False)
    for line in record.where:
        console.print(line, markup=False)

    def draw(title: str, groups) -> None:
        table = Table(title=title)
        for col, right in FRONT_COLUMNS:
            table.add_column(col, justify="right" if right else "left")
        for g in groups:
            table.add_row(*front_cells(g, knee=record.knee))
        console.print(table)

    if record.empty is not None:
        console.print(record.empty, markup=False)
    else:
        draw(record.title, record.rows)
        if record.knee is not None:
            console.print(f"knee: trial {record.knee} (what `automl export --pick knee` exports)", markup=False)
    if record.beyond:
        draw(record.beyond_title, record.beyond)
    for number, reason in record.failures:
        console.print(f"failed trial {number}: {reason}", markup=False)


def _target_lines(view) -> list[str]:
    """Where the study's latencies were measured, and a warning when its records disagree."""
    from automl._target import study_targets

    where = study_targets(view.base, view.trials)
    return [text for text in (where.line, where.warning and f"warning: {where.warning}") if text]


def _constraints(max_latency: float | None, max_size: float | None, min_accuracy: float | None):
    from automl._pareto import Constraints

    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        fail(f"--min-accuracy must be a fraction in [0, 1], got {min_accuracy}")
    for flag, value in (("--max-latency", max_latency), ("--max-size", max_size)):
        if value is not None and not value > 0:
            fail(f"{flag} must be a positive number, got {value}")
    return Constraints(max_latency_ms=max_latency, max_size_bytes=max_size, min_accuracy=min_accuracy)


_MAX_LATENCY = typer.Option(None, "--max-latency", min=0.0, help="Keep models with latency_ms <= this.")
_MAX_SIZE = typer.Option(None, "--max-size", min=0.0, help="Keep models with size_bytes <= this.")
_MIN_ACCURACY = typer.Option(None, "--min-accuracy", help="Keep models with test accuracy >= this (fraction).")
_MAX_DROP = typer.Option(None, "--max-drop", help="Accuracy tolerance: the knee and picks choose among models at most this far below the base (fraction; default: the study's review.max_drop).")


def _max_drop(cfg: StudyConfig, value: float | None) -> float:
    """``--max-drop`` if given (checked like ``review.max_drop``), else the study's ``review.max_drop``."""
    if value is None:
        return cfg.review.max_drop
    if not 0.0 <= value <= 1.0:
        fail(f"--max-drop must be a fraction in [0, 1] (0.01 = 1 point), got {value}")
    return value


@app.command()
def show(
    study: str = typer.Argument(..., help="Study folder, or a study name under --runs."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding study folders."),
    front: bool = typer.Option(True, "--front/--all", help="Print the Pareto front (default) or every finished trial."),
    max_latency: Optional[float] = _MAX_LATENCY,
    max_size: Optional[float] = _MAX_SIZE,
    min_accuracy: Optional[float] = _MIN_ACCURACY,
    max_drop: Optional[float] = _MAX_DROP,
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (trial, method, every recorded number) instead of a table."),
) -> None:
    """Print a study's Pareto front as a table (a plan and its repeats as one row), the models within
    the accuracy tolerance first and the knee among them, optionally only the models meeting bounds."""
    constraints = _constraints(max_latency, max_size, min_accuracy)
    cfg, s = _load_study(study, runs)
    _print_front(s, constraints, all_trials=not front, as_json=as_json, max_drop=_max_drop(cfg, max_drop))


@app.command()
def report(
    study: str = typer.Argument(..., help="Study folder, or a study name under --runs."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding study folders."),
    fmt: str = typer.Option("html", "--format", help="html (one self-contained page), md (one file), csv or parquet (one file per table)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File (html, md) or folder (csv, parquet); default: in the study folder."),
    max_drop: Optional[float] = _MAX_DROP,
) -> None:
    """Write the study's report: Pareto fronts, hypervolume, knee point, best per method, tables."""
    from automl._pareto import load_view
    from automl._report import FORMATS, build_report, render_html, write_tables

    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg, s = _load_study(study, runs)
    data = build_report(load_view(s), max_drop=_max_drop(cfg, max_drop))
    for note in data.notes:
        _log(note)
    if fmt == "html":
        out = output or cfg.study_dir / "report.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(data), encoding="utf-8")
        written = [out]
    else:
        out = output or (cfg.study_dir / ("report.md" if fmt == "md" else f"report_{fmt}"))
        written = write_tables(data, out, fmt)
    if data.knee is not None:
        _log(
            f"knee point: trial {data.knee} (within {100 * data.max_drop:g} points of the base accuracy); front of {len(data.front)} plans; "
            f"hypervolume {data.hypervolume['hypervolume'].iloc[-1]:.4f} (base alone = 1)"
        )
    for path in written:
        _log(f"wrote {path}")


@app.command()
def compare(
    a: str = typer.Argument(..., help="First study (folder or name under --runs)."),
    b: str = typer.Argument(..., help="Second study."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding study folders."),
) -> None:
    """Compare two studies' fronts by hypervolume on one common reference point."""
    from automl._pareto import COST_REFERENCE, load_view

    va, vb = (load_view(_load_study(x, runs)[1]) for x in (a, b))
    if va.objectives != vb.objectives or va.directions != vb.directions:
        fail(f"studies must share objectives to be compared, got {list(va.objectives)} vs {list(vb.objectives)}")
    table = Table(title=f"Fronts on a common reference point (units of {va.name}'s base; cost reference {COST_REFERENCE:g}x, accuracy 0)")
    for col in ("study", "finished", "failed", "front", "hypervolume", "best accuracy", "smallest (B)", "fastest (ms)"):
        table.add_column(col, justify="left" if col == "study" else "right")
    for row in compare_rows(va, vb):
        table.add_row(
            row.study, str(row.finished), str(row.failed), str(row.front), f"{row.hypervolume:.4f}",
            f"{row.best_accuracy:.4f}" if row.best_accuracy is not None else "-",
            f"{int(row.smallest_bytes)}" if row.smallest_bytes is not None else "-",
            f"{row.fastest_ms:.3f}" if row.fastest_ms is not None else "-",
        )
    console.print(table)
    if va.base and vb.base and any(va.base.get(k) != vb.base.get(k) for k in va.objectives):
        _log(f"note: the two studies have different base models; both fronts are measured in units of {va.name}'s base")


@dataclasses.dataclass(frozen=True)
class CompareRow:
    """One study's line of ``compare``: counts, the front's hypervolume and its best numbers."""

    study: str
    finished: int
    failed: int
    front: int
    #: Hypervolume of the front in units of the first study's base (the common reference point).
    hypervolume: float
    best_accuracy: float | None
    smallest_bytes: float | None
    fastest_ms: float | None


def compare_rows(*views) -> list[CompareRow]:
    """``compare``'s record: one :class:`CompareRow` per study view, all measured in units of the
    first view's base (the same base in the usual case of two searches over one model), so the
    reference point is common by construction."""
    from automl._pareto import front_hypervolume

    unit = next((v.base for v in views if v.base), {})

    def best(v, key, fn):
        vals = [r.metrics[key] for r in v.front if r.metrics.get(key) is not None]
        return fn(vals) if vals else None

    return [
        CompareRow(
            study=v.name, finished=len(v.trials), failed=v.n_failed, front=len(v.front),
            hypervolume=front_hypervolume(v.front, v.objectives, v.directions, unit),
            best_accuracy=best(v, "accuracy", max), smallest_bytes=best(v, "size_bytes", min), fastest_ms=best(v, "latency_ms", min),
        )
        for v in views
    ]


@app.command("export")
def export_cmd(
    study: str = typer.Argument(..., help="Study folder, or a study name under --runs."),
    trial: Optional[int] = typer.Option(None, "--trial", min=0, help="Export this trial number."),
    pick_: Optional[str] = typer.Option(None, "--pick", help=f"Choose the trial: {_PICKS} (within the bounds given)."),
    max_latency: Optional[float] = _MAX_LATENCY,
    max_size: Optional[float] = _MAX_SIZE,
    min_accuracy: Optional[float] = _MIN_ACCURACY,
    max_drop: Optional[float] = _MAX_DROP,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Destination folder (default: <study>/exports/trial_NNNNN)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing destination folder."),
    torchscript: bool = typer.Option(False, "--torchscript", help="Also ship model.ts (TorchScript, deprecated in PyTorch), scripted from the rebuilt module and verified."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding study folders."),
) -> None:
    """Export one trial (model.pt2, model.onnx, weights, plan, card.json), verified before success is reported."""
    from automl._export import ExportError, export_trial
    from automl._pareto import load_view, pick

    if (trial is None) == (pick_ is None):
        fail(_TRIAL_OR_PICK)
    constraints = _constraints(max_latency, max_size, min_accuracy)
    cfg, s = _load_study(study, runs)
    drop = _max_drop(cfg, max_drop)
    view = load_view(s)
    if trial is not None:
        row = view.row(trial)
        if row is None:
            fail(f"--trial {trial}: study {view.name!r} has no finished trial {trial} (finished: {', '.join(str(r.number) for r in view.trials) or 'none'})")
        if row.state != "complete":
            fail(f"--trial {trial}: that trial failed ({row.fail_reason}); only finished trials can be exported")
        if not constraints.admits(row):
            fail(f"--trial {trial} does not meet {constraints.describe()}")
    else:
        try:
            row = pick(view, pick_, constraints, max_drop=drop)
        except ValueError as exc:
            fail(str(exc))
        _log(f"picked trial {row.number} ({row.method}) by {pick_} with {constraints.describe()}, within {100 * drop:g} points of the base accuracy")
    from automl._finalize import finalized_version

    final = finalized_version(s, row.number)
    if final is not None:
        _log(f"trial {row.number} has a finalized version, trial {final.number} (automl finalize); exporting that")
        row = load_view(s).row(final.number) or row
    study_dir = cfg.study_dir
    dest = out or study_dir / "exports" / f"trial_{row.number:05d}"

    def load_data():
        from automl._data import dataset_from_config

        return dataset_from_config(cfg.dataset, download=False)  # export never downloads

    try:
        card = export_trial(view, row, dest, study_dir=study_dir, load_data=load_data, latency=cfg.latency.settings(), force=force, torchscript=torchscript, log=_log)
    except ExportError as exc:
        fail(str(exc), code=exc.code)
    exp = card["metrics"]["exported"]
    _log(
        f"exported trial {row.number} ({row.method}) to {dest}: accuracy {exp['accuracy']:.4f}, "
        f"ONNX {card['onnx']['status']}, latency {exp['latency_ms'] if exp['latency_ms'] is not None else float('nan'):.3f} ms "
        f"(recorded {card['metrics']['recorded'].get('latency_ms') or float('nan'):.3f} ms)"
    )


@app.command()
def finalize(
    study: str = typer.Argument(..., help="Study folder, or a study name under --runs."),
    trial: Optional[int] = typer.Option(None, "--trial", help="Finalize this trial number."),
    pick_: Optional[str] = typer.Option(None, "--pick", help=f"Choose the trial as export does: {_PICKS}."),
    epochs: int = typer.Option(30, "--epochs", help="Most fine-tuning epochs (early stopping on validation accuracy may end sooner)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the study's budget.lr)."),
    max_drop: Optional[float] = _MAX_DROP,
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding study folders."),
) -> None:
    """Fine-tune a chosen trial's model for longer and store it as a new trial linked to it."""
    from automl._finalize import FinalizeError, finalize_trial
    from automl._pareto import load_view, pick
    from automl._plugins import import_plugins

    if (trial is None) == (pick_ is None):
        fail(_TRIAL_OR_PICK)
    if epochs < 1:
        fail(f"--epochs must be >= 1, got {epochs}")
    cfg, s = _load_study(study, runs)
    import_plugins(cfg.plugins)
    if trial is None:
        view = load_view(s)
        # A search trial is picked: a finalized one is its parent's continuation, not a new choice.
        search = dataclasses.replace(view, trials=tuple(r for r in view.trials if r.finalized_from is None), front=tuple(r for r in view.front if r.finalized_from is None))
        try:
            trial = pick(search, pick_, max_drop=_max_drop(cfg, max_drop)).number
        except ValueError as exc:
            fail(str(exc))
        _log(f"picked trial {trial} by {pick_}")
    try:
        t = finalize_trial(cfg, s, trial, epochs=epochs, lr=lr, log=_log)
    except FinalizeError as exc:
        fail(str(exc))
    info = t.user_attrs["finalize"]
    view = load_view(s)
    acc = {n: (view.row(n).metrics.get("accuracy") if view.row(n) else None) for n in (trial, t.number)}
    _log(
        f"finalized trial {trial} as trial {t.number} ({t.user_attrs['checkpoint']}): test accuracy {acc[t.number] if acc[t.number] is not None else float('nan'):.4f} "
        f"(after search {acc[trial] if acc[trial] is not None else float('nan'):.4f}), kept epoch {info['kept_epoch']} of {len(info['val_accuracy'])} by validation accuracy"
    )


def main() -> None:
    """Console-script entry point."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.exit(app())


if __name__ == "__main__":
    main()
