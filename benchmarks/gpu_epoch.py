"""Epoch time of each method on the user's fast path: CIFAR-10 decoded into memory and held on the
device (``CIFAR10DataModule(in_memory=True, gpu_augment=True, resident_device="cuda")``), views made
on the device by the library's ``GPUAugment``, bf16 mixed precision, channels_last, fused optimizer
steps (and optionally a compiled backbone), trained by ``Trainer.fit``.

Prints, per method: two-view images per second over the last (timed) epoch, the epoch time, the
estimated time of 200 epochs, the model FLOPs per image (forward and backward of every network,
counted with ``torch.utils.flop_counter``) and the model FLOP utilization (MFU = achieved FLOP/s
over the device's dense bf16 peak). Uses the CIFAR-10 JPEG tree when present, otherwise random
uint8 images of the same shape through ``InMemoryDataModule`` (the speed does not depend on the
pixels; the output says which).

    python -m benchmarks.gpu_epoch --methods simclr byol mocov2 --batch-size 512 --epochs 2
    python -m benchmarks.gpu_epoch --smoke      # tiny CPU run: checks that everything runs
"""

from __future__ import annotations

import argparse
import copy
import time

import pytorch_lightning as pl
import torch

from benchmarks.common import CIFAR_ROOT, IMAGE_METHODS, add_common_args, header, print_table, write_json
from lightning_ssl import REGISTRY
from lightning_ssl.datamodules import CIFAR10DataModule, InMemoryDataModule
from lightning_ssl.datamodules.augmentations import CIFAR10_MEAN, CIFAR10_STD

# Dense bf16 tensor-core peaks (NVIDIA data sheets), FLOP/s.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak(name: str) -> float | None:
    for key, peak in PEAK_BF16.items():  # most specific names first
        if key in name:
            return peak
    return None


def flops_per_image(model, dm) -> float:
    """Model FLOPs (forward + backward of every network) of one training step, per source image."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model)
    probe.log = lambda *a, **k: None  # outside a Trainer
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v.to(model.device) for k, v in batch.items()} if isinstance(batch, dict) else batch
    views, labels = dm.on_after_batch_transfer(batch, 0)
    with FlopCounterMode(display=False) as counter:
        out = probe.training_step((views, labels), 0)
        (out["loss"] if isinstance(out, dict) else out).backward()
    return counter.get_total_flops() / views[0].shape[0]


class EpochTimer(pl.Callback):
    """Wall time of every training epoch (bracketed by device synchronizations)."""

    def __init__(self, device: str):
        self.device, self.epochs, self.start = device, [], 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self._sync()
        self.epochs.append(time.perf_counter() - self.start)


def datamodule(args, images: torch.Tensor | None, labels: torch.Tensor | None) -> pl.LightningDataModule:
    common = dict(
        batch_size=args.batch_size,
        gpu_augment=True,
        num_workers=0,
        resident_device=args.device if args.device == "cuda" else None,
        strength=0.5,
        small_image=True,
    )
    if images is None:
        return CIFAR10DataModule(root=str(CIFAR_ROOT), in_memory=True, train_per_class=args.per_class, **common)
    return InMemoryDataModule(images, labels, mean=CIFAR10_MEAN, std=CIFAR10_STD, **common)


def run(name: str, args, dm) -> dict:
    torch.manual_seed(0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    extra = {"queue_size": args.queue_size} if "queue_size" in REGISTRY[name].small else {}
    model = REGISTRY[name].build(
        size="small" if args.smoke else "cifar",
        backbone=args.backbone,
        small_image=True,
        channels_last=args.channels_last,
        compile_backbone=args.compile,
        fused_optimizer=args.fused,
        warmup_epochs=0,
        **extra,
    )
    flops = flops_per_image(model.to(args.device), dm)
    timer = EpochTimer(args.device)
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=dm)
    epoch_s = timer.epochs[-1]
    images_per_s = trainer.num_training_batches * args.batch_size / epoch_s
    name_gpu = torch.cuda.get_device_name() if args.device == "cuda" else ""
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak(name_gpu)
    return dict(
        method=name,
        images_per_s=images_per_s,
        epoch_s=epoch_s,
        epochs_200_min=200 * epoch_s / 60,
        first_epoch_s=timer.epochs[0],
        gflops_per_image=flops / 1e9,
        mfu=flops * images_per_s / peak if peak else None,
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["simclr", "byol", "mocov2"], choices=IMAGE_METHODS)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2, help="the last one is timed (the first includes warm-up)")
    p.add_argument("--queue-size", type=int, default=65536, help="MoCo v2 (paper default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--per-class", type=int, help="use only the first N training images of each class")
    p.add_argument(
        "--data",
        choices=["auto", "real", "random"],
        default="auto",
        help="auto: the CIFAR-10 JPEG tree when present, else random uint8 images",
    )
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU when the name is not recognized")
    p.add_argument(
        "--smoke", action="store_true", help="tiny CPU settings: 64 random images, batch 32, 1 epoch, small heads"
    )
    args = add_common_args(p).parse_args(argv)
    if args.smoke:
        args.device, args.per_class, args.batch_size, args.epochs, args.queue_size = "cpu", 6, 32, 1, 64
        args.data = "random"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device visible; use --smoke (or --device cpu) to check that the script runs")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    real = args.data == "real" or (args.data == "auto" and (CIFAR_ROOT / "train").is_dir())
    start = time.perf_counter()
    images = labels = None
    if not real:
        n = (args.per_class or 5000) * 10
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 10, (n,), generator=gen)
    dm = datamodule(args, images, labels)
    dm.setup("fit")
    opts = [o for o in ("channels_last", "fused", "compile") if getattr(args, o)]
    print(
        header(
            f"{'CIFAR-10' if real else 'random uint8 32x32'} images in memory (loaded in "
            f"{time.perf_counter() - start:.0f} s), views on {args.device}; {args.backbone} CIFAR stem, batch "
            f"{args.batch_size}, {args.precision}, {', '.join(opts) or 'no options'}; timed epoch {args.epochs} "
            f"of {args.epochs}"
        ),
        flush=True,
    )
    rows = [run(name, args, dm) for name in args.methods]
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("images_per_s", "img/s", ".0f"),
            ("epoch_s", "epoch s", ".2f"),
            ("epochs_200_min", "200 ep min", ".1f"),
            ("gflops_per_image", "GFLOP/img", ".2f"),
            ("mfu", "MFU", ".1%"),
            ("first_epoch_s", "1st epoch s", ".1f"),
        ],
    )
    write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
