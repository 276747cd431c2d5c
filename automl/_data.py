"""Datasets with fixed, seeded train / validation / test splits, read lazily from disk.

A split is an index set over its source (a :class:`torch.utils.data.Subset`), never a copy. Image
datasets (torchvision's and ImageFolder) are decoded batch by batch, in ``DataLoader`` worker
processes, as training and evaluation ask for them; what travels to Ray workers is the recipe of the
source (a path, a class) and the split indices, never the images. Only the small built-in datasets
(digits, MNIST-1D) are held in memory as tensors.

The test split is only ever used to report a finished model's accuracy; every choice the search
makes (thresholds, early stopping, calibration) uses train or validation data.

Consumers use a small API: :meth:`Splits.batches`, :meth:`Splits.example`,
:meth:`Splits.labels`, :meth:`Splits.tensors`, :meth:`Splits.n`, ``input_shape`` and
``num_classes``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["AUGMENTATIONS", "DATASETS", "Splits", "dataset_from_config", "load_dataset", "loader_workers", "resolve_augment"]

SPLITS = ("train", "val", "test")
#: ``dataset.augment`` values; "auto" picks the kind's default (see :func:`resolve_augment`).
AUGMENTATIONS = ("auto", "none", "flip", "crop_flip", "resized_crop_flip")
#: A user dataset factory: ``package.module:function``.
FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


# --- datasets -----------------------------------------------------------------------------


class _Tensors(Dataset):
    """Inputs and targets held in memory (the small built-in datasets)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class _Lazy(Dataset):
    """A dataset built on first use in each process; it pickles as its recipe, not its contents.

    The launcher builds it once to count samples and read the targets (for stratified splits);
    a Ray worker or ``DataLoader`` worker that receives it builds its own copy on first access, so a
    CIFAR array or an ImageFolder file list never travels through Ray's object store.
    """

    def __init__(self, build: Callable[[], Dataset]) -> None:
        self.build = build
        self._ds: Dataset | None = None
        ds = self.dataset
        self.length = len(ds)  # type: ignore[arg-type]
        targets = getattr(ds, "targets", None)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        classes = getattr(ds, "classes", None)
        self.num_classes = len(classes) if classes is not None else getattr(ds, "num_classes", None)

    @property
    def dataset(self) -> Dataset:
        if self._ds is None:
            self._ds = self.build()
        return self._ds

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None}


