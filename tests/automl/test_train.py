"""Training recipe: optimisers, schedules and losses checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from automl._config import ConfigError, parse_config
from automl._data import Splits, _Tensors
from automl._train import TrainOptions, fit, make_optimizer, make_schedule


def _toy(n: int = 40, classes: int = 2) -> Splits:
    """Separable points: every sample of class k is 3 times the k-th unit vector."""
    y = torch.arange(n) % classes
    x = torch.zeros(n, classes)
    x[torch.arange(n), y] = 3.0
    t = _Tensors(x, y)
    return Splits("toy", t, t, t, classes, (classes,))


@pytest.mark.parametrize("total", [10, 37])
def test_cosine_schedule_follows_the_closed_form(total):
    p = nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], TrainOptions(epochs=1, lr=0.4, optimizer="sgd", momentum=0.0))
    sched = make_schedule(opt, TrainOptions(epochs=1, lr=0.4, schedule="cosine"), total)
    for step in range(total + 1):
        want = 0.4 * (1 + math.cos(math.pi * step / total)) / 2
        got = opt.param_groups[0]["lr"]
        assert math.isclose(got, want, abs_tol=1e-9), f"step {step}/{total}: lr {got}, closed form {want}"
        if step < total:
            opt.step()
            sched.step()


def test_sgd_options_reach_the_optimiser():
    p = nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], TrainOptions(epochs=1, optimizer="sgd", momentum=0.8, nesterov=True, weight_decay=5e-4))
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD), type(opt).__name__
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.8, True, 5e-4), group


class _WithIdle(nn.Module):
    """A linear classifier plus a parameter that gets a zero gradient: only weight decay moves it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.idle = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + 0.0 * self.idle.sum()


def test_sgd_weight_decay_shrinks_an_idle_weight_geometrically():
    data = _toy(40)
    model = _WithIdle()
    lr, wd, epochs, batch = 0.1, 0.05, 3, 10
    fit(model, data, TrainOptions(epochs=epochs, lr=lr, batch_size=batch, optimizer="sgd", momentum=0.0, weight_decay=wd, schedule="constant"))
    steps = epochs * math.ceil(40 / batch)
    want = (1 - lr * wd) ** steps
    got = model.idle.detach()
    assert torch.allclose(got, torch.full((3,), want), atol=1e-6), f"idle weight {got.tolist()}, (1 - lr wd)^{steps} = {want}"


def test_label_smoothing_converges_to_the_smoothed_target():
    # The minimiser of smoothed cross-entropy puts probability 1 - e + e/K on the true class.
    data = _toy(40)
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    eps = 0.2
    fit(model, data, TrainOptions(epochs=300, lr=0.05, batch_size=40, label_smoothing=eps, schedule="constant"))
    with torch.no_grad():
        p = model(data.x_train).softmax(1)[torch.arange(40), data.y_train]
    want = 1 - eps + eps / 2
    assert torch.allclose(p, torch.full_like(p, want), atol=2e-3), f"p(true class) {p.min():.4f}..{p.max():.4f}, closed form {want}"
    plain = nn.Linear(2, 2)
    fit(plain, data, TrainOptions(epochs=300, lr=0.05, batch_size=40, schedule="constant"))
    with torch.no_grad():
        q = plain(data.x_train).softmax(1)[torch.arange(40), data.y_train]
    assert q.min() > want + 0.02, f"without smoothing p(true class) should pass {want}, got min {q.min():.4f}"


def _cfg(**sections):
    base = {"name": "t", "dataset": {"name": "digits"}, "base": {"model": "digits_cnn"}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def test_recipe_fields_validate_with_one_line_naming_the_field():
    cfg = parse_config(_cfg(base={"optimizer": "sgd", "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine"}, budget={"label_smoothing": 0.1}))
    assert cfg.base.recipe()["nesterov"] and cfg.budget.recipe()["label_smoothing"] == 0.1, cfg
    for section, bad, field in (
        ("base", {"nesterov": True}, "base"),
        ("budget", {"schedule": "step"}, "budget.schedule"),
        ("budget", {"optimizer": "rmsprop"}, "budget.optimizer"),
        ("base", {"label_smoothing": 1.5}, "base.label_smoothing"),
        ("dataset", {"augment": "flip"}, "dataset"),
        ("dataset", {"augment": "mixup"}, "dataset.augment"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_config(_cfg(**{section: bad}))
        msg = str(err.value)
        assert "\n" not in msg and f": {field}" in msg, f"{bad}: message does not name {field} on one line: {msg}"


def _conv_run(digits, **options):
    from automl import build_model

    torch.manual_seed(0)
    model = build_model("digits_cnn", input_shape=(1, 8, 8), num_classes=10, options={"width": 0.25})
    fit(model, digits.head("train", 200), TrainOptions(epochs=1, batch_size=50, lr=1e-3, schedule="constant", **options))
    return model


def test_channels_last_trains_the_same_model_and_returns_the_default_layout(digits):
    plain = _conv_run(digits)
    last = _conv_run(digits, channels_last=True)
    for (name, a), b in zip(plain.state_dict().items(), last.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), f"{name}: channels-last training differs by {float((a - b).abs().max())}"
        assert b.dim() != 4 or b.is_contiguous(), f"{name} came back in channels-last layout"


def test_bf16_autocast_is_applied_and_keeps_float32_weights(digits):
    plain = _conv_run(digits)
    amp = _conv_run(digits, amp="bf16")
    diffs = [float((a - b).abs().max()) for a, b in zip(plain.state_dict().values(), amp.state_dict().values()) if a.is_floating_point()]
    assert all(b.dtype == torch.float32 for b in amp.state_dict().values() if b.is_floating_point()), "amp changed the weights' dtype"
    assert 0 < max(diffs) < 0.05, f"bf16 autocast should perturb training slightly, max weight difference {max(diffs)}"
