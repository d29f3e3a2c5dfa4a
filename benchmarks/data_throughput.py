"""Two-view images per second of three SimCLR data paths, at 32x32 and 224x224.

* baseline: ``torchvision.datasets.ImageFolder`` + a ``torchvision.transforms`` (v1) SimCLR pipeline
  on PIL images, two views per image, in DataLoader worker processes;
* cpu: this project's datamodule (``ImageNetDataModule``) with the views made in the workers;
* device: the same datamodule with ``gpu_augment=True``: workers decode and resize to uint8, the views
  are made by ``GPUAugment`` on ``--device`` (the CPU when there is no GPU) after the transfer;
* device ops only: ``GPUAugment`` alone on a uint8 batch already in memory (no decoding).

"Two-view images/s" counts source images turned into a pair of views per second, after one warm-up
batch. 32x32 reads the CIFAR-10 JPEG copy when present (else generated 32x32 JPEGs); 224x224 reads
generated 500x375 JPEGs (ImageNet's typical size).

    python -m benchmarks.data_throughput                   # ~2-3 minutes on 2 CPU cores
    python -m benchmarks.data_throughput --device cuda --workers 8
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.common import CIFAR_ROOT as CIFAR
from lightning_ssl.datamodules import ImageNetDataModule
from lightning_ssl.datamodules.augmentations import blur_kernel_size, preset
from lightning_ssl.datamodules.gpu_augment import GPUAugment


def make_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i in range(n):
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        chans = [
            np.sin(2 * np.pi * (rng.uniform(1, 6) * xx + rng.uniform(1, 6) * yy + rng.uniform())) for _ in range(3)
        ]
        arr = (np.stack(chans, -1) * 0.4 + 0.5 + rng.normal(0, 0.08, (h, w, 3))).clip(0, 1)
        Image.fromarray((arr * 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    (root / "val").mkdir(exist_ok=True)
    return root


class TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def baseline_loader(root: Path, size: int, batch: int, workers: int) -> DataLoader:
    import torchvision.transforms as T

    s = 0.5 if size <= 64 else 1.0
    ops = [
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if size > 64:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=0.5))
    ops += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=TwoViews(T.Compose(ops)))
    return DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )


def ours(root: Path | None, size: int, batch: int, workers: int, gpu: bool, **source) -> ImageNetDataModule:
    """The project's datamodule on ``root`` (or on ``source``, e.g. ``shards=...``) with the SimCLR views."""
    small = size <= 64
    source = {"root": str(root), **source} if root is not None else source
    return ImageNetDataModule(
        **source,
        batch_size=batch,
        num_workers=workers,
        image_size=size,
        small_image=small,
        strength=0.5 if small else 1.0,
        gpu_augment=gpu,
        gpu_load_size=size if small else 256,
        pin_memory=False,
    )


def measure(loader, seconds: float, after=None) -> float:
    """Images per second over whole batches, excluding the first (worker start-up) batch."""
    it = iter(loader)
    batch = next(it)
    if after is not None:
        after(batch)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        out = after(batch) if after is not None else batch
        views = out[0] if isinstance(out, (tuple, list)) else out
        images += views[0].shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch", type=int, nargs=2, default=[128, 32], help="batch at 32 and at 224")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (device path runs on the CPU)"
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, "
        f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    print(
        f"accelerator: {gpu_name}; workers: {args.workers}; main-process torch threads: {torch.get_num_threads()}; "
        f"{args.seconds:.0f} s per measurement; recipe: SimCLR (32: s=0.5, no blur; 224: s=1.0, blur p=0.5)"
    )

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            batch = args.batch[0] if size <= 64 else args.batch[1]
            if size <= 64 and (CIFAR / "train").is_dir():
                root, source = CIFAR, "CIFAR-10 JPEG copy (50,000 32x32)"
            elif size <= 64:
                root, source = make_jpegs(Path(tmp) / "small", 2048, (32, 32)), "2,048 generated 32x32 JPEGs"
            else:
                root, source = make_jpegs(Path(tmp) / "large", 384, (500, 375)), "384 generated 500x375 JPEGs"

            base = measure(baseline_loader(root, size, batch, args.workers), args.seconds)
            rows.append((size, "baseline: torchvision PIL pipeline in workers", base, source, batch))
            dm = ours(root, size, batch, args.workers, gpu=False)
            rows.append(
                (size, "ours, CPU path (views in workers)", measure(dm.train_dataloader(), args.seconds), source, batch)
            )
            dm = ours(root, size, batch, args.workers, gpu=True)

            def on_device(b, dm=dm):
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
                out = dm.on_after_batch_transfer(b, 0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return out

            rows.append(
                (
                    size,
                    f"ours, on-device path ({device.type})",
                    measure(dm.train_dataloader(), args.seconds, on_device),
                    source,
                    batch,
                )
            )
            aug = GPUAugment(preset("simclr", size, 0.5 if size <= 64 else 1.0, size <= 64)).to(device)
            load = size if size <= 64 else 256
            pixels = torch.randint(0, 256, (batch, 3, load, load), dtype=torch.uint8, device=device)
            sizes = torch.tensor([[375, 500]] * batch, device=device) if size > 64 else None

            def ops_only(_, aug=aug, pixels=pixels, sizes=sizes):
                out = aug(pixels, sizes)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return out, None

            rows.append(
                (
                    size,
                    f"on-device ops only ({device.type}, no decoding)",
                    measure(iter(lambda: 0, 1), args.seconds / 2, ops_only),
                    "uint8 batch in memory",
                    batch,
                )
            )

    print()
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print()
    print("| size | path | two-view images/s | per worker (ops only: per thread) | batch | data |")
    print("|---|---|---:|---:|---:|---|")
    for size, path, rate, source, batch in rows:
        per = rate / (args.workers if "ops only" not in path and args.workers else torch.get_num_threads())
        print(f"| {size}x{size} | {path} | {rate:,.0f} | {per:,.0f} | {batch} | {source} |")


if __name__ == "__main__":
    main()
