"""Learnable image folders made on the spot: each class is a colour, with noise and a shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ((200, 40, 40), (40, 180, 60), (50, 60, 210))
CLASSES = ("blue", "green", "red")  # sorted, as ImageFolder indexes them


def write_split(root: Path, per_class: int, seed: int, size: int = 40) -> None:
    """``root/CLASS/i.png`` for each class: its colour, noise, and a random darker square."""
    rng = np.random.default_rng(seed)
    colours = dict(zip(("red", "green", "blue"), COLOURS))
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array(colours[name], dtype=np.float32)
            image = base + rng.normal(0, 40, size=(size, size, 3))
            x, y = rng.integers(0, size - 12, size=2)
            image[y : y + 12, x : x + 12] *= 0.5
            pixels = np.clip(image, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def write_tree(root: Path, train_per_class: int = 24, val_per_class: int = 8) -> Path:
    write_split(root / "train", train_per_class, seed=1)
    write_split(root / "val", val_per_class, seed=2)
    return root
