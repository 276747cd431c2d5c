"""Per-epoch progress of base training and long trials."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automl._progress import EpochProgress, EpochStats, format_epoch
from automl._train import TrainOptions, evaluate, fit
from tests.automl.test_train import _toy


def _run(progress, epochs=3):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    data = _toy(40)
    fit(model, data, TrainOptions(epochs=epochs, lr=0.05, batch_size=10, schedule="constant"), progress=progress)
    return model, data


def test_fit_reports_every_epoch_with_the_validation_accuracy_it_ends_with():
    seen: list[EpochStats] = []
    model, data = _run(seen.append)
    assert [s.epoch for s in seen] == [1, 2, 3] and all(s.epochs == 3 for s in seen), seen
    assert seen[-1].val_accuracy == evaluate(model, data, "val"), f"last epoch val {seen[-1].val_accuracy}, evaluate() {evaluate(model, data, 'val')}"
    assert seen[-1].seconds_left == 0 and seen[0].seconds_left > 0, [s.seconds_left for s in seen]
    assert all(s.images_per_s > 0 and s.loss > 0 for s in seen), seen
    assert seen[-1].loss < seen[0].loss, f"loss did not fall on separable data: {[s.loss for s in seen]}"


def test_plain_lines_without_a_terminal_and_one_final_line_with_bars():
    stats = [EpochStats(e, 3, 0.5 / e, 0.9, 1000.0, 60.0 * (3 - e)) for e in (1, 2, 3)]
    lines: list[str] = []
    plain = EpochProgress(lines.append, tty=False)
    for s in stats:
        plain("base", s)
    assert lines == [format_epoch("base", s) for s in stats], lines
    assert lines[0] == "base: epoch 1/3 loss 0.5000 val 0.9000 | 1000 img/s | 0:02:00 left", lines[0]
    kept: list[str] = []
    bars = EpochProgress(kept.append, tty=True)
    for s in stats:
        bars("base", s)
    bars.close()
    assert kept == [format_epoch("base", stats[-1])], f"a terminal keeps only the final line besides the bar: {kept}"


@pytest.mark.slow
def test_a_long_trials_epochs_reach_the_launcher_through_a_ray_queue(ray_session):
    import ray
    from ray.util.queue import Queue

    from automl._progress import drain, sender

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        queue = Queue(actor_options={"num_cpus": 0})

        @ray.remote(num_cpus=0)
        def trial(q):
            _run(sender(q, "trial 7", after_s=0.0))
            return True

        assert ray.get(trial.remote(queue))
        got: list[tuple[str, EpochStats]] = []
        drain(queue, lambda label, s: got.append((label, s)))
        assert [(label, s.epoch) for label, s in got] == [("trial 7", 1), ("trial 7", 2), ("trial 7", 3)], got
    finally:
        if started_here:
            ray.shutdown()
