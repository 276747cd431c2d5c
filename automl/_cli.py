"""The ``automl`` command line.

Bad input (config, study name, storage URL) exits with code 2 and one line on stderr naming what
is wrong and what is allowed; nothing is written before the input is known to be good.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from automl._config import ConfigError, StudyConfig, load_config

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


def _resolve_study(study: str, runs: Path) -> StudyConfig:
    from automl._study import StudyError, load_study_config

    try:
        return load_study_config(study if Path(study).is_dir() else runs / study)
    except (StudyError, ConfigError) as exc:
        fail(str(exc))


def _launch(cfg: StudyConfig, trials: int | None) -> None:
    from automl._study import StudyError, run_search

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
        fail(str(exc))
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished trials are saved; continue with `automl resume {cfg.study_dir}`", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except BaseException:
        if created and not started:
            shutil.rmtree(cfg.study_dir, ignore_errors=True)
        raise
    _print_front(study)


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


def _print_front(study) -> None:
    from automl._pareto import load_view, params_summary

    view = load_view(study)
    base = view.base
    console.print(
        f"study {view.name}: {len(view.trials)} complete, {view.n_failed} failed, {view.n_running} running; "
        f"base accuracy {base.get('accuracy', float('nan')):.4f}, {base.get('size_bytes')} bytes, "
        f"{base.get('latency_ms', float('nan')):.3f} ms",
        markup=False,
    )
    if not view.front:
        console.print("no finished trial yet: the front is empty", markup=False)
        return
    table = Table(title=f"Pareto front ({len(view.front)} trials)")
    for col in ("trial", "method", "accuracy", "Δacc", "size (B)", "x smaller", "latency (ms)", "x faster", "MACs", "params"):
        table.add_column(col, justify="right" if col not in ("method", "params") else "left")
    for r in view.front:
        m = r.metrics
        table.add_row(
            str(r.number),
            r.method,
            f"{m['accuracy']:.4f}" if m.get("accuracy") is not None else "-",
            f"{100 * r.accuracy_delta:+.2f}pt" if r.accuracy_delta is not None else "-",
            f"{int(m['size_bytes'])}" if m.get("size_bytes") is not None else "-",
            f"{r.compression:.2f}" if r.compression else "-",
            f"{m['latency_ms']:.3f}" if m.get("latency_ms") is not None else "-",
            f"{r.speedup:.2f}" if r.speedup else "-",
            f"{int(m['macs']):,}" if m.get("macs") is not None else "-",
            params_summary(r.params),
        )
    console.print(table)
    for number, reason in view.failures[:5]:
        console.print(f"failed trial {number}: {reason}", markup=False)


@app.command()
def show(
    study: str = typer.Argument(..., help="Study folder, or a study name under --runs."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder holding study folders."),
) -> None:
    """Print a study's Pareto front as a table."""
    import optuna

    from automl._study import StudyError, open_storage

    cfg = _resolve_study(study, runs)
    try:
        s = optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.storage_url))
    except StudyError as exc:
        fail(str(exc))
    except KeyError:
        fail(f"study {cfg.name!r} has no Optuna study in {cfg.storage_url}")
    _print_front(s)


def main() -> None:
    """Console-script entry point."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.exit(app())


if __name__ == "__main__":
    main()
