"""Progress of long work (base training, long trials): one record per epoch, shown in the launcher.

:func:`automl._train.fit` hands each finished epoch to a callback as an :class:`EpochStats`;
:class:`EpochProgress` shows them as ``rich`` progress bars when the launcher writes to a terminal
and as plain lines otherwise (logs, CI, ``nohup``). Trials run in Ray workers and send their
records to the launcher through a Ray queue (:func:`automl._study.run_search` drains it).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

__all__ = ["EpochProgress", "EpochStats", "LONG_TRIAL_S", "drain", "format_epoch", "sender"]

#: A trial shows per-epoch progress once it has run this long (short trials only show their result).
LONG_TRIAL_S = 30.0


@dataclass(frozen=True)
class EpochStats:
    """One finished training epoch."""

    epoch: int
    epochs: int
    #: Mean training loss over the epoch's steps.
    loss: float
    #: Top-1 accuracy on the validation split after the epoch (None when not evaluated).
    val_accuracy: float | None
    images_per_s: float
    #: Remaining epochs times the mean epoch time so far.
    seconds_left: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_epoch(label: str, s: EpochStats) -> str:
    """``base: epoch 3/20 loss 0.4123 val 0.9120 | 1234 img/s | 0:02:10 left``."""
    val = f" val {s.val_accuracy:.4f}" if s.val_accuracy is not None else ""
    return f"{label}: epoch {s.epoch}/{s.epochs} loss {s.loss:.4f}{val} | {s.images_per_s:.0f} img/s | {_clock(s.seconds_left)} left"


class EpochProgress:
    """Shows :class:`EpochStats` of several jobs (``label`` each): bars on a TTY, lines otherwise."""

    def __init__(self, log: Callable[[str], None] = print, *, tty: bool | None = None) -> None:
        self.log = log
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._bars: Any = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, label: str, stats: EpochStats) -> None:
        if not self.tty:
            self.log(format_epoch(label, stats))
            return
        from rich.progress import BarColumn, Progress, TextColumn

        if self._bars is None:
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), transient=True)
            self._bars.start()
        if label not in self._tasks:
            self._tasks[label] = self._bars.add_task(label, total=stats.epochs, info="")
        line = format_epoch(label, stats).split(": ", 1)[1]
        self._bars.update(self._tasks[label], completed=stats.epoch, info=line)
        if stats.epoch >= stats.epochs:
            self._bars.remove_task(self._tasks.pop(label))
            self.log(format_epoch(label, stats))  # the last epoch stays in the scrollback

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
            self._tasks.clear()


def sender(queue: Any, label: str, *, after_s: float = 0.0) -> Callable[[EpochStats], None] | None:
    """Send epochs to the launcher (best effort) once the work has run for ``after_s`` seconds."""
    import time

    if queue is None:
        return None
    start = time.perf_counter()

    def send(stats: EpochStats) -> None:
        if time.perf_counter() - start >= after_s:
            try:
                queue.put_nowait((label, stats.as_dict()))
            except Exception:  # noqa: BLE001 - a full or gone queue only loses a progress line
                pass

    return send


def drain(queue: Any, show: Callable[[str, EpochStats], None]) -> None:
    """Show every progress record waiting in ``queue``.

    Records travel as plain dicts: the queue actor then never imports torch to unpickle them.
    """
    try:
        items = queue.get_nowait_batch(queue.qsize())
    except Exception:  # noqa: BLE001 - progress is best effort; the result path does not use it
        return
    for label, stats in items:
        show(label, EpochStats(**stats))
