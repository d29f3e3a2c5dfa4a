"""Generate a synthetic dataset in the exact Cityscapes layout, with learnable structure.

Each image is a street-like scene: sky above, road below, a sidewalk strip, buildings, vegetation,
poles, signs and a few objects (cars, persons, ...) drawn as shapes. Every class has its own color
(jittered per image) and its own texture (stripes of a class-specific orientation and frequency plus
noise), so a segmentation network must use color, texture and shape. Pixels left to "void"
labelIds (0-6, trainId 255) appear as an ego-vehicle strip at the bottom. This is a stand-in for
Cityscapes, which cannot be downloaded here; numbers measured on it are a demonstration only.

    python -m lightning_ssl.datamodules.synthetic_cityscapes OUT_DIR --train 64 --val 16 --width 128 --height 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torchvision.io import write_png

from lightning_ssl.datamodules.cityscapes import CITYSCAPES_CLASSES, LABEL_ID_TO_TRAIN_ID

__all__ = ["make_synthetic_cityscapes", "synthetic_scene", "CLASS_LABEL_IDS"]

# labelId of each of the 19 evaluation classes, in trainId order
CLASS_LABEL_IDS = tuple(sorted(LABEL_ID_TO_TRAIN_ID, key=LABEL_ID_TO_TRAIN_ID.get))
_EGO_VEHICLE = 1  # a void labelId (trainId 255)
_rng_colors = np.random.default_rng(12345)
_COLORS = _rng_colors.integers(30, 226, size=(len(CLASS_LABEL_IDS), 3))
_TEXTURE = [
    (float(a), float(f))
    for a, f in zip(
        np.linspace(0, np.pi, len(CLASS_LABEL_IDS), endpoint=False), _rng_colors.uniform(0.2, 1.2, len(CLASS_LABEL_IDS))
    )
]


def _rect(mask: np.ndarray, value: int, x0: int, y0: int, x1: int, y1: int) -> None:
    h, w = mask.shape
    mask[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = value


def _ellipse(mask: np.ndarray, value: int, cx: float, cy: float, rx: float, ry: float) -> None:
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask[((xx - cx) / max(rx, 1)) ** 2 + ((yy - cy) / max(ry, 1)) ** 2 <= 1] = value


def synthetic_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``(H x W x 3 uint8 image, H x W uint8 labelId map)`` scene."""
    t = {name: i for i, name in enumerate(CITYSCAPES_CLASSES)}  # trainIds
    m = np.full((height, width), t["sky"], dtype=np.int64)  # trainIds while drawing
    horizon = int(height * rng.uniform(0.35, 0.55))
    _rect(m, t["road"], 0, horizon, width, height)
    _rect(m, t["sidewalk"], 0, horizon, width, horizon + max(2, int(0.12 * height)))
    _rect(m, t["terrain"], 0, horizon + int(0.12 * height), int(width * rng.uniform(0.05, 0.2)), height)
    x = 0
    while x < width:  # a skyline of buildings, walls and vegetation
        w = int(rng.uniform(0.1, 0.3) * width)
        top = int(rng.uniform(0.05, 0.3) * height)
        kind = rng.choice([t["building"], t["building"], t["vegetation"], t["wall"]])
        _rect(m, kind, x, top if kind != t["wall"] else horizon - int(0.15 * height), x + w, horizon)
        x += w
    _rect(
        m,
        t["fence"],
        int(rng.uniform(0, 0.6) * width),
        horizon - int(0.08 * height),
        int(rng.uniform(0.6, 1) * width),
        horizon,
    )
    for _ in range(rng.integers(1, 3)):  # poles with a light or a sign
        px = int(rng.uniform(0.05, 0.95) * width)
        top = int(rng.uniform(0.1, 0.3) * height)
        _rect(m, t["pole"], px, top, px + max(1, width // 64), horizon + int(0.1 * height))
        head = t["traffic light"] if rng.random() < 0.5 else t["traffic sign"]
        _rect(m, head, px - width // 48, top - height // 16, px + width // 48 + 1, top + height // 32)
    vehicles = [t["car"], t["car"], t["truck"], t["bus"], t["train"], t["motorcycle"], t["bicycle"]]
    for _ in range(rng.integers(1, 4)):
        kind = int(rng.choice(vehicles))
        scale = {
            t["car"]: 0.18,
            t["truck"]: 0.25,
            t["bus"]: 0.3,
            t["train"]: 0.4,
            t["motorcycle"]: 0.08,
            t["bicycle"]: 0.07,
        }[kind]
        w, h = int(scale * width), int(scale * width * (0.5 if kind in (t["car"], t["train"]) else 0.7))
        x0 = int(rng.uniform(0, 1 - scale) * width)
        y1 = int(rng.uniform(horizon + 0.1 * height, height * 0.95))
        _rect(m, kind, x0, y1 - h, x0 + w, y1)
    for _ in range(rng.integers(1, 4)):  # persons and riders as ellipses
        kind = t["person"] if rng.random() < 0.7 else t["rider"]
        cx, cy = rng.uniform(0.05, 0.95) * width, rng.uniform(horizon, height * 0.85)
        _ellipse(m, kind, cx, cy, width * 0.02, height * 0.1)
    label_ids = np.asarray(CLASS_LABEL_IDS, dtype=np.uint8)[m]
    label_ids[int(height * 0.94) :, :] = _EGO_VEHICLE

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), dtype=np.float32)
    jitter = rng.uniform(-25, 25, size=3)
    for c in np.unique(m):
        angle, freq = _TEXTURE[c]
        stripes = 20 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        region = m == c
        image[region] = _COLORS[c] + jitter + stripes[region, None]
    image[label_ids == _EGO_VEHICLE] = 40
    image += rng.normal(0, 12, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label_ids


def make_synthetic_cityscapes(
    root: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    width: int = 128,
    height: int = 64,
    num_extra: int = 0,
    seed: int = 0,
    cities: tuple[str, ...] = ("aachen", "bremen"),
) -> Path:
    """Write ``leftImg8bit/{train,val[,train_extra]}`` and ``gtFine/{train,val}`` under ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val), ("train_extra", num_extra)):
        for i in range(count):
            city = cities[i % len(cities)]
            name = f"{city}_{i:06d}_000019"
            image, labels = synthetic_scene(rng, width, height)
            img_dir = root / "leftImg8bit" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            write_png(torch.from_numpy(image).permute(2, 0, 1).contiguous(), str(img_dir / f"{name}_leftImg8bit.png"))
            if split != "train_extra":
                gt_dir = root / "gtFine" / split / city
                gt_dir.mkdir(parents=True, exist_ok=True)
                write_png(torch.from_numpy(labels)[None].contiguous(), str(gt_dir / f"{name}_gtFine_labelIds.png"))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory (the Cityscapes root)")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--extra", type=int, default=0, help="unlabeled train_extra images")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_synthetic_cityscapes(args.out, args.train, args.val, args.width, args.height, args.extra, args.seed)
    print(f"wrote a synthetic Cityscapes-layout tree to {args.out}")


if __name__ == "__main__":
    main()
