"""Our SimCLR, MoCo v2 and BYOL against lightly's, side by side on the same work.

For each method, two processes run at the same time (one torch thread each, so they share the
machine alike): ours (``lightning_ssl``) and lightly's (its loss, heads, EMA helpers and augmentation,
trained in a LightningModule as lightly's examples do). Both use the same CIFAR-10 images (the first
``--per-class`` training JPEGs of each class), the same backbone (torchvision's ResNet-18, classifier
removed), the same augmentation parameters (SimCLR's CIFAR-10 recipe: crop scale 0.08-1, flip, color
jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, no blur; each library's own
implementation), the same optimizer (SGD, momentum 0.9, ``--lr``, weight decay 5e-4, cosine decay
per step, no warmup), the same method settings (SimCLR: head 512-512-128, T 0.5; MoCo v2: head
512-2048-128, T 0.2, queue 4,096, momentum 0.99; BYOL: 512-4096-256 heads, EMA 0.99 -> 1 cosine),
batch size, epochs and data loading (in the main process). Differences left as each library does
them: our SimCLR and BYOL skip weight decay on biases and norm parameters (our MoCo v2 decays every
parameter, as lightly's plain SGD does); our MoCo v2 shuffles keys across a split batch norm that
simulates 8 devices (``split_bn_groups=8``, its one-process default), lightly's uses plain batch norm.

Prints, per method and library: training wall time, two-view images/s, kNN top-1 (k = 200, T = 0.1)
of the backbone on ``--test-per-class`` test images against the training images (the same scorer
for both), and the ratios. Needs the optional extra: ``pip install -e ".[peer]"`` (lightly).

    python -m benchmarks.peer_benchmark --methods simclr mocov2 byol --per-class 500 --epochs 5
    python -m benchmarks.peer_benchmark --smoke      # tiny sizes: checks that both sides run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks.common import CIFAR_ROOT, add_common_args, header, print_table, quiet_trainer, write_json
from lightning_ssl import BYOL, MoCoV2, SimCLR
from lightning_ssl.datamodules import CIFAR10DataModule
from lightning_ssl.datamodules.augmentations import CIFAR10_MEAN, CIFAR10_STD
from lightning_ssl.datamodules.in_memory import balanced_subset
from lightning_ssl.evaluation import extract_features, knn_accuracy

METHODS = ("simclr", "mocov2", "byol")
QUEUE, MOCO_TAU, BYOL_TAU = 4096, 0.99, 0.99


def resnet18() -> nn.Module:
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    return model


# ------------------------------------------------------------------------------ ours
def ours(method: str, args) -> tuple[pl.LightningModule, DataLoader, nn.Module]:
    common = dict(
        backbone=resnet18(), optimizer="sgd", lr=args.lr, weight_decay=5e-4, warmup_epochs=0, schedule="cosine"
    )
    if method == "simclr":
        model = SimCLR(projection_hidden_dim=512, projection_dim=128, temperature=0.5, **common)
    elif method == "mocov2":
        model = MoCoV2(
            projection_hidden_dim=2048,
            projection_dim=128,
            temperature=0.2,
            queue_size=QUEUE,
            ema_tau=MOCO_TAU,
            **common,
        )
    else:
        model = BYOL(projection_hidden_dim=4096, projection_dim=256, ema_tau=BYOL_TAU, ema_tau_final=1.0, **common)
    dm = CIFAR10DataModule(
        root=str(args.root),
        train_per_class=args.per_class,
        batch_size=args.batch_size,
        num_workers=0,
        augmentation="simclr",
        strength=0.5,
        small_image=True,
    )
    dm.setup()
    return model, dm.train_dataloader(), model.backbone


# ------------------------------------------------------------------------------ lightly
def lightly_side(method: str, args) -> tuple[pl.LightningModule, DataLoader, nn.Module]:
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, MoCoProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import SimCLRTransform
    from lightly.utils.scheduler import cosine_schedule

    lr, total = args.lr, args.epochs * (10 * args.per_class // args.batch_size)

    class LightlyMethod(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = resnet18()
            if method == "simclr":
                self.head, self.criterion = SimCLRProjectionHead(512, 512, 128), NTXentLoss(temperature=0.5)
            elif method == "mocov2":
                self.head = MoCoProjectionHead(512, 2048, 128)
                self.criterion = NTXentLoss(temperature=0.2, memory_bank_size=(QUEUE, 128))
            else:
                self.head, self.predictor = BYOLProjectionHead(512, 4096, 256), BYOLPredictionHead(256, 4096, 256)
                self.criterion = NegativeCosineSimilarity()
            if method != "simclr":
                self.backbone_momentum, self.head_momentum = copy.deepcopy(self.backbone), copy.deepcopy(self.head)
                deactivate_requires_grad(self.backbone_momentum)
                deactivate_requires_grad(self.head_momentum)

        def training_step(self, batch, batch_idx):
            x0, x1 = batch[0]
            if method == "simclr":
                return self.criterion(self.head(self.backbone(x0)), self.head(self.backbone(x1)))
            tau = MOCO_TAU if method == "mocov2" else cosine_schedule(self.global_step, total, BYOL_TAU, 1.0)
            update_momentum(self.backbone, self.backbone_momentum, m=tau)
            update_momentum(self.head, self.head_momentum, m=tau)
            if method == "mocov2":
                query = self.head(self.backbone(x0))
                key = self.head_momentum(self.backbone_momentum(x1)).detach()
                return self.criterion(query, key)
            p0, p1 = self.predictor(self.head(self.backbone(x0))), self.predictor(self.head(self.backbone(x1)))
            z0 = self.head_momentum(self.backbone_momentum(x0)).detach()
            z1 = self.head_momentum(self.backbone_momentum(x1)).detach()
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    normalize = {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0, normalize=normalize)
    folder = torchvision.datasets.ImageFolder(str(args.root / "train"), transform=transform)
    dataset = Subset(folder, balanced_subset(folder.targets, args.per_class))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0)
    model = LightlyMethod()
    return model, loader, model.backbone


# ------------------------------------------------------------------------------ one side, in its process
class KNNCurve(pl.Callback):
    """kNN top-1 of the backbone at the end of every epoch (the same scorer for both libraries); the time
    it takes is left out of the training time."""

    def __init__(self, backbone: nn.Module, evaluation: CIFAR10DataModule, every: int):
        self.backbone, self.evaluation, self.every = backbone, evaluation, every
        self.curve: list[tuple[int, float]] = []
        self.seconds = 0.0

    def score(self) -> float:
        was = self.backbone.training
        self.backbone.eval()
        bank = extract_features(self.backbone, self.evaluation.labeled_dataloader("train"))
        queries = extract_features(self.backbone, self.evaluation.labeled_dataloader("val"))
        self.backbone.train(was)
        return knn_accuracy(*bank, *queries)["all"]

    def on_train_epoch_end(self, trainer, pl_module):
        if self.every and (trainer.current_epoch + 1) % self.every == 0:
            start = time.perf_counter()
            self.curve.append((trainer.current_epoch + 1, self.score()))
            self.seconds += time.perf_counter() - start


def worker(args) -> None:
    torch.set_num_threads(args.threads or 1)
    pl.seed_everything(args.seed, verbose=False)
    build = ours if args.worker == "ours" else lightly_side
    model, loader, backbone = build(args.method, args)
    evaluation = CIFAR10DataModule(
        root=str(args.root), train_per_class=args.per_class, val_per_class=args.test_per_class, num_workers=0
    )
    evaluation.setup()
    curve = KNNCurve(backbone, evaluation, args.curve_every)
    trainer = quiet_trainer(max_epochs=args.epochs, log_every_n_steps=50, callbacks=[curve])
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    train_s = time.perf_counter() - start - curve.seconds
    result = {
        "train_s": train_s,
        "steps": trainer.global_step,
        "images_per_s": trainer.global_step * args.batch_size / train_s,
        "knn": curve.score(),
        "curve": curve.curve,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_pair(args, method: str) -> dict:
    """Ours and lightly's at the same time, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for side in ("ours", "lightly"):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.peer_benchmark",
            "--worker",
            side,
            "--method",
            method,
            "--root",
            str(args.root),
            "--per-class",
            str(args.per_class),
            "--test-per-class",
            str(args.test_per_class),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            "--threads",
            "1",
        ]
        procs[side] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    row = {"method": method}
    for side, proc in procs.items():
        out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{method}/{side} failed (exit {proc.returncode}):\n{err[-3000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        row.update({f"{side}_{k}": v for k, v in result.items()})
    row["time_ratio"] = row["ours_train_s"] / row["lightly_train_s"]
    row["knn_diff"] = row["ours_knn"] - row["lightly_knn"]
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--root", type=Path, default=CIFAR_ROOT, help="the CIFAR-10 JPEG tree (train/, test/)")
    p.add_argument("--per-class", type=int, default=500, help="training images of each class")
    p.add_argument("--test-per-class", type=int, default=200, help="test images of each class for kNN")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--curve-every", type=int, default=0, help="kNN every N epochs too (0: only at the end)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: 4 images per class, 1 epoch, batch 8")
    p.add_argument("--worker", choices=["ours", "lightly"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = add_common_args(p).parse_args(argv)
    if args.smoke:
        args.per_class, args.test_per_class, args.epochs, args.batch_size = 4, 2, 1, 8
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        import lightly  # noqa: F401
    except ImportError:
        raise SystemExit('the peer benchmark needs lightly: pip install -e ".[peer]"') from None
    print(
        header(
            f"ours vs lightly {lightly.__version__}; ResNet-18 (ImageNet stem), CIFAR-10 {args.per_class * 10} "
            f"training images, {args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr}; the two "
            "processes run at the same time with one thread each"
        ),
        flush=True,
    )
    rows = [run_pair(args, method) for method in args.methods]
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("ours_train_s", "ours s", ".0f"),
            ("lightly_train_s", "lightly s", ".0f"),
            ("time_ratio", "time ours/lightly", ".3f"),
            ("ours_images_per_s", "ours img/s", ".1f"),
            ("lightly_images_per_s", "lightly img/s", ".1f"),
            ("ours_knn", "ours kNN", ".4f"),
            ("lightly_knn", "lightly kNN", ".4f"),
        ],
    )
    write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
