"""A fixture unlike the shared data, for ``featx auto``'s figures: five classes of noisy gratings (orientation is the
class; frequency, phase and contrast vary), 8 training and 12 test images a class, no val/ folder. Far from
ImageNet, few-shot, and the comparison rows must be carved out of train.

    python benchmarks/auto_fixture.py OUT_DIR
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ANGLES = (0, 36, 72, 108, 144)


def grating(angle: float, rng: np.random.Generator, size: int = 96) -> Image.Image:
    y, x = np.mgrid[:size, :size] / size
    theta = np.deg2rad(angle + rng.normal(0, 6))
    wave = np.sin(2 * np.pi * rng.uniform(3, 9) * (x * np.cos(theta) + y * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    grey = 128 + rng.uniform(20, 60) * wave + rng.normal(0, 45, (size, size))
    tint = rng.uniform(0.7, 1.0, 3)
    return Image.fromarray(np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8), "RGB")


def main(out: Path, train: int = 8, test: int = 12) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for angle in ANGLES:
            folder = out / split / f"angle{angle:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                grating(angle, rng).save(folder / f"{i:03d}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
