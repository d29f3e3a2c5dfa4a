"""The seed's label-efficiency experiment: FCN-8s on Cityscapes from three starts (random weights, a
supervised checkpoint, an SSL checkpoint), fine-tuned on growing labeled subsets; writes a CSV
and a PNG of mIoU (19 classes) against the number of labeled images, one line per start.

Every run trains for the same number of optimizer steps (``--steps``), whatever the subset size,
then reports mIoU on the validation split.

Real Cityscapes (local copy in the official layout; weights are local files, nothing downloads):

    python -m benchmarks.label_efficiency --root /data/cityscapes --arch resnet50 \\
        --sizes 100 372 744 2975 --supervised-weights resnet50_imagenet.pt \\
        --ssl-checkpoint outputs/simclr_cityscapes/last.ckpt --steps 20000 --batch-size 8 \\
        --crop-size 768 --base-size 1024 --val-size 1024 --out benchmarks/results/label_efficiency_cityscapes

Synthetic demonstration (CPU, minutes): ``--synthetic-demo DIR`` generates a Cityscapes-layout
tree (``make_synthetic_cityscapes``), makes the "supervised" start by briefly training a ResNet
classifier on the synthetic images' pixel classes (patch classification; a stand-in for supervised
ImageNet weights), and the SSL start by briefly pretraining SimCLR on the tree's unlabeled
train + train_extra images, then runs the experiment.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision

from benchmarks.common import quiet_trainer
from lightning_ssl import SimCLR
from lightning_ssl.datamodules.cityscapes import (
    CityscapesDataModule,
    CityscapesSegmentation,
    segmentation_eval_transform,
)
from lightning_ssl.datamodules.synthetic_cityscapes import make_synthetic_cityscapes
from lightning_ssl.evaluation import SegmentationModule


def run_one(args, init: str | None, size: int) -> float:
    """Fine-tune FCN-8s from ``init`` on ``size`` labeled images; return validation mIoU."""
    pl.seed_everything(args.seed, verbose=False)
    dm = CityscapesDataModule(
        str(args.root),
        mode="segmentation",
        batch_size=min(args.batch_size, size),
        num_workers=args.workers,
        crop_size=args.crop_size,
        base_size=args.base_size,
        val_size=args.val_size,
        num_labeled=size,
        subset_seed=args.seed,
    )
    model = SegmentationModule(args.arch, init=init, lr=args.lr)
    trainer = quiet_trainer(max_steps=args.steps, max_epochs=-1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    dm.setup("validate")
    result = quiet_trainer().validate(model, dataloaders=dm.val_dataloader(), verbose=False)[0]
    return float(result["val/miou"])


# ----------------------------------------------------------------------------- synthetic demo starts
def make_supervised_start(root: Path, arch: str, out: Path, steps: int, patch: int = 32, seed: int = 0) -> Path:
    """A "supervised" checkpoint for the synthetic demo: a torchvision ResNet trained to classify the
    class of the center pixel of random patches of the synthetic training images."""
    pl.seed_everything(seed, verbose=False)
    data = CityscapesSegmentation(root, "train", transform=segmentation_eval_transform(None))
    images = torch.stack([data[i][0] for i in range(len(data))])
    masks = torch.stack([data[i][1] for i in range(len(data))])
    model = torchvision.models.get_model(arch, weights=None, num_classes=19)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    h, w = images.shape[-2:]
    half = patch // 2
    padded = F.pad(images, (half, half, half, half))
    model.train()
    for step in range(steps):
        n = torch.randint(0, len(images), (64,), generator=gen)
        ys, xs = torch.randint(0, h, (64,), generator=gen), torch.randint(0, w, (64,), generator=gen)
        target = masks[n, ys, xs]
        keep = target != 255
        batch = torch.stack(
            [padded[i, :, y : y + patch, x : x + patch] for i, y, x in zip(n[keep], ys[keep], xs[keep])]
        )
        loss = F.cross_entropy(model(batch), target[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            acc = (model(batch).argmax(1) == target[keep]).float().mean().item()
            print(f"  supervised start: step {step} loss {loss.item():.3f} batch acc {acc:.2f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return out


def make_ssl_start(
    root: Path, arch: str, out: Path, epochs: int, image_size: int, batch_size: int, seed: int = 0
) -> Path:
    """An SSL checkpoint for the synthetic demo: SimCLR on the tree's unlabeled train + train_extra."""
    pl.seed_everything(seed, verbose=False)
    dm = CityscapesDataModule(
        str(root), mode="ssl", batch_size=batch_size, num_workers=0, image_size=image_size, use_train_extra=True
    )
    model = SimCLR(backbone=arch, temperature=0.2, base_lr=0.3, warmup_epochs=1, optimizer="lars")
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(out)
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for start in dict.fromkeys(r["start"] for r in rows):
        pts = sorted((r["num_labeled"], r["miou"]) for r in rows if r["start"] == start)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=start)
    ax.set_xscale("log")
    ax.minorticks_off()
    sizes = sorted({r["num_labeled"] for r in rows})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("labeled training images")
    ax.set_ylabel("mIoU (%), 19 classes")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="FCN-8s backbone start", fontsize=8, title_fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--arch", default="resnet50", help="torchvision ResNet")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 372, 744, 2975], help="labeled subset sizes")
    parser.add_argument("--supervised-weights", type=Path, help="torchvision state_dict file of a supervised model")
    parser.add_argument(
        "--ssl-checkpoint", type=Path, help="Lightning checkpoint of any SSL method (or an exported encoder)"
    )
    parser.add_argument("--no-random", action="store_true", help="skip the random-initialization start")
    parser.add_argument("--steps", type=int, default=20000, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--crop-size", type=int, default=768)
    parser.add_argument("--base-size", type=int, default=None, help="shorter side before the 0.5-2x random scale")
    parser.add_argument("--val-size", type=int, default=None, help="shorter side at validation (None: full resolution)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/label_efficiency"), help="output prefix (.csv, .png)"
    )
    demo = parser.add_argument_group("synthetic demonstration")
    demo.add_argument(
        "--synthetic-demo", type=Path, metavar="DIR", help="generate a tree and both starts in DIR, then run"
    )
    demo.add_argument("--demo-train", type=int, default=64)
    demo.add_argument("--demo-val", type=int, default=16)
    demo.add_argument("--demo-extra", type=int, default=128)
    demo.add_argument("--demo-width", type=int, default=128)
    demo.add_argument("--demo-height", type=int, default=64)
    demo.add_argument("--demo-supervised-steps", type=int, default=100)
    demo.add_argument("--demo-ssl-epochs", type=int, default=10)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start_time = time.time()
    title = "FCN-8s on Cityscapes"

    if args.synthetic_demo is not None:
        args.root = args.synthetic_demo / "cityscapes"
        if not (args.root / "leftImg8bit").is_dir():
            make_synthetic_cityscapes(
                args.root,
                args.demo_train,
                args.demo_val,
                args.demo_width,
                args.demo_height,
                num_extra=args.demo_extra,
                seed=args.seed,
            )
        print("making the 'supervised' start (patch classifier on the synthetic labels)", flush=True)
        args.supervised_weights = make_supervised_start(
            args.root, args.arch, args.synthetic_demo / "supervised.pt", args.demo_supervised_steps, seed=args.seed
        )
        print("making the SSL start (SimCLR on unlabeled train + train_extra)", flush=True)
        args.ssl_checkpoint = make_ssl_start(
            args.root,
            args.arch,
            args.synthetic_demo / "simclr.ckpt",
            args.demo_ssl_epochs,
            image_size=args.crop_size,
            batch_size=32,
            seed=args.seed,
        )
        title = (
            f"SYNTHETIC demo, not Cityscapes: generated {args.demo_width}x{args.demo_height} tree\n"
            f"{args.arch}, {args.steps} optimizer steps per run, CPU"
        )
    if args.root is None:
        parser.error("--root (a Cityscapes directory) or --synthetic-demo DIR is required")

    starts = [] if args.no_random else [("random init", None)]
    if args.supervised_weights is not None:
        starts.append(
            (
                "supervised" if args.synthetic_demo is None else "supervised (synthetic patch classifier)",
                str(args.supervised_weights),
            )
        )
    if args.ssl_checkpoint is not None:
        starts.append(("SSL (SimCLR)" if args.synthetic_demo is not None else "SSL", str(args.ssl_checkpoint)))

    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.out.with_suffix(".csv"), args.out.with_suffix(".png")
    for name, init in starts:
        for size in args.sizes:
            t0 = time.time()
            miou = run_one(args, init, size)
            rows.append(
                {
                    "start": name,
                    "init": Path(init).name if init else "random",
                    "num_labeled": size,
                    "miou": round(miou, 4),
                    "steps": args.steps,
                    "seconds": round(time.time() - t0, 1),
                }
            )
            print(f"{name:<42} {size:>6} labeled  mIoU {100 * miou:6.2f}  ({rows[-1]['seconds']} s)", flush=True)
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    plot(rows, png_path, title)
    print(f"wrote {csv_path} and {png_path} in {time.time() - start_time:.0f} s")


if __name__ == "__main__":
    main()
