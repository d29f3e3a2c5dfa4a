"""CIFAR-10 for the benchmarks: the JPEG tree decoded once into a uint8 tensor, two views made per
batch on the tensor's device (CPU or GPU), so no worker processes and no per-image Python work.

This is local to the benchmarks so they run without the datamodules package's CIFAR-10 module; the
augmentation is SimCLR's CIFAR-10 recipe (Chen et al. 2020, appendix B.9 / A): random resized crop
(scale 0.08-1, ratio 3/4-4/3) with a horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
probability 0.8, grayscale with probability 0.2; no blur at 32x32. Crops and flips are one affine
``grid_sample`` per batch; hue is a rotation of the chroma plane in YIQ space (a close, vectorised
stand-in for the HSV hue shift of torchvision).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["CIFAR_ROOT", "load_cifar10", "random_cifar10", "two_views", "normalize", "TensorTwoViewLoader"]

CIFAR_ROOT = Path(os.environ.get("LIGHTNING_SSL_CIFAR10", Path.home() / ".cache" / "lightning-ssl" / "cifar10-jpg"))
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(split: str, limit: int | None = None, root: Path = CIFAR_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """``N x 3 x 32 x 32`` uint8 images and labels of ``root/split`` (ImageFolder layout).

    ``limit`` keeps the first ``limit // 10`` files of each class (sorted names): a balanced,
    deterministic subset.
    """
    from PIL import Image

    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no CIFAR-10 JPEG tree at {folder}; unpack ../shared/data/cifar10-jpg.tar.gz into {Path(root)} "
            "or set LIGHTNING_SSL_CIFAR10 to the folder holding train/ and test/"
        )
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    per_class = None if limit is None else max(1, limit // len(classes))
    files, labels = [], []
    for label, name in enumerate(classes):
        names = sorted((folder / name).iterdir())[:per_class]
        files += names
        labels += [label] * len(names)
    images = torch.empty(len(files), 32, 32, 3, dtype=torch.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as img:
            images[i] = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).view(32, 32, 3)
    return images.permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def random_cifar10(n: int = 50_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images of CIFAR-10's shape (for throughput, when the JPEG tree is absent)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float32 normalised with CIFAR-10's mean and std."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _crop_flip(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    u = lambda: torch.rand(n, device=dev, generator=gen)  # noqa: E731
    area = 0.08 + (1 - 0.08) * u()
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u()
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the side
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u() - 1)  # centre in [-1 + w, 1 - w] (normalised coordinates)
    cy = (1 - h) * (2 * u() - 1)
    flip = torch.where(u() < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _jitter(x: torch.Tensor, gen: torch.Generator | None, s: float = 1.0) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    f = lambda strength: 1 + strength * s * (2 * torch.rand(n, 1, 1, 1, device=dev, generator=gen) - 1)  # noqa: E731
    x = (x * f(0.4)).clamp(0, 1)  # brightness
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * f(0.4) + mean).clamp(0, 1)  # contrast
    gray = _gray(x)
    x = ((x - gray) * f(0.4) + gray).clamp(0, 1)  # saturation
    angle = (0.1 * s * (2 * torch.rand(n, device=dev, generator=gen) - 1)) * 2 * math.pi  # hue
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
    rgb = torch.linalg.inv(yiq)
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(n, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = rgb @ rot @ yiq  # n x 3 x 3
    return torch.einsum("nij,njhw->nihw", m, x).clamp(0, 1)


@torch.no_grad()
def augment(images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """One SimCLR view of each image of a uint8 batch, normalised float32, on the batch's device."""
    x = images.float().div_(255)
    x = _crop_flip(x, gen)
    n = x.shape[0]
    apply = (torch.rand(n, 1, 1, 1, device=x.device, generator=gen) < 0.8)
    x = torch.where(apply, _jitter(x, gen), x)
    gray = (torch.rand(n, 1, 1, 1, device=x.device, generator=gen) < 0.2)
    x = torch.where(gray, _gray(x), x)
    return normalize(x)


def two_views(images: torch.Tensor, gen: torch.Generator | None = None) -> list[torch.Tensor]:
    return [augment(images, gen), augment(images, gen)]


class TensorTwoViewLoader:
    """Batches ``([view1, view2], labels)`` from uint8 images held on any device (e.g. the GPU).

    Reshuffles every epoch, drops the last incomplete batch, augments each batch on the images'
    device. ``batch_size`` and ``len()`` are what Lightning and ``SSLMethod`` read from a loader.
    ``channels_last`` returns the views in NHWC memory format.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
                 channels_last: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be an N x C x H x W uint8 tensor, got {images.dtype} {tuple(images.shape)}")
        if batch_size > images.shape[0]:
            raise ValueError(f"batch_size {batch_size} exceeds the {images.shape[0]} images")
        self.images, self.labels = images, labels.to(images.device)
        self.batch_size, self.channels_last = batch_size, channels_last
        self.gen = torch.Generator(device=images.device).manual_seed(seed)
        self.dataset = images  # len(loader.dataset) is the number of images

    def __len__(self) -> int:
        return self.images.shape[0] // self.batch_size

    def __iter__(self):
        perm = torch.randperm(self.images.shape[0], device=self.images.device, generator=self.gen)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            views = two_views(self.images[idx], self.gen)
            if self.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            yield views, self.labels[idx]
