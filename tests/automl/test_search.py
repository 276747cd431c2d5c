"""The run loop's parts (``automl._search``) that are not a whole study: the scheduler a config
names, the interruptible wait on Tune, and the screen worker's setup. The loop itself is tested on
real studies in test_study.py, test_recovery.py and test_prescreen.py."""

from __future__ import annotations

import threading

import pytest

from automl import parse_config
from automl._plugins import PluginError
from automl._search import _fit_interruptibly, _ScreenWorker, make_scheduler


def _config(scheduler: dict):
    return parse_config(
        {
            "name": "s",
            "dataset": {"name": "digits"},
            "base": {"model": "digits_cnn"},
            "methods": {"none": {}},
            "objectives": ["accuracy", "size_bytes", "latency_ms"],
            "budget": {"trials": 2, "epochs": 9},
            "scheduler": scheduler,
        }
    )


def test_fifo_stops_no_trial():
    assert make_scheduler(_config({"name": "fifo"})) is None


def test_moasha_ranks_on_validation_accuracy_and_the_cost_objectives():
    scheduler = make_scheduler(_config({"name": "moasha", "grace_epochs": 1, "reduction_factor": 3}))
    assert scheduler._val_metric == "val_accuracy" and scheduler._costs == ("size_bytes", "latency_ms")
    assert scheduler.rungs.directions == ("maximize", "minimize", "minimize")
    # Rungs at grace x factor^k epochs below the most a trial trains (9 epochs, one fine-tuning stage).
    assert scheduler.rungs.milestones == [1, 3], scheduler.rungs.milestones


class _Tuner:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.thread: str | None = None

    def fit(self) -> None:
        self.thread = threading.current_thread().name
        if self.error is not None:
            raise self.error


def test_fit_runs_tune_in_a_worker_thread_and_hands_its_error_back():
    ok = _Tuner()
    _fit_interruptibly(ok)
    assert ok.thread == "ray-tune" and ok.thread != threading.current_thread().name
    error = RuntimeError("tune failed")
    with pytest.raises(RuntimeError) as raised:
        _fit_interruptibly(_Tuner(error))
    assert raised.value is error, "the worker's exception is re-raised as is"


def test_the_screen_worker_imports_the_plugins_first():
    with pytest.raises(PluginError, match=r"^plugins\[1\]: module 'no_such_plugin_xyz' cannot be imported: ModuleNotFoundError"):
        _ScreenWorker(screen=None, plugins=("json", "no_such_plugin_xyz"), threads=1)