class _Files(Dataset):
    """An ImageFolder's files and labels as two numpy arrays, scanned once in the launcher.

    No per-sample Python objects: a few bytes per image (the path relative to the folder), nothing
    for forked ``DataLoader`` workers to copy on write, and no folder scan in every worker (a
    ``torchvision.datasets.ImageFolder`` holds a list of tuples, about 200 bytes per image in each
    process that touches it).
    """

    def __init__(self, folder: str) -> None:
        import torchvision

        scanned = torchvision.datasets.ImageFolder(folder)
        self.folder = folder
        self.classes = list(scanned.classes)
        self.paths = np.array([os.fsencode(os.path.relpath(p, folder)) for p, _ in scanned.samples])
        self.targets = np.asarray(scanned.targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from torchvision.datasets.folder import default_loader

        return default_loader(os.path.join(self.folder, os.fsdecode(self.paths[i]))), int(self.targets[i])


class _Transformed(Dataset):
    """``source`` with ``transform`` applied to each input (train and eval views share one source)."""

    def __init__(self, source: Dataset, transform: Callable[[Any], torch.Tensor] | None) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.source[i]
        return (self.transform(x) if self.transform is not None else x), int(y)


def _source_targets(ds: Dataset) -> np.ndarray | None:
    """Targets of a split's samples without decoding an input, or None when they are not known."""
    if isinstance(ds, _Tensors):
        return ds.y.numpy()
    if isinstance(ds, Subset):
        inner = _source_targets(ds.dataset)
        return None if inner is None else inner[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, _Transformed):
        return _source_targets(ds.source)
    targets = getattr(ds, "targets", None)
    return None if targets is None else np.asarray(targets, dtype=np.int64)


# --- splits ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Splits:
    """One dataset's train / validation / test splits.

    Attributes:
        train, val, test: the splits as torch datasets yielding ``(input, label)``; ``train`` applies
            the training augmentation, ``val`` and ``test`` the deterministic evaluation transform.
        workers: ``DataLoader`` worker processes that decode batches (0 = in this process).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    workers: int = 0
    _example: list = field(default_factory=list, repr=False)

    def _split(self, split: str) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    @property
    def in_memory(self) -> bool:
        return all(isinstance(getattr(self, s), _Tensors) for s in SPLITS)

    def n(self, split: str) -> int:
        """Number of samples in ``split``."""
        return len(self._split(split))  # type: ignore[arg-type]

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of ``split`` ("train", "val" or "test"); ``seed`` fixes the shuffled order.

        In-memory splits are indexed directly; the others go through a ``DataLoader`` with
        ``workers`` processes (``pin_memory`` for copies to a CUDA device).
        """
        ds = self._split(split)
        if isinstance(ds, _Tensors):
            n = len(ds)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                yield ds.x[idx], ds.y[idx]
            return
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            # Seeds both the order and the workers' augmentation draws.
            generator=torch.Generator().manual_seed(seed),
            # Each worker computes with one thread (PyTorch sets it in every worker), so the workers
            # add ``workers`` threads beside the trainer's (automl._threads).
            num_workers=self.workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
        )
        yield from loader

    def example(self) -> torch.Tensor:
        """The first test input (evaluation transform) as a batch of one: a real input for tracing,
        MAC counts and latency."""
        if not self._example:
            x, _ = self.test[0]
            self._example.append(torch.as_tensor(x).unsqueeze(0).contiguous())
        return self._example[0]

    def labels(self, split: str) -> torch.Tensor:
        """All labels of ``split`` (int64), in order; read without decoding inputs when the source
        knows its targets."""
        targets = _source_targets(self._split(split))
        if targets is not None:
            return torch.as_tensor(targets, dtype=torch.int64)
        return torch.cat([y for _, y in self.batches(split, 500)]).long()

    def tensors(self, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``limit`` samples of ``split`` (all when None) stacked as ``(inputs, labels)``.

        Materialises them: meant for bounded uses (calibrating on the validation split, timing a
        sample of test inputs), not for passes over a large dataset (use :meth:`batches`).
        """
        part = self if limit is None else self.head(split, limit)
        ds = part._split(split)
        if isinstance(ds, _Tensors):
            return ds.x, ds.y
        xs, ys = zip(*part.batches(split, 500))
        return torch.cat(xs), torch.cat(ys).long()

    def head(self, split: str, n: int) -> Splits:
        """A copy whose ``split`` is only its first ``n`` samples (quick checks, bounded passes)."""
        ds = self._split(split)
        if isinstance(ds, _Tensors):
            part: Dataset = _Tensors(ds.x[:n], ds.y[:n])
        else:
            part = Subset(ds, range(min(n, len(ds))))  # type: ignore[arg-type]
        return dataclasses.replace(self, **{split: part, "_example": []})

    # Tensors of in-memory datasets, for tests and scripts; a streamed dataset has none.
    def _memory(self, split: str, which: int) -> torch.Tensor:
        ds = self._split(split)
        if not isinstance(ds, _Tensors):
            raise AttributeError(f"{self.name} is streamed from disk and holds no {split} tensors; use batches(), tensors() or labels()")
        return (ds.x, ds.y)[which]

    x_train = property(lambda self: self._memory("train", 0))
    y_train = property(lambda self: self._memory("train", 1))
    x_val = property(lambda self: self._memory("val", 0))
    y_val = property(lambda self: self._memory("val", 1))
    x_test = property(lambda self: self._memory("test", 0))
    y_test = property(lambda self: self._memory("test", 1))

    def describe(self) -> str:
        return (
            f"{self.name}: train {self.n('train')}, val {self.n('val')}, test {self.n('test')}, "
            f"input {self.input_shape}, {self.num_classes} classes"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_example": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


# --- sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    #: ``open(root=..., download=..., options=...) -> (train, test or None)`` torch datasets.
    open: Callable[..., tuple[Dataset, Dataset | None]]
    needs_root: bool
    description: str
    #: "tensor" (in memory, no transforms), or the torchvision kind whose transforms apply.
    kind: str
    #: The augmentation "auto" picks.
    default_augment: str = "none"
    #: Native image side, for crops when ``image_size`` is not set.
    native_size: int | None = None


def _digits(**_: object) -> tuple[Dataset, None]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    return _Tensors(torch.from_numpy(x), torch.from_numpy(d.target.astype(np.int64))), None


def _mnist1d(**_: object) -> tuple[Dataset, Dataset]:
    # Generated locally from the package's templates; its download path is never touched.
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a.astype(dt)))  # noqa: E731
    return (
        _Tensors(t(data["x"], np.float32), t(data["y"], np.int64)),
        _Tensors(t(data["x_test"], np.float32), t(data["y_test"], np.int64)),
    )


_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _torchvision_class(name: str):
    import torchvision

    return {
        "mnist": torchvision.datasets.MNIST,
        "fashion_mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
        "cifar100": torchvision.datasets.CIFAR100,
    }[name]


def _build_torchvision(name: str, root: str, train: bool, download: bool) -> Dataset:
    return _torchvision_class(name)(root, train=train, download=download)


def _torchvision(name: str) -> Callable[..., tuple[Dataset, Dataset]]:
    def open_(*, root: str, download: bool = False, **_: object) -> tuple[Dataset, Dataset]:
        if name == "imagefolder":
            base = Path(root)
            if not (base / "train").is_dir() or not (base / "test").is_dir():
                raise FileNotFoundError(f"dataset.root must hold train/ and test/ class folders, got {root!r}")
            return _Files(str(base / "train")), _Files(str(base / "test"))
        if download:  # once, in the launcher; workers then read the files
            _build_torchvision(name, root, True, True)
            _build_torchvision(name, root, False, True)
        return (
            _Lazy(functools.partial(_build_torchvision, name, root, True, False)),
            _Lazy(functools.partial(_build_torchvision, name, root, False, False)),
        )

    return open_


def _call_factory(reference: str, options: tuple[tuple[str, Any], ...], index: int) -> Dataset:
    module, function = reference.split(":")
    made = getattr(importlib.import_module(module), function)(**dict(options))
    if not isinstance(made, (tuple, list)) or len(made) != 2:
        raise TypeError(f"dataset.name: {reference} must return (train, test) torch datasets, got {type(made).__name__}")
    return made[index]


def _factory(reference: str) -> _Source:
    def open_(*, options: dict[str, Any] | None = None, **_: object) -> tuple[Dataset, Dataset]:
        frozen = tuple(sorted((options or {}).items()))
        return (
            _Lazy(functools.partial(_call_factory, reference, frozen, 0)),
            _Lazy(functools.partial(_call_factory, reference, frozen, 1)),
        )

    return _Source(open_, False, f"user dataset factory {reference}", "user")


DATASETS: dict[str, _Source] = {
    "digits": _Source(_digits, False, "scikit-learn's bundled 8x8 digits (1797 images), in memory", "tensor"),
    "mnist1d": _Source(_mnist1d, False, "MNIST-1D generated offline (4000 train / 1000 test, length 40), in memory", "tensor"),
    "mnist": _Source(_torchvision("mnist"), True, "torchvision MNIST from dataset.root", "mnist", "none", 28),
    "fashion_mnist": _Source(_torchvision("fashion_mnist"), True, "torchvision FashionMNIST from dataset.root", "fashion_mnist", "none", 28),
    "cifar10": _Source(_torchvision("cifar10"), True, "torchvision CIFAR-10 from dataset.root", "cifar10", "crop_flip", 32),
    "cifar100": _Source(_torchvision("cifar100"), True, "torchvision CIFAR-100 from dataset.root", "cifar100", "crop_flip", 32),
    "imagefolder": _Source(
        _torchvision("imagefolder"), True, "ImageFolder with train/ and test/ under dataset.root", "imagefolder", "resized_crop_flip", 224
    ),
}


def get_source(name: str) -> _Source:
    """The source of a built-in dataset name or a ``module:function`` factory."""
    if name in DATASETS:
        return DATASETS[name]
    if FACTORY.fullmatch(name):
        return _factory(name)
    raise KeyError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))} or 'module:function'")


def resolve_augment(name: str, augment: str) -> str:
    """The augmentation a dataset gets: "auto" becomes the kind's default.

    Raises:
        ValueError: an augmentation other than "none" for a dataset whose inputs are not images
            decoded here (digits and MNIST-1D tensors, a user factory's datasets).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    src = get_source(name)
    if augment == "auto":
        return src.default_augment
    if augment != "none" and src.kind in ("tensor", "user"):
        why = "holds tensors" if src.kind == "tensor" else "is a user factory (augment in its own transforms)"
        raise ValueError(f"augment for {name!r} must be 'none' or 'auto' ({name} {why}), got {augment!r}")
    return augment


def transforms_for(name: str, *, image_size: int | None, augment: str) -> tuple[Callable | None, Callable | None]:
    """``(train, eval)`` transforms of a torchvision-kind dataset (None for tensor and user data).

    Evaluation is deterministic: resize (ImageFolder: to ``image_size`` square, default 224), to
    tensor, normalise with the dataset's channel statistics. Training adds the augmentation:
    ``flip`` (horizontal), ``crop_flip`` (random crop with 4 pixels of padding, then flip; the
    CIFAR recipe), ``resized_crop_flip`` (random resized crop, then flip; the ImageNet recipe).
    """
    src = get_source(name)
    if src.kind in ("tensor", "user"):
        return None, None
    from torchvision import transforms as T

    mean, std = _STATS[src.kind]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if src.kind == "imagefolder":
        size = image_size or 224
        resize: list = [T.Resize((size, size))]
    else:
        size = image_size or src.native_size
        resize = [T.Resize(image_size)] if image_size else []
    augment = resolve_augment(name, augment)
    train = {
        "none": resize,
        "flip": [*resize, T.RandomHorizontalFlip()],
        "crop_flip": [*resize, T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()],
        "resized_crop_flip": [T.RandomResizedCrop((size, size)), T.RandomHorizontalFlip()],
    }[augment]
    return T.Compose([*train, *tail]), T.Compose([*resize, *tail])


def _split_indices(n: int, targets: np.ndarray | None, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (stratified when targets are known) split of ``range(n)`` into (kept, held out)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(n)
    if targets is not None:
        try:
            kept, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=targets)
            return kept.tolist(), held.tolist()
        except ValueError:  # a class with one sample, or fewer held-out samples than classes
            pass
    kept, held = train_test_split(index, test_size=fraction, random_state=seed)
    return kept.tolist(), held.tolist()


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    max_train_samples: int | None = None,
    augment: str = "auto",
    workers: int = 0,
    options: dict[str, Any] | None = None,
) -> Splits:
    """Open a dataset and split it reproducibly.

    Datasets without their own test split (digits) hold out a stratified 20% as test. The
    validation split is a stratified ``val_fraction`` of the training data (stratified when the
    source knows its targets without decoding). Both use ``seed``. Only index sets are built; no
    image is decoded here except the first test input (for the input shape).

    Args:
        name: a key of :data:`DATASETS` or a ``module:function`` factory returning ``(train, test)``
            torch datasets of ``(input tensor, int label)`` (called with ``options`` as keywords).
        augment: see :func:`transforms_for`; "auto" picks the dataset's default.
        workers: ``DataLoader`` worker processes for streamed datasets.
    """
    src = get_source(name)
    train_src, test_src = src.open(root=root, download=download, options=options)
    train_tf, eval_tf = transforms_for(name, image_size=image_size, augment=augment)
    if test_src is None:
        keep, held = _split_indices(len(train_src), _source_targets(train_src), 0.2, seed)
        train_src, test_src = Subset(train_src, keep), Subset(train_src, held)
    tr, val = _split_indices(len(train_src), _source_targets(train_src), val_fraction, seed)
    if max_train_samples is not None and len(tr) > max_train_samples:
        tr = tr[:max_train_samples]
    num_classes = _count_classes(name, train_src)
    if src.kind == "tensor":
        # Small and in memory: each split is a tensor pair, indexed directly (no DataLoader).
        def grab(ds: Dataset, idx: Sequence[int] | None = None) -> _Tensors:
            x, y = _flatten_tensors(ds)
            if idx is not None:
                x, y = x[torch.as_tensor(idx)], y[torch.as_tensor(idx)]
            return _Tensors(x.contiguous(), y.contiguous())

        train, valid, test = grab(train_src, tr), grab(train_src, val), grab(test_src)
    else:
        train = Subset(_Transformed(train_src, train_tf), tr)
        valid = Subset(_Transformed(train_src, eval_tf), val)
        test = _Transformed(test_src, eval_tf)
    x0, _ = test[0]
    return Splits(name, train, valid, test, int(num_classes), tuple(torch.as_tensor(x0).shape), loader_workers(name, workers))


def loader_workers(name: str, workers: int) -> int:
    """``DataLoader`` worker processes dataset ``name`` gets for ``dataset.workers`` = ``workers``:
    none for the in-memory datasets (indexed in the training process, no loader at all)."""
    return 0 if get_source(name).kind == "tensor" else int(workers)


def _flatten_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, _Tensors):
        return ds.x, ds.y
    assert isinstance(ds, Subset)
    x, y = _flatten_tensors(ds.dataset)
    idx = torch.as_tensor(list(ds.indices))
    return x[idx], y[idx]


def _count_classes(name: str, ds: Dataset) -> int:
    while isinstance(ds, Subset):
        ds = ds.dataset
    if isinstance(ds, _Tensors):
        return int(ds.y.max()) + 1
    classes = getattr(ds, "classes", None)
    if classes is not None:
        return len(classes)
    if getattr(ds, "num_classes", None) is not None:
        return int(ds.num_classes)  # type: ignore[attr-defined]
    targets = _source_targets(ds)
    if targets is not None:
        return int(targets.max()) + 1
    raise ValueError(
        f"dataset.name: the train dataset of {name} must say how many classes it has "
        "(a `classes` list, a `targets` sequence or a `num_classes` attribute)"
    )


def dataset_from_config(d: Any, *, download: bool | None = None) -> Splits:
    """The splits a ``dataset:`` config section describes (study, export and scripts alike)."""
    return load_dataset(
        d.name,
        root=d.root,
        download=d.download if download is None else download,
        image_size=d.image_size,
        val_fraction=d.val_fraction,
        seed=d.seed,
        max_train_samples=d.max_train_samples,
        augment=d.augment,
        workers=d.workers,
        options=dict(d.options),
    )

