"""Training and evaluation shared by the base model and every trial."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from automl._data import Splits
from automl._progress import EpochStats

#: Validation samples (the first this many) whose accuracy each epoch's progress record shows.
PROGRESS_VAL_SAMPLES = 5000

__all__ = ["TrialFailed", "TrainOptions", "evaluate", "fit", "make_optimizer", "make_schedule"]


class TrialFailed(RuntimeError):
    """A trial cannot go on (its loss became NaN, a method cannot apply...); the reason is recorded."""


@dataclass(frozen=True)
class TrainOptions:
    """How to train: the optimiser, its learning-rate schedule and loss, optionally distilled.

    Attributes:
        epochs: passes over the training split.
        lr: peak (one-cycle), initial (cosine) or constant learning rate.
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
    #: "onecycle" (warm-up then anneal; the default), "cosine" (cosine annealing from ``lr`` to 0
    #: over all steps, no warm-up; the CIFAR ResNet recipe) or "constant" (the MNIST-1D paper's
    #: recipe for training from scratch).
    schedule: str = "onecycle"
    #: "adam", "adamw" (decoupled weight decay) or "sgd" (with ``momentum``, Nesterov if ``nesterov``).
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    #: Cross-entropy label smoothing (Szegedy et al., 2016): targets ``(1 - e) one_hot + e / K``.
    label_smoothing: float = 0.0
    #: Mixed precision: "none", "bf16" or "fp16" autocast of the forward pass (fp16 on CUDA uses a
    #: gradient scaler); weights and optimiser state stay float32.
    amp: str = "none"
    #: Train 4-d inputs and weights in channels-last memory format (faster convolutions on GPUs);
    #: the model is returned in the default format.
    channels_last: bool = False
    #: Early stopping (finalize): evaluate the whole validation split after every epoch, stop after
    #: this many epochs without a better accuracy, and return the weights of the best epoch. None:
    #: train every epoch and keep the last (trials, whose budget is short and fixed).
    patience: int | None = None
    #: With ``patience``: the weights before training are epoch 0, a candidate like any epoch:
    #: evaluated on validation first, kept (``kept_epoch`` 0) unless an epoch beats them, and
    #: patience counts from them. Finalize continues an already trained model and must not return
    #: one that is worse by its own criterion than the model it was given.
    keep_start: bool = False


def make_optimizer(params: list[nn.Parameter], options: TrainOptions) -> torch.optim.Optimizer:
    """The optimiser ``options`` names, at ``options.lr``."""
    if options.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=options.lr, momentum=options.momentum, nesterov=options.nesterov, weight_decay=options.weight_decay
        )
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
    raise ValueError(f"optimizer must be one of adam, adamw, sgd, got {options.optimizer!r}")


def make_schedule(opt: torch.optim.Optimizer, options: TrainOptions, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step learning-rate schedule ``options`` names, over ``total_steps`` steps."""
    if options.schedule == "onecycle":
        # OneCycleLR cycles momentum too; SGD without momentum has none to cycle.
        cycle = options.optimizer != "sgd" or options.momentum > 0
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=options.lr, total_steps=total_steps, cycle_momentum=cycle)
    if options.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if options.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    raise ValueError(f"schedule must be one of onecycle, cosine, constant, got {options.schedule!r}")


def fit(
    model: nn.Module,
    data: Splits,
    options: TrainOptions,
    *,
    device: torch.device | str = "cpu",
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    progress: Callable[[EpochStats], None] | None = None,
    history: dict[str, Any] | None = None,
) -> nn.Module:
    """Train ``model`` in place on the training split.

    Args:
        extra_loss: a regulariser added to every step's loss (e.g. a sparsity penalty on gates).
        progress: called after each epoch with its :class:`~automl._progress.EpochStats` (the
            validation split is then evaluated once per epoch).
        history: with ``options.patience``, receives ``val_accuracy`` (one per epoch run) and
            ``kept_epoch`` (1-based, the epoch whose weights are returned; 0 with
            ``options.keep_start`` when no epoch beat the weights before training, whose
            validation accuracy is then ``start_val_accuracy``).

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
    opt = make_optimizer(params, options)
    steps_per_epoch = math.ceil(data.n("train") / options.batch_size)
    sched = make_schedule(opt, options, options.epochs * steps_per_epoch)
    t = options.temperature
    kind = torch.device(device).type
    cuda = kind == "cuda"
    if options.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be one of none, bf16, fp16, got {options.amp!r}")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.amp)
    scaler = torch.amp.GradScaler("cuda") if cuda and options.amp == "fp16" else None
    layout = torch.channels_last if options.channels_last else None
    if layout is not None:
        model.to(memory_format=layout)
    started = time.perf_counter()
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    val_curve: list[float] = []
    start_val = None
    if options.patience is not None and options.keep_start:
        start_val = evaluate(model, data, "val", device=device)
        model.train()
        best = (start_val, 0, {k: v.detach().clone() for k, v in model.state_dict().items()})
    for epoch in range(options.epochs):
        epoch_start, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
        batches = data.batches("train", options.batch_size, shuffle=True, seed=options.seed * 1000 + epoch, pin_memory=cuda)
        for step, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)
            if layout is not None and x.dim() == 4:
                x = x.contiguous(memory_format=layout)
            soft = None
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / t, dim=1)

            def criterion(logits: torch.Tensor, target: torch.Tensor, soft: torch.Tensor | None = soft) -> torch.Tensor:
                loss = F.cross_entropy(logits, target, label_smoothing=options.label_smoothing)
                if soft is not None:
                    kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t
                    loss = (1 - options.distill_weight) * loss + options.distill_weight * kd
                return loss

            hook = getattr(model, "training_loss", None)
            with torch.autocast(kind, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = hook(x, y, criterion) if callable(hook) else criterion(model(x), y)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
            loss = loss.float()
            if not torch.isfinite(loss):
                raise TrialFailed(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            seen += len(y)
            loss_sum += loss.detach() * len(y)
        if progress is not None:
            now = time.perf_counter()
            val = evaluate(model, data.head("val", PROGRESS_VAL_SAMPLES), "val", device=device) if data.n("val") else None
            model.train()
            progress(
                EpochStats(
                    epoch=epoch + 1,
                    epochs=options.epochs,
                    loss=float(loss_sum) / max(seen, 1),
                    val_accuracy=val,
                    images_per_s=seen / max(now - epoch_start, 1e-9),
                    seconds_left=(time.perf_counter() - started) / (epoch + 1) * (options.epochs - epoch - 1),
                )
            )
        if options.patience is not None:
            # Chosen on validation data only: the test split stays the untouched measurement.
            acc = evaluate(model, data, "val", device=device)
            model.train()
            val_curve.append(acc)
            if best is None or acc > best[0]:
                best = (acc, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            elif epoch + 1 - best[1] >= options.patience:
                break
    if best is not None:
        model.load_state_dict(best[2])
        if history is not None:
            history.update(val_accuracy=val_curve, kept_epoch=best[1])
            if start_val is not None:
                history["start_val_accuracy"] = start_val
    if layout is not None:
        model.to(memory_format=torch.contiguous_format)
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
