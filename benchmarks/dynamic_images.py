"""Images of graded difficulty, for measuring dynamic inference (early exits, glance and focus).

Ten classes, one shape each (disk, square, triangle, ring, plus, diamond, bar, two dots, L, frame),
drawn on a smooth random background. Each image draws its difficulty independently, as real
photographs vary: the object's size (log-uniform, 24-70 % of the side), position (anywhere: a
region worth focusing on), small rotation, colour contrast against the background (0.3-0.8),
pixel noise (sigma up to 0.12), and 0-3 clutter strokes and blobs. Smaller, fainter objects in
more noise (down to 10 % of the side, contrast 0.18, sigma 0.2, 5 strokes) left a 4-layer CNN and
resnet18 trained from scratch on 3,000 images at chance. Many images are easy (a large, contrasted object a glance at
low resolution or an early exit classifies) and some are hard (a small, faint object in noise and
clutter, which needs the whole network at full resolution): the spread a dynamic model exploits.
The seed fixes everything, so a study that generates the data itself always gets the same images.

Two uses, the same images:

- a study's dataset factory (``studies/dynamic_images.yaml``: ``dataset.name:
  "dynamic_images:dataset"`` with this folder on ``python_path``), generated in memory;
- an ImageFolder of PNGs (``root/{train,test}/class_k/*.png``) for ``dataset.name: imagefolder``::

    python benchmarks/dynamic_images.py data/dynamic64 --train 8000 --test 2000 --size 64
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np

CLASSES = ("disk", "square", "triangle", "ring", "plus", "diamond", "bar", "two_dots", "ell", "frame")


def _shape_mask(k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pixels of shape ``k`` in coordinates scaled so that the shape fills [-1, 1]^2."""
    a, b = np.abs(u), np.abs(v)
    r = np.hypot(u, v)
    if k == 0:
        return r <= 1.0
    if k == 1:
        return np.maximum(a, b) <= 0.8
    if k == 2:
        return (v <= 0.6) & (v >= -0.9 + 1.765 * a)
    if k == 3:
        return (r <= 1.0) & (r >= 0.55)
    if k == 4:
        return ((a <= 0.3) & (b <= 0.95)) | ((b <= 0.3) & (a <= 0.95))
    if k == 5:
        return a + b <= 1.0
    if k == 6:
        return (a <= 1.0) & (b <= 0.3)
    if k == 7:
        return (np.hypot(u - 0.5, v) <= 0.38) | (np.hypot(u + 0.5, v) <= 0.38)
    if k == 8:
        return ((u >= -0.8) & (u <= -0.3) & (b <= 0.9)) | ((v >= 0.4) & (v <= 0.9) & (a <= 0.8))
    if k == 9:
        m = np.maximum(a, b)
        return (m <= 0.85) & (m >= 0.5)
    raise ValueError(f"0 <= k < {len(CLASSES)} must hold, but got k={k}")


def render(k: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) float image in [0, 1] of class ``k``, its difficulty drawn from ``rng``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # Background: a smooth gradient between two random colours.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((np.cos(angle) * xs + np.sin(angle) * ys) / size + 1) / 2
    c0, c1 = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
    img = c0 + (c1 - c0) * ramp[..., None] * rng.uniform(0.2, 1.0)
    # Clutter: strokes and blobs that are none of the classes' shapes, faint to strong.
    for _ in range(rng.integers(0, 4)):
        colour = rng.uniform(0, 1, 3)
        alpha = rng.uniform(0.15, 0.6)
        cx, cy = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            t = rng.uniform(0, np.pi)
            d = np.abs((xs - cx) * np.sin(t) - (ys - cy) * np.cos(t))
            along = np.abs((xs - cx) * np.cos(t) + (ys - cy) * np.sin(t))
            mask = (d <= rng.uniform(0.5, 1.5)) & (along <= rng.uniform(0.1, 0.4) * size)
        else:
            mask = np.hypot((xs - cx) / rng.uniform(1, 0.12 * size), (ys - cy) / rng.uniform(1, 0.12 * size)) <= 1
        img = np.where(mask[..., None], (1 - alpha) * img + alpha * colour, img)
    # The object: size, position, rotation and contrast each drawn per image.
    radius = size * np.exp(rng.uniform(np.log(0.12), np.log(0.35)))
    cx, cy = rng.uniform(radius, size - radius, 2)
    theta = rng.uniform(-0.3, 0.3)
    u = ((xs - cx) * np.cos(theta) + (ys - cy) * np.sin(theta)) / radius
    v = (-(xs - cx) * np.sin(theta) + (ys - cy) * np.cos(theta)) / radius
    mask = _shape_mask(k, u, v)
    contrast = rng.uniform(0.3, 0.8)
    local = img[mask].mean(axis=0) if mask.any() else img.mean(axis=(0, 1))
    direction = rng.uniform(-1, 1, 3)
    direction /= max(np.abs(direction).max(), 1e-6)
    colour = np.clip(local + contrast * direction, 0, 1)
    img = np.where(mask[..., None], colour, img)
    img = img + rng.normal(0, rng.uniform(0.01, 0.12), img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def generate(n: int, *, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, 3, size, size) in [0, 1] and their labels, classes balanced (i mod 10)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    images = np.stack([render(int(k), size, rng) for k in labels]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), labels


@functools.lru_cache(maxsize=2)
def _tensors(train: int, test: int, size: int, seed: int) -> tuple:
    import torch

    out = []
    for n, s in ((train, seed), (test, seed + 1)):
        x, y = generate(n, size=size, seed=s)
        # Standardised per channel with fixed constants (the backgrounds' mean and spread).
        out.append((torch.from_numpy((x - 0.5) / 0.25), torch.from_numpy(y).long()))
    return tuple(out)


def dataset(train: int = 8000, test: int = 2000, size: int = 64, seed: int = 0) -> tuple:
    """The study's dataset factory: ``(train, test)`` tensor datasets of :func:`generate`'s images."""
    from torch.utils.data import TensorDataset

    out = []
    for x, y in _tensors(train, test, size, seed):
        made = TensorDataset(x, y)
        made.classes = list(CLASSES)  # how the study counts the classes
        out.append(made)
    return out[0], out[1]


def write(root: Path, *, train: int, test: int, size: int, seed: int = 0) -> None:
    """The same images as PNG files of an ImageFolder."""
    from PIL import Image

    for split, n, s in (("train", train, seed), ("test", test, seed + 1)):
        x, y = generate(n, size=size, seed=s)
        for k in range(len(CLASSES)):
            (root / split / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i, (img, k) in enumerate(zip(x, y)):
            Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(root / split / f"class_{k}" / f"{i:06d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write(a.root, train=a.train, test=a.test, size=a.size, seed=a.seed)
    print(f"wrote {a.train} train / {a.test} test {a.size}x{a.size} PNGs ({len(CLASSES)} classes) under {a.root}")


if __name__ == "__main__":
    main()
