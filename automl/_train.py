"""Training and evaluation shared by the base model and every trial."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from automl._data import Splits

__all__ = ["TrialFailed", "TrainOptions", "evaluate", "fit"]


class TrialFailed(RuntimeError):
    """A trial cannot go on (its loss became NaN, a method cannot apply...); the reason is recorded."""


@dataclass(frozen=True)
class TrainOptions:
    """How to train: Adam with a one-cycle learning-rate schedule, optionally distilled.

    Attributes:
        epochs: passes over the training split.
        lr: peak learning rate of the one-cycle schedule.
        batch_size: mini-batch size.
        teacher: a model whose soft predictions are distilled (Hinton et al., 2015).
        temperature: distillation temperature.
        distill_weight: weight of the soft-target loss (the hard-label loss gets 1 - weight).
        seed: shuffling and initialisation seed.
    """

    epochs: int
    lr: float = 1e-3
    batch_size: int = 100
    teacher: nn.Module | None = None
    temperature: float = 4.0
    distill_weight: float = 0.5
    seed: int = 0
    #: "onecycle" (warm-up then anneal; the default for fine-tuning) or "constant" (the MNIST-1D
    #: paper's recipe for training from scratch).
    schedule: str = "onecycle"


def fit(
    model: nn.Module,
    data: Splits,
    options: TrainOptions,
    *,
    device: torch.device | str = "cpu",
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> nn.Module:
    """Train ``model`` in place on the training split.

    Args:
        extra_loss: a regulariser added to every step's loss (e.g. a sparsity penalty on gates).

    A model with several outputs to train (early exits) may define
    ``training_loss(x, y, criterion) -> Tensor``; it is then called instead of
    ``criterion(model(x), y)``, where ``criterion(logits, y)`` is this function's loss (cross-entropy,
    plus distillation from ``options.teacher`` when set), to apply to each of its outputs.

    Raises:
        TrialFailed: the loss became NaN or infinite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if options.epochs <= 0 or not params:
        return model
    torch.manual_seed(options.seed)
    model.to(device).train()
    teacher = options.teacher
    if teacher is not None:
        teacher.to(device).eval()
    opt = torch.optim.Adam(params, lr=options.lr)
    steps_per_epoch = math.ceil(len(data.x_train) / options.batch_size)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=options.lr, total_steps=options.epochs * steps_per_epoch)
        if options.schedule == "onecycle"
        else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    )
    t = options.temperature
    for epoch in range(options.epochs):
        for step, (x, y) in enumerate(data.batches("train", options.batch_size, shuffle=True, seed=options.seed * 1000 + epoch)):
            x, y = x.to(device), y.to(device)
            soft = None
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / t, dim=1)

            def criterion(logits: torch.Tensor, target: torch.Tensor, soft: torch.Tensor | None = soft) -> torch.Tensor:
                loss = F.cross_entropy(logits, target)
                if soft is not None:
                    kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t
                    loss = (1 - options.distill_weight) * loss + options.distill_weight * kd
                return loss

            hook = getattr(model, "training_loss", None)
            loss = hook(x, y, criterion) if callable(hook) else criterion(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            if not torch.isfinite(loss):
                raise TrialFailed(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Splits, split: str = "test", *, batch_size: int = 500, device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy of ``model`` on ``split``, in [0, 1]."""
    model.eval()
    correct = total = 0
    for x, y in data.batches(split, batch_size):
        pred = model(x.to(device)).argmax(dim=1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)
