"""Datasets with fixed, seeded train / validation / test splits, held as in-memory tensors.

The test split is only ever used to report a finished model's accuracy; every choice the search
makes (thresholds, early stopping, calibration) uses train or validation data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

__all__ = ["DATASETS", "Splits", "load_dataset", "load_study_dataset"]


@dataclass(frozen=True)
class Splits:
    """Tensors of one dataset: inputs are float32, targets int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of ``split`` ("train", "val" or "test")."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        n = len(x)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]

    def describe(self) -> str:
        return f"{self.name}: train {len(self.x_train)}, val {len(self.x_val)}, test {len(self.x_test)}, input {self.input_shape}, {self.num_classes} classes"


@dataclass(frozen=True)
class _Source:
    load: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, int]]
    needs_root: bool
    description: str


def _digits(**_: object) -> tuple[np.ndarray, np.ndarray, None, None, int]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    return x, d.target.astype(np.int64), None, None, 10


def _mnist1d(*, seed: int = 0, **_: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    # Generated locally from the package's templates; its download path is never touched.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    data = make_dataset(args)
    return (
        data["x"].astype(np.float32),
        data["y"].astype(np.int64),
        data["x_test"].astype(np.float32),
        data["y_test"].astype(np.int64),
        10,
    )


_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _torchvision(name: str) -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
    def load(*, root: str, download: bool = False, image_size: int | None = None, **_: object):
        import torchvision
        from torchvision import transforms as T

        mean, std = _STATS[name]
        steps = [T.Resize(image_size)] if image_size else []
        if name == "imagefolder":
            steps = [T.Resize((image_size or 224, image_size or 224))]
        tf = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
        if name == "imagefolder":
            base = Path(root)
            if not (base / "train").is_dir() or not (base / "test").is_dir():
                raise FileNotFoundError(f"dataset.root must hold train/ and test/ class folders, got {root!r}")
            train = torchvision.datasets.ImageFolder(str(base / "train"), transform=tf)
            test = torchvision.datasets.ImageFolder(str(base / "test"), transform=tf)
            classes = len(train.classes)
        else:
            cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
                   "cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
            train = cls(root, train=True, download=download, transform=tf)
            test = cls(root, train=False, download=download, transform=tf)
            classes = len(train.classes)

        def stack(ds) -> tuple[np.ndarray, np.ndarray]:
            xs, ys = zip(*(ds[i] for i in range(len(ds))))
            return torch.stack(xs).numpy(), np.asarray(ys, dtype=np.int64)

        return (*stack(train), *stack(test), classes)

    return load


DATASETS: dict[str, _Source] = {
    "digits": _Source(_digits, False, "scikit-learn's bundled 8x8 digits (1797 images)"),
    "mnist1d": _Source(_mnist1d, False, "MNIST-1D generated offline (4000 train / 1000 test, length 40)"),
    "mnist": _Source(_torchvision("mnist"), True, "torchvision MNIST from dataset.root"),
    "fashion_mnist": _Source(_torchvision("fashion_mnist"), True, "torchvision FashionMNIST from dataset.root"),
    "cifar10": _Source(_torchvision("cifar10"), True, "torchvision CIFAR-10 from dataset.root"),
    "cifar100": _Source(_torchvision("cifar100"), True, "torchvision CIFAR-100 from dataset.root"),
    "imagefolder": _Source(_torchvision("imagefolder"), True, "ImageFolder with train/ and test/ under dataset.root"),
}


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    max_train_samples: int | None = None,
) -> Splits:
    """Load a dataset and split it reproducibly.

    Datasets without their own test split (digits) hold out a stratified 20% as test. The
    validation split is a stratified ``val_fraction`` of the training data. Both use ``seed``.
    """
    from sklearn.model_selection import train_test_split

    src = DATASETS[name]
    x, y, x_test, y_test, classes = src.load(root=root, download=download, image_size=image_size, seed=seed)
    if x_test is None:
        x, x_test, y, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    if max_train_samples is not None and len(x_tr) > max_train_samples:
        x_tr, y_tr = x_tr[:max_train_samples], y_tr[:max_train_samples]
    t = torch.from_numpy
    return Splits(
        name=name,
        x_train=t(np.ascontiguousarray(x_tr)),
        y_train=t(np.ascontiguousarray(y_tr)),
        x_val=t(np.ascontiguousarray(x_val)),
        y_val=t(np.ascontiguousarray(y_val)),
        x_test=t(np.ascontiguousarray(x_test)),
        y_test=t(np.ascontiguousarray(y_test)),
        num_classes=int(classes),
    )


def load_study_dataset(dataset: Any, *, download: bool | None = None) -> Splits:
    """The splits a study config's ``dataset`` section describes: the one place launch and export
    build them, so both see the same samples in the same order.

    Args:
        download: overrides ``dataset.download`` (export passes False: the data must already be there).
    """
    return load_dataset(
        dataset.name,
        root=dataset.root,
        download=dataset.download if download is None else download,
        image_size=dataset.image_size,
        val_fraction=dataset.val_fraction,
        seed=dataset.seed,
        max_train_samples=dataset.max_train_samples,
    )
