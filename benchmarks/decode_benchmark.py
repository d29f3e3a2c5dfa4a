"""Images per second of decoding a batch of JPEGs and squashing it to the on-device augmentation's
square (``gpu_load_size``, ``round(size x 8 / 7)``: 256 for 224): the work that ``gpu_decode=True``
moves from the loader's workers to the device.

* PIL in a worker: what the ``gpu_augment`` path does per image in a worker (``load_rgb`` and
  ``FixedSizeUint8``), one process;
* bytes in a worker: what a worker does with ``gpu_decode``: read the file and check it
  (``EncodedViewsDataset``), one process;
* decode_jpeg on the CPU: ``gpu_decode.decode_batch`` (torchvision's libjpeg-turbo decoder, then the
  torch resize), batches of ``--batch``, ``--threads`` torch threads; also the decoding alone;
* decode_jpeg on CUDA: the same, batched with nvjpeg, when CUDA is available; also the decoding alone.

The images are read once into memory (``--images`` of them, from ``--root``, an ImageFolder split
with class sub-folders), so the disk is not timed except in "bytes in a worker". ``--upscale 224`` (or
``500x375``) first writes each image resized to that size as a JPEG (quality 90) to a temporary folder
and measures those; with no ``--root`` tree, smooth random JPEGs of that size are written instead.

    python -m benchmarks.decode_benchmark --root ~/.cache/lightning-ssl/cifar10-jpg/train --batch 256 --size 32
    python -m benchmarks.decode_benchmark --root ~/.cache/lightning-ssl/cifar10-jpg/train --batch 256 --size 224 \\
        --upscale 224
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from benchmarks.common import CIFAR_ROOT, add_common_args, header, write_json
from lightning_ssl.datamodules.gpu_decode import EncodedViewsDataset, collate_encoded, decode_batch, decode_images
from lightning_ssl.datamodules.image_folder import RobustImageFolder, load_rgb
from lightning_ssl.datamodules.two_view_datamodule import FixedSizeUint8


def parse_size(text: str) -> tuple[int, int]:
    """``224`` -> (224, 224); ``500x375`` -> (500, 375) (width x height)."""
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def write_tree(folder: Path, root: Path | None, count: int, size: tuple[int, int], seed: int) -> Path:
    """``count`` JPEGs of ``size`` under ``folder/c<k>/``: ``root``'s images resized (bicubic), or smooth
    random images when ``root`` is None."""
    rng = np.random.default_rng(seed)
    sources = [p for p, _ in RobustImageFolder(root).samples[:count]] if root is not None else [None] * count
    w, h = size
    for i, path in enumerate(sources):
        if path is not None:
            image = load_rgb(path).resize(size, Image.BICUBIC)
        else:
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            chans = [
                np.sin(2 * np.pi * (rng.uniform(1, 6) * xx + rng.uniform(1, 6) * yy + rng.uniform())) for _ in "rgb"
            ]
            arr = (np.stack(chans, -1) * 0.4 + 0.5 + rng.normal(0, 0.05, (h, w, 3))).clip(0, 1)
            image = Image.fromarray((arr * 255).astype(np.uint8))
        (folder / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        image.save(folder / f"c{i % 4}" / f"{i}.jpg", quality=90)
    return folder


def rate(work: Callable[[int], int], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    """Images per second of ``work(step) -> images done``, after one untimed call (warm-up)."""
    work(0)
    sync()
    done, step, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += work(step)
        step += 1
    sync()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=CIFAR_ROOT / "train", help="an ImageFolder split (class folders)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="side of the views (the square is round(size x 8 / 7))")
    parser.add_argument("--images", type=int, default=1024, help="images read into memory (and upscaled)")
    parser.add_argument("--upscale", type=parse_size, help="measure JPEGs of this size made from --root (224, 500x375)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    add_common_args(parser).set_defaults(threads=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = round(args.size * 8 / 7)
    root = args.root.expanduser() if args.root and args.root.expanduser().is_dir() else None

    with tempfile.TemporaryDirectory() as tmp:
        if args.upscale is not None:
            made = write_tree(Path(tmp) / "train", root, args.images, args.upscale, args.seed)
            source = f"{args.images} JPEGs of {args.upscale[0]}x{args.upscale[1]} made from {root or 'random images'}"
            root = made
        elif root is None:
            raise SystemExit(f"no ImageFolder tree at {args.root}; pass --root, or --upscale to write random JPEGs")
        else:
            source = f"{root}"
        folder = RobustImageFolder(root)
        dataset = EncodedViewsDataset(folder)
        items = [dataset[i] for i in range(min(args.images, len(folder)))]
        n = len(items)
        mean_kb = sum(it["encoded_images"].numel() for it in items) / n / 1024
        batches = [collate_encoded(items[i : i + args.batch])["encoded_images"] for i in range(0, n, args.batch)]
        blobs = [it["encoded_images"].numpy().tobytes() for it in items]
        print(header(f"decode benchmark, batch {args.batch}, square {load} (views {args.size})"))
        print(f"# data: {source}: {n} images, {mean_kb:.1f} KiB each on average; torchvision {torchvision.__version__}")

        squash = FixedSizeUint8(load)
        rows = []

        def add(path: str, device: str, images_per_s: float) -> None:
            rows.append(
                {
                    "path": path,
                    "device": device,
                    "images_per_s": images_per_s,
                    "ms_per_batch": 1e3 * args.batch / images_per_s,
                }
            )

        def pil(step: int) -> int:
            squash(load_rgb(io.BytesIO(blobs[step % n])))
            return 1

        add("PIL decode + resize in a worker (gpu_augment)", "cpu, 1 process", rate(pil, args.seconds))

        def read(step: int) -> int:
            dataset.read(step % len(folder))
            return 1

        add("read file + check in a worker (gpu_decode)", "cpu, 1 process", rate(read, args.seconds))
        threads = f"cpu, {torch.get_num_threads()} thread(s)"
        add(
            "decode_jpeg only",
            threads,
            rate(lambda s: len(decode_images(batches[s % len(batches)].tensors(), "cpu")[0]), args.seconds),
        )
        add(
            "decode_jpeg + resize (decode_batch)",
            threads,
            rate(lambda s: len(decode_batch(batches[s % len(batches)], load, "cpu")[0]), args.seconds),
        )
        if torch.cuda.is_available():
            cuda, sync = torch.device("cuda"), torch.cuda.synchronize
            name = torch.cuda.get_device_name()
            add(
                "decode_jpeg only, batched (nvjpeg)",
                name,
                rate(lambda s: len(decode_images(batches[s % len(batches)].tensors(), cuda)[0]), args.seconds, sync),
            )
            add(
                "decode_jpeg + resize (decode_batch), batched",
                name,
                rate(lambda s: len(decode_batch(batches[s % len(batches)], load, cuda)[0]), args.seconds, sync),
            )
        print("| path | device | images/s | ms per batch |")
        print("|---|---|---:|---:|")
        for row in rows:
            print(f"| {row['path']} | {row['device']} | {row['images_per_s']:,.0f} | {row['ms_per_batch']:.1f} |")
        if not torch.cuda.is_available():
            print("CUDA not available: not measured on GPU")
        write_json(args.json, args, rows)


if __name__ == "__main__":
    main()
