"""Write a synthetic ImageFolder of PNGs (nothing downloaded): ``root/{train,test}/class_k/*.png``.

Each class has its own colour gradient with per-image noise, so a small CNN can learn it; file
sizes are those of real small PNGs. Used by ``benchmarks/streamed_data.py``.

    python benchmarks/make_imagefolder.py data/if60k --train 50000 --test 10000 --size 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write(root: Path, *, train: int, test: int, size: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    for split, n in (("train", train), ("test", test)):
        for k in range(classes):
            (root / split / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            k = i % classes
            angle = 2 * np.pi * k / classes
            base = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
            rgb = np.stack([base, np.roll(base, k, axis=0), 1 - base], axis=-1)
            img = np.clip((rgb * 0.6 + 0.2 + rng.normal(0, 0.15, rgb.shape)) * 255, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / split / f"class_{k}" / f"{i:06d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    write(a.root, train=a.train, test=a.test, size=a.size)
    print(f"wrote {a.train} train / {a.test} test {a.size}x{a.size} PNGs under {a.root}")


if __name__ == "__main__":
    main()
