"""Node-local isolation of latency measurements, with real processes and real file locks.

Every test points its processes at its own lock file (``AUTOML_LATENCY_LOCK``), so other work on
the machine cannot interfere, and orders events with multiprocessing events, not with sleeps; the
only timeouts are safety nets that turn a deadlock into a failure.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest

SAFETY_S = 60.0


def _use_lock(path: str) -> None:
    os.environ["AUTOML_LATENCY_LOCK"] = path


def _worker_steps(path: str, inside, stop, log: str) -> None:
    """Inside ``busy``: work in steps separated by yield points, then write each step's interval."""
    _use_lock(path)
    from automl._latency import busy, yield_point

    steps = []
    with busy():
        inside.set()
        end = time.monotonic() + SAFETY_S
        while not stop.is_set() and time.monotonic() < end:
            yield_point()
            start = time.perf_counter()
            while time.perf_counter() - start < 0.005:  # a short CPU-bound step
                pass
            steps.append((start, time.perf_counter()))
    Path(log).write_text(json.dumps(steps))


@contextlib.contextmanager
def _stepping_worker(mpc, path: str):
    """A spawned worker stepping inside ``busy`` (:func:`_worker_steps`); the list it yields is
    filled with the worker's step intervals when the block ends."""
    inside, stop = mpc.Event(), mpc.Event()
    log = Path(path).with_name("steps.json")
    worker = mpc.Process(target=_worker_steps, args=(path, inside, stop, str(log)))
    worker.start()
    steps: list[tuple[float, float]] = []
    try:
        assert inside.wait(SAFETY_S), "the worker never entered busy()"
        yield steps
        stop.set()
        worker.join(SAFETY_S)
        steps.extend(tuple(s) for s in json.loads(log.read_text()))
    finally:
        stop.set()
        worker.join(5)
        if worker.is_alive():
            worker.kill()


def _worker_measures(path: str, inside, go, done) -> None:
    """Inside ``busy``, wait until told, then take the exclusive lock (a trial timing its model)."""
    _use_lock(path)
    from automl._latency import busy, latency_lock

    with busy():
        inside.set()
        go.wait(SAFETY_S)
        with latency_lock():
            pass
        done.set()


def _worker_idles(path: str, inside, wake) -> None:
    """Inside ``busy``, wait in ``idle`` for an event the measurer sets while it holds the lock."""
    _use_lock(path)
    from automl._latency import busy, idle

    with busy():
        with idle():
            inside.set()
            wake.wait(SAFETY_S)


def _acquire_in_thread(timeout: float) -> tuple[bool, tuple[float, float] | None]:
    from automl._latency import latency_lock

    got: dict[str, tuple[float, float]] = {}

    def take() -> None:
        with latency_lock():
            start = time.perf_counter()
            time.sleep(0.2)
            got["interval"] = (start, time.perf_counter())

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), got.get("interval")


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    path = str(tmp_path / "node.lock")
    monkeypatch.setenv("AUTOML_LATENCY_LOCK", path)
    return mp.get_context("spawn"), path


def test_no_step_of_a_busy_worker_runs_while_a_model_is_timed(ctx):
    mpc, path = ctx
    with _stepping_worker(mpc, path) as steps:
        time.sleep(0.1)  # not an ordering: only lets the worker log steps before the timing
        acquired, interval = _acquire_in_thread(SAFETY_S)
        assert acquired, "the measurement never got the lock: the busy worker did not yield"
        time.sleep(0.1)  # likewise, steps after it
    assert interval is not None
    t0, t1 = interval
    overlapping = [s for s in steps if s[0] < t1 and s[1] > t0]
    assert steps, "the worker logged no step"
    assert not overlapping, f"{len(overlapping)} of {len(steps)} worker steps ran inside the timed interval {interval}: {overlapping[:3]}"
    assert any(s[1] <= t0 for s in steps) and any(s[0] >= t1 for s in steps), "the worker must have worked before and after the timing"


def test_two_busy_processes_that_both_measure_do_not_deadlock(ctx):
    """Each holds the shared lock and then times a model: each must give up its own hold first."""
    mpc, path = ctx
    a_in, b_in, go, a_done, b_done = (mpc.Event() for _ in range(5))
    a = mpc.Process(target=_worker_measures, args=(path, a_in, go, a_done))
    b = mpc.Process(target=_worker_measures, args=(path, b_in, go, b_done))
    a.start(), b.start()
    try:
        assert a_in.wait(SAFETY_S) and b_in.wait(SAFETY_S), "workers never entered busy()"
        go.set()  # both now want the exclusive lock while the other holds it shared
        assert a_done.wait(SAFETY_S) and b_done.wait(SAFETY_S), f"deadlock: measured a={a_done.is_set()} b={b_done.is_set()}"
    finally:
        for p in (a, b):
            p.join(5)
            if p.is_alive():
                p.kill()


def test_an_idle_worker_does_not_hold_up_a_measurement(ctx):
    """The worker wakes only once the measurer holds the lock, so the lock must be free while it idles."""
    mpc, path = ctx
    inside, wake = mpc.Event(), mpc.Event()
    worker = mpc.Process(target=_worker_idles, args=(path, inside, wake))
    worker.start()
    try:
        assert inside.wait(SAFETY_S), "the worker never entered idle()"
        acquired, _ = _acquire_in_thread(SAFETY_S)
        assert acquired, "the measurement waited for a worker that was idle"
    finally:
        wake.set()
        worker.join(SAFETY_S)
        if worker.is_alive():
            worker.kill()
    assert worker.exitcode == 0, f"the worker failed after idling (exit {worker.exitcode})"


