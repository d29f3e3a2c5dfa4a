"""Generated image trees in the on-disk layouts the datamodules read (for tests, under tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colorful RGB image (random gradients plus noise), so crops and jitter matter."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [
        np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform())) for _ in range(3)
    ]
    arr = (np.stack(channels, -1) * 0.4 + 0.5 + rng.normal(0, 0.05, (height, width, 3))).clip(0, 1)
    return Image.fromarray((arr * 255).astype(np.uint8), "RGB")


def make_tree(
    root: Path,
    splits: dict[str, int],
    classes: list[str],
    size: tuple[int, int] | None = (32, 32),
    ext: str = ".jpg",
    seed: int = 0,
) -> Path:
    """``root/<split>/<class>/<class>_<i><ext>`` with ``splits[split]`` images per class; ``size=None``
    draws ImageNet-like sizes (width 40-90, height 30-70) to exercise non-square images."""
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = size if size is not None else (int(rng.integers(40, 90)), int(rng.integers(30, 70)))
                random_image(rng, w, h).save(folder / f"{cls}_{i}{ext}", quality=90)
    return root


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
