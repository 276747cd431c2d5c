"""Datasets: fixed seeded splits, offline sources, torchvision formats read from a user root."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from automl import load_dataset
from automl._data import DATASETS


def test_digits_splits_are_disjoint_stratified_and_reproducible():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train), "same seed gave different splits"
    assert not torch.equal(a.x_test, c.x_test), "a different seed gave the same test split"
    total = len(a.x_train) + len(a.x_val) + len(a.x_test)
    assert total == 1797, f"digits has 1797 images, splits hold {total}"
    rows = lambda x: {r.numpy().tobytes() for r in x}  # noqa: E731
    assert not (rows(a.x_train) & rows(a.x_test)) or len(rows(a.x_train) & rows(a.x_test)) < 5, "train and test overlap"
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 30, f"test split not stratified: {counts.tolist()}"


def test_mnist1d_is_generated_offline_with_its_own_test_split(monkeypatch):
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    d = load_dataset("mnist1d", seed=0)
    assert d.input_shape == (40,) and len(d.x_test) == 1000, d.describe()
    assert len(d.x_train) + len(d.x_val) == 4000, d.describe()


def _write_idx(path, array: np.ndarray) -> None:
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_idx_format_from_user_root(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    # torchvision reads the unpacked files; unpack as its download step would.
    for gz in raw.glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.open(gz).read())
    d = load_dataset(name, root=str(tmp_path), val_fraction=0.2)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10, d.describe()
    assert len(d.x_test) == 20 and len(d.x_train) + len(d.x_val) == 60, d.describe()


def test_imagefolder_from_user_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = load_dataset("imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.25)
    assert d.input_shape == (3, 16, 16) and d.num_classes == 2, d.describe()
    assert len(d.x_test) == 8 and len(d.x_train) == 18, d.describe()


def test_imagefolder_without_split_folders_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/ and test/"):
        load_dataset("imagefolder", root=str(tmp_path))


def test_every_dataset_is_described():
    for name, src in DATASETS.items():
        assert src.description, f"dataset {name} has no description"
