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
    assert d.n("test") == 20 and d.n("train") + d.n("val") == 60, d.describe()
    assert torch.equal(d.labels("test"), torch.arange(20) % 10), f"test labels {d.labels('test').tolist()}"
    x, _ = d.tensors("val")
    assert x.shape == (d.n("val"), 1, 28, 28), f"val inputs {tuple(x.shape)}"


def test_imagefolder_from_user_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = load_dataset("imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.25)
    assert d.input_shape == (3, 16, 16) and d.num_classes == 2, d.describe()
    assert d.n("test") == 8 and d.n("train") == 18, d.describe()


def test_imagefolder_without_split_folders_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/ and test/"):
        load_dataset("imagefolder", root=str(tmp_path))


def test_every_dataset_is_described():
    for name, src in DATASETS.items():
        assert src.description, f"dataset {name} has no description"


# --- streaming (issue 12) -------------------------------------------------------------------

import pickle  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from torch.utils.data import Subset  # noqa: E402

from automl._data import _Files, _Lazy, transforms_for  # noqa: E402


def _image_folder(root, *, n_train=12, n_test=4, size=(20, 24), classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture
def counting_factory(tmp_path, monkeypatch):
    """A user dataset factory in a module of its own whose datasets count every sample read."""
    (tmp_path / "counted_data.py").write_text(textwrap.dedent('''
        import torch
        from torch.utils.data import Dataset

        READS = {"train": 0, "test": 0}

        class Counted(Dataset):
            def __init__(self, split, n):
                self.split, self.n = split, n
                self.targets = [i % 3 for i in range(n)]
                self.classes = ["a", "b", "c"]
            def __len__(self):
                return self.n
            def __getitem__(self, i):
                READS[self.split] += 1
                return torch.full((2, 4, 4), float(i)), self.targets[i]

        def build(n_train=60, n_test=15):
            return Counted("train", n_train), Counted("test", n_test)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("counted_data", None)
    import counted_data

    yield counted_data
    sys.modules.pop("counted_data", None)


def test_user_factory_is_read_lazily_one_batch_at_a_time(counting_factory):
    reads = counting_factory.READS
    d = load_dataset("counted_data:build", options={"n_train": 60, "n_test": 15}, val_fraction=0.2)
    assert reads == {"train": 0, "test": 1}, f"opening the dataset decoded samples beyond the one for the input shape: {reads}"
    assert (d.n("train"), d.n("val"), d.n("test")) == (48, 12, 15), d.describe()
    assert d.input_shape == (2, 4, 4) and d.num_classes == 3, d.describe()
    first = next(d.batches("train", 8, shuffle=True, seed=0))
    assert reads["train"] == 8, f"one batch of 8 read {reads['train']} training samples"
    # Labels come from the source's targets without reading an input.
    labels = d.labels("val")
    assert reads["train"] == 8, "labels() decoded inputs although the source knows its targets"
    seen = torch.cat([y for _, y in d.batches("val", 5)])
    assert torch.equal(labels, seen), f"labels('val') {labels.tolist()} differ from the batches' labels {seen.tolist()}"
    # Inputs carry their source index: the shuffled batch holds training indices only.
    assert set(first[0][:, 0, 0, 0].long().tolist()) <= set(d.train.indices), "a training batch held a sample outside the train split"


def test_pickled_splits_carry_no_images(tmp_path):
    small = load_dataset("imagefolder", root=str(_image_folder(tmp_path / "s", size=(8, 8))), image_size=8)
    big = load_dataset("imagefolder", root=str(_image_folder(tmp_path / "b", size=(256, 256))), image_size=8)
    sizes = {k: len(pickle.dumps(d)) for k, d in (("small", small), ("big", big))}
    decoded = 32 * 256 * 256 * 3
    assert abs(sizes["big"] - sizes["small"]) < 64, f"pickled splits grow with the images' size: {sizes}"
    assert sizes["big"] < decoded // 100, f"pickled splits ({sizes['big']} B) hold image data ({decoded} B decoded)"
    copy = pickle.loads(pickle.dumps(big))
    files = copy.test.source
    assert isinstance(files, _Files) and files.paths.dtype.kind == "S", f"the ImageFolder source is {type(files).__name__}, not file paths"
    assert torch.equal(copy.example(), big.example()), "the unpickled splits read a different first test input"


def test_splits_are_seeded_disjoint_index_sets_never_copies(tmp_path):
    root = str(_image_folder(tmp_path, n_train=20, n_test=5))
    a, b = (load_dataset("imagefolder", root=root, image_size=8, val_fraction=0.25, seed=0) for _ in range(2))
    c = load_dataset("imagefolder", root=root, image_size=8, val_fraction=0.25, seed=1)
    for split in ("train", "val"):
        assert isinstance(getattr(a, split), Subset), f"{split} is not an index set over its source"
    assert a.train.dataset.source is a.val.dataset.source, "train and val do not share one source (a copy was made)"
    tr, va = set(a.train.indices), set(a.val.indices)
    assert not tr & va, f"train and val share samples {sorted(tr & va)}"
    assert tr | va == set(range(40)), f"train + val do not cover the 40 training images: {sorted(tr | va)}"
    assert a.train.indices == b.train.indices and a.val.indices == b.val.indices, "the same seed gave different splits"
    assert set(c.val.indices) != va, "a different seed gave the same validation split"
    assert torch.bincount(a.labels("val")).tolist() == [5, 5], f"val split not stratified: {a.labels('val').tolist()}"


def test_streamed_batches_through_worker_processes_match_in_process(tmp_path):
    root = str(_image_folder(tmp_path, n_train=10, n_test=6))
    inline = load_dataset("imagefolder", root=root, image_size=8, workers=0)
    workers = load_dataset("imagefolder", root=root, image_size=8, workers=2)
    x0, y0 = inline.tensors("test")
    x2, y2 = workers.tensors("test")
    assert torch.equal(x0, x2) and torch.equal(y0, y2), "worker processes decoded the test split differently"
    assert torch.equal(y0, inline.labels("test")), "tensors('test') labels differ from labels('test')"
    assert torch.equal(inline.example(), x0[:1]), "example() is not the first test input"
    with pytest.raises(AttributeError, match="streamed"):
        inline.x_test  # noqa: B018


def _write_cifar(root, n_per_batch=4, seed=0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)
        images[name] = data
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in rng.integers(0, 10, n_per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return images


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # The files are tiny stand-ins: skip torchvision's md5 check, as torchvision's own tests do.
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    images = _write_cifar(tmp_path)
    return tmp_path, images


def test_cifar_format_eval_transform_is_the_normalised_image(cifar_root):
    root, images = cifar_root
    d = load_dataset("cifar10", root=str(root), val_fraction=0.25)
    assert (d.n("train") + d.n("val"), d.n("test"), d.num_classes, d.input_shape) == (20, 4, 10, (3, 32, 32)), d.describe()
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    raw = torch.from_numpy(images["test_batch"][0].reshape(3, 32, 32)).float() / 255
    expected = (raw - mean[:, None, None]) / std[:, None, None]
    got = d.example()[0]
    assert torch.allclose(got, expected, atol=1e-5), f"eval transform differs from (x/255 - mean)/std by {float((got - expected).abs().max())}"
    again = [d.val[0][0] for _ in range(3)]
    assert all(torch.equal(again[0], a) for a in again), "the evaluation transform is not deterministic"
    # The CIFAR arrays stay behind when the splits travel (to a Ray worker): rebuilt there on first use.
    copy = pickle.loads(pickle.dumps(d))
    assert isinstance(copy.test.source, _Lazy) and copy.test.source._ds is None, "the pickled CIFAR source carried its arrays"
    assert len(pickle.dumps(d)) < 20_000, f"pickled CIFAR splits are {len(pickle.dumps(d))} bytes"
    assert torch.equal(copy.example(), d.example()), "the rebuilt source read a different first test input"


def test_cifar_train_augmentation_is_a_padded_crop_and_flip_of_the_eval_image(cifar_root):
    from torchvision.transforms import functional as TF

    root, _ = cifar_root
    d = load_dataset("cifar10", root=str(root))
    source = d.train.dataset.source
    i = d.train.indices[0]
    image, _ = source[i]
    _, eval_tf = transforms_for("cifar10", image_size=None, augment="auto")
    # Zero padding happens before normalisation: pad the [0, 1] image, then normalise.
    padded = TF.pad(TF.to_tensor(image), 4)
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None], torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            window = (padded[:, dy : dy + 32, dx : dx + 32] - mean) / std
            candidates[(dy, dx, False)] = window
            candidates[(dy, dx, True)] = window.flip(-1)
    drawn = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out, _ = d.train[0]
        match = [k for k, c in candidates.items() if torch.allclose(out, c, atol=1e-5)]
        assert match, f"seed {seed}: the augmented image is no padded 32x32 crop (flipped or not) of the source image"
        drawn.add(match[0])
    assert len({k[2] for k in drawn}) == 2, f"40 draws never flipped (or always flipped): {sorted(drawn)}"
    assert len({k[:2] for k in drawn}) > 5, f"40 draws gave only crops {sorted({k[:2] for k in drawn})}"
    assert torch.allclose(d.val[0][0], eval_tf(source[d.val.indices[0]][0])), "val is not the evaluation transform"


def test_augment_defaults_per_kind():
    from automl._data import resolve_augment

    assert [resolve_augment(n, "auto") for n in ("cifar10", "cifar100", "imagefolder", "digits", "mnist1d", "mnist")] == [
        "crop_flip", "crop_flip", "resized_crop_flip", "none", "none", "none"
    ]
    with pytest.raises(ValueError, match="augment for 'digits'"):
        resolve_augment("digits", "flip")


def test_imagefolder_resized_crop_is_random_and_eval_is_fixed(tmp_path):
    d = load_dataset("imagefolder", root=str(_image_folder(tmp_path, size=(40, 40))), image_size=16)
    outs = []
    for seed in range(5):
        torch.manual_seed(seed)
        outs.append(d.train[0][0])
    assert outs[0].shape == (3, 16, 16), f"train crop shape {tuple(outs[0].shape)}"
    assert any(not torch.equal(outs[0], o) for o in outs[1:]), "five training draws of one image were identical"
    assert torch.equal(d.test[0][0], d.test[0][0]), "the evaluation transform is not deterministic"