def test_nested_busy_blocks_share_one_hold_and_release_it_at_the_end(ctx):
    """After the outermost block ends, another process can take the lock at once (non-blocking)."""
    import fcntl

    from automl._latency import _HOLD, busy, lock_path

    with busy():
        with busy():
            assert _HOLD["depth"] == 2
        assert _HOLD["depth"] == 1
        with open(lock_path(), "a+") as other:  # a separate open file description: another holder
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert _HOLD["depth"] == 0
    with open(lock_path(), "a+") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: raises if still held
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)


@pytest.mark.parametrize(
    "attempts,settings,expected",
    [
        # A slowed attempt is as tight as an undisturbed one: the lowest median is kept, not the tightest.
        ([(0.030, 0.001), (0.015, 0.001), (0.016, 0.0001)], {"max_attempts": 3}, (0.015, 0.001, 3)),
        # Three attempts at least, even when the first is tight.
        ([(0.020, 0.0), (0.018, 0.0), (0.019, 0.0), (0.001, 0.0)], {"max_attempts": 5}, (0.018, 0.0, 3)),
        # More while the kept attempt's spread is too wide, up to max_attempts in all.
        ([(1.0, 0.5), (2.0, 0.1), (1.5, 0.6), (0.9, 0.05), (0.1, 0.0)], {"max_attempts": 5}, (0.9, 0.05, 4)),
        ([(1.0, 0.5), (1.2, 0.5), (1.1, 0.5), (0.8, 0.5)], {"max_attempts": 4}, (0.8, 0.5, 4)),
        # max_attempts caps min_attempts: one attempt is one call.
        ([(2.0, 1.0), (1.0, 0.0)], {"max_attempts": 1}, (2.0, 1.0, 1)),
    ],
)
def test_stable_latency_keeps_the_lowest_median_of_its_attempts(attempts, settings, expected):
    from automl._latency import LatencySettings, stable_latency

    calls = iter(attempts)
    got = stable_latency(lambda: next(calls), LatencySettings(isolate=False, min_attempts=3, attempt_gap_s=0.0, **settings))
    assert got == expected, f"attempts {attempts} with {settings}: kept {got}, expected {expected}"


def test_attempts_are_spaced_and_the_node_works_in_the_gaps_never_during_one(ctx, monkeypatch):
    """Attempts back to back fall in one slow spell of the machine: they are ``attempt_gap_s``
    apart with the lock given up in between (the default settings take five), so the node's other
    work runs in the gaps and never inside an attempt."""
    import fcntl

    from automl import _latency
    from automl._latency import LatencySettings, lock_path, stable_latency

    mpc, path = ctx
    settings = LatencySettings(attempt_gap_s=0.3)
    intervals: list[tuple[float, float]] = []
    waits: list[tuple[float, bool]] = []
    real_sleep = time.sleep

    def gap(seconds: float) -> None:
        """The measurer's wait between attempts: is the lock free for others (no exclusive hold)?"""
        with open(lock_path(), "a+") as other:  # another open file description: another process's view
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(other.fileno(), fcntl.LOCK_UN)
                waits.append((seconds, True))
            except BlockingIOError:
                waits.append((seconds, False))
        real_sleep(seconds)

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        while time.perf_counter() - start < 0.05:  # the "timing": the worker must not step now
            pass
        intervals.append((start, time.perf_counter()))
        return 1.0, 0.0

    monkeypatch.setattr(_latency, "time", type("clock", (), {"sleep": staticmethod(gap), "perf_counter": time.perf_counter}))
    with _stepping_worker(mpc, path) as steps:
        _, _, attempts = stable_latency(once, settings)
    assert attempts == settings.min_attempts == 5 and len(intervals) == 5
    assert waits == [(settings.attempt_gap_s, True)] * 4, f"between attempts (seconds, lock free): {waits}"
    inside_attempt = [s for s in steps for t0, t1 in intervals if s[0] < t1 and s[1] > t0]
    assert not inside_attempt, f"{len(inside_attempt)} worker steps ran inside an attempt: {inside_attempt[:3]}"
    assert any(s[0] >= intervals[0][1] and s[1] <= intervals[-1][0] for s in steps), "the worker never stepped between attempts"


def test_per_sample_quantiles_are_over_each_samples_median(monkeypatch):
    """Sample k takes k ms on every pass but one, where sample 9 is preempted (1 s): the per-sample
    median over 3 passes drops the preemption, so the mean is 5.5 ms and the quantiles of 1..10 ms
    are p50 = 5.5 and p90 = 9.1 (linear interpolation), whatever the real clock does."""
    from automl import _latency
    from automl._latency import LatencySettings, time_per_sample

    now = [0.0]
    monkeypatch.setattr(_latency.time, "perf_counter", lambda: now[0])
    passes = [0]

    def run(k: int):
        def once() -> None:
            now[0] += (1.0 if (k == 9 and passes[0] == 1) else k) / 1e3
            if k == 10:
                passes[0] += 1

        return once

    got = time_per_sample([run(k) for k in range(1, 11)], LatencySettings(warmup=0, repeats=3))
    assert (got.mean_ms, got.p50_ms, got.p90_ms) == pytest.approx((5.5, 5.5, 9.1)), f"per-sample timing {got}"
