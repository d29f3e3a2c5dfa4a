"""Epoch time of each method with the whole fast path: CIFAR-10 held on the device as uint8, views
made on the device, bf16 mixed precision, channels_last, fused optimizer steps (and optionally a
compiled backbone), trained by our ``Trainer`` run.

Prints, per method: two-view images per second over the last (timed) epoch, the epoch time, the
estimated time of 200 epochs, the model FLOPs per image (forward and backward of every network,
counted with ``torch.utils.flop_counter``) and the model FLOP utilisation (MFU = achieved FLOP/s
over the device's dense bf16 peak). Uses the CIFAR-10 JPEG tree when present, otherwise random
uint8 images of the same shape (the speed does not depend on the pixels; the output says which).

    python benchmarks/gpu_epoch.py --methods simclr byol mocov2 --batch-size 512 --epochs 2
    python benchmarks/gpu_epoch.py --smoke      # tiny CPU run: checks that everything runs
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.cifar_data import CIFAR_ROOT, TensorTwoViewLoader, load_cifar10, random_cifar10  # noqa: E402
from lightning_ssl import BYOL, MoCoV2, SimCLR  # noqa: E402

METHODS = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "byol": BYOL,
    # CPC, once merged: "cpc": CPC,
}

# Dense bf16 tensor-core peaks (NVIDIA data sheets), FLOP/s.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak(name: str) -> float | None:
    for key, peak in PEAK_BF16.items():  # most specific names first
        if key in name:
            return peak
    return None


def flops_per_image(model, loader) -> float:
    """Model FLOPs (forward + backward of every network) of one training step, per source image."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model)
    probe.log = lambda *a, **k: None  # outside a Trainer
    views, labels = next(iter(loader))
    with FlopCounterMode(display=False) as counter:
        out = probe.training_step((views, labels), 0)
        (out["loss"] if isinstance(out, dict) else out).backward()
    return counter.get_total_flops() / views[0].shape[0]


class EpochTimer:
    def __init__(self, device: str):
        import pytorch_lightning as pl

        timer = self
        self.epochs: list[float] = []

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        class Callback(pl.Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                sync()
                timer.start = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module):
                sync()
                timer.epochs.append(time.perf_counter() - timer.start)

        self.callback = Callback()


def run(name: str, args, images, labels) -> dict:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    torch.manual_seed(0)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = METHODS[name](backbone=args.backbone, small_image=True, channels_last=args.channels_last,
                          compile_backbone=args.compile, fused_optimizer=args.fused, warmup_epochs=0,
                          **({"queue_size": args.queue_size} if name == "mocov2" else {}))
    loader = TensorTwoViewLoader(images, labels, args.batch_size, channels_last=args.channels_last)
    flops = flops_per_image(model.to(args.device), loader)
    timer = EpochTimer(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator=args.device, devices=1, precision=args.precision, max_epochs=args.epochs,
                             logger=CSVLogger(tmp), enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=False, callbacks=[timer.callback], default_root_dir=tmp)
        trainer.fit(model, train_dataloaders=loader)
    epoch_s = timer.epochs[-1]
    images_per_s = len(loader) * args.batch_size / epoch_s
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (device_peak(torch.cuda.get_device_name()) if args.device == "cuda" else None)
    return dict(method=name, images_per_s=images_per_s, epoch_s=epoch_s, epochs_200_min=200 * epoch_s / 60,
                first_epoch_s=timer.epochs[0], gflops_per_image=flops / 1e9,
                mfu=flops * images_per_s / peak if peak else None,
                peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["simclr", "byol", "mocov2"], choices=sorted(METHODS))
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2, help="the last one is timed (the first includes warm-up)")
    p.add_argument("--queue-size", type=int, default=65536, help="MoCo v2 (paper default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--limit", type=int, help="use only this many training images")
    p.add_argument("--data", choices=["auto", "real", "random"], default="auto",
                   help="auto: the CIFAR-10 JPEG tree when present, else random uint8 images")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU when the name is not recognised")
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings: 64 random images, batch 32, 1 epoch")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.limit, args.batch_size, args.epochs, args.queue_size = "cpu", 64, 32, 1, 64
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
    images, labels = load_cifar10("train", args.limit) if real else random_cifar10(args.limit or 50_000)
    images, labels = images.to(args.device), labels.to(args.device)  # uint8 on the device: 150 MB for CIFAR-10
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    opts = [o for o in ("channels_last", "fused", "compile") if getattr(args, o)]
    print(f"# {device_name}; torch {torch.__version__}; {'CIFAR-10' if real else 'random uint8'} "
          f"{tuple(images.shape)} on {args.device} (loaded in {time.perf_counter() - start:.0f} s); "
          f"{args.backbone} CIFAR stem, batch {args.batch_size}, {args.precision}, {', '.join(opts) or 'no options'}; "
          f"timed epoch {args.epochs} of {args.epochs}", flush=True)
    print(f"{'method':<8} {'img/s':>9} {'epoch s':>8} {'200 ep min':>11} {'GFLOP/img':>10} {'MFU':>6} {'1st epoch s':>12}", flush=True)
    rows = []
    for name in args.methods:
        r = run(name, args, images, labels)
        rows.append(r)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{name:<8} {r['images_per_s']:>9.0f} {r['epoch_s']:>8.2f} {r['epochs_200_min']:>11.1f} "
              f"{r['gflops_per_image']:>10.2f} {mfu:>6} {r['first_epoch_s']:>12.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
