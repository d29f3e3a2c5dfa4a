"""Each of our methods that lightly also has, against lightly's, side by side on the same work.

Methods: SimCLR, MoCo v2, BYOL, Barlow Twins, VICReg, SimSiam, NNCLR, SwAV and DINO. For each, two
processes run at the same time (one torch thread each, so they share the machine alike): ours
(``lightning_ssl``) and lightly's (its losses, heads, memory banks, EMA helpers and augmentation, trained
in a LightningModule as lightly's examples do). Both use the same CIFAR-10 images (the first
``--per-class`` training JPEGs of each class), the same backbone (torchvision's ResNet-18, classifier
removed), the same two views (SimCLR's CIFAR-10 recipe: crop scale 0.08-1, flip, color jitter (0.4,
0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, no blur; each library's own implementation), the same
optimizer (SGD, momentum 0.9, ``--lr``: 0.06, VICReg 0.02, weight decay 5e-4, cosine decay per step,
no warmup), batch size, epochs and data loading (in the main process), and the same method settings:

- SimCLR: head 512-512-128, T 0.5. MoCo v2: head 512-2048-128, T 0.2, queue 4,096, momentum 0.99.
- BYOL: 512-4096-256 heads, EMA 0.99 -> 1 cosine.
- Barlow Twins: projector 512-2048-2048-2048, lambda 5e-3. VICReg: expander 512-2048-2048-2048, 25/25/1.
- SimSiam: projector 512-2048-2048-2048, predictor 2048-512-2048.
- NNCLR: projector 512-2048-2048-256, predictor 256-4096-256, support set 4,096, T 0.1.
- SwAV: projector 512-2048-128, 3,000 prototypes frozen in the first epoch, T 0.1, Sinkhorn epsilon
  0.05 with 3 iterations, no queue, no local crops.
- DINO: head 512-2048-2048-256 -> 4,096 (weight-normalized, last layer frozen in the first epoch),
  EMA 0.996 -> 1 cosine, teacher temperature 0.04 -> 0.07 over 30 epochs, student 0.1, center
  momentum 0.9, no gradient clipping, constant weight decay, two global views and no local crops; the
  teacher's backbone is scored on both sides.

Differences left as each library does them: our SimCLR, BYOL, Barlow Twins, VICReg, SimSiam, NNCLR,
SwAV and DINO skip weight decay on biases and norm parameters (our MoCo v2 decays every parameter, as
lightly's plain SGD does); our MoCo v2 shuffles keys across a split batch norm that simulates 8
devices (``split_bn_groups=8``, its one-process default), lightly's uses plain batch norm; our SimSiam
keeps the predictor's lr fixed (the paper's default), lightly's decays it. The backbone is passed in
on both sides, so neither starts its residual blocks' last BN at zero.

Prints, per method and library: training wall time, two-view images/s, kNN top-1 (k = 200, T = 0.1)
of the backbone on ``--test-per-class`` test images against the training images (the same scorer
for both), and the ratios. Needs the optional extra: ``pip install -e ".[peer]"`` (lightly).

    python -m benchmarks.peer_benchmark --per-class 1000 --test-per-class 200 --epochs 5
    python -m benchmarks.peer_benchmark --methods barlowtwins --ours-set bias_lr_scale=0.024  # an ablation
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
from lightning_ssl import BYOL, DINO, NNCLR, BarlowTwins, MoCoV2, SimCLR, SimSiam, SwAV, VICReg
from lightning_ssl.datamodules import CIFAR10DataModule
from lightning_ssl.datamodules.augmentations import CIFAR10_MEAN, CIFAR10_STD
from lightning_ssl.datamodules.in_memory import balanced_subset
from lightning_ssl.evaluation import extract_features, knn_accuracy

METHODS = ("simclr", "mocov2", "byol", "barlowtwins", "vicreg", "simsiam", "nnclr", "swav", "dino")
QUEUE, MOCO_TAU, BYOL_TAU = 4096, 0.99, 0.99
WIDE = 2048  # Barlow Twins' and VICReg's projector widths, SimSiam's and SwAV's hidden layers (CIFAR-size)
PROTOTYPES, DINO_OUT, DINO_TAU = 3000, 4096, 0.996
DEFAULT_LR = 0.06
# VICReg under plain SGD without warmup diverges at lr 0.06 on both sides (loss inf, then NaN, within
# 8-12 steps: its paper trains it with LARS and 10 warmup epochs); at 0.02 both sides train.
METHOD_LR = {"vicreg": 0.02}


def method_lr(args, method: str) -> float:
    """``--lr`` where given, else the method's entry of METHOD_LR, else DEFAULT_LR (the same on both sides)."""
    return args.lr if args.lr is not None else METHOD_LR.get(method, DEFAULT_LR)


def resnet18() -> nn.Module:
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    return model


# ------------------------------------------------------------------------------ ours
def ours(method: str, args) -> tuple[pl.LightningModule, DataLoader, nn.Module]:
    common = dict(
        backbone=resnet18(),
        optimizer="sgd",
        lr=method_lr(args, method),
        weight_decay=5e-4,
        warmup_epochs=0,
        schedule="cosine",
    )
    common.update(args.ours_set)  # ablations: our method's other keyword arguments
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
    elif method == "byol":
        model = BYOL(projection_hidden_dim=4096, projection_dim=256, ema_tau=BYOL_TAU, ema_tau_final=1.0, **common)
    elif method == "barlowtwins":
        model = BarlowTwins(projection_hidden_dim=WIDE, projection_dim=WIDE, lambd=5e-3, **common)
    elif method == "vicreg":
        model = VICReg(expander_hidden_dim=WIDE, expander_dim=WIDE, **common)
    elif method == "simsiam":
        model = SimSiam(projection_dim=WIDE, projection_hidden_dim=WIDE, prediction_hidden_dim=512, **common)
    elif method == "nnclr":
        model = NNCLR(
            projection_hidden_dim=WIDE, projection_dim=256, prediction_hidden_dim=4096, queue_size=QUEUE, **common
        )
    elif method == "swav":
        model = SwAV(projection_hidden_dim=WIDE, projection_dim=128, num_prototypes=PROTOTYPES, **common)
    else:
        dino = dict(head_hidden_dim=WIDE, head_bottleneck_dim=256, out_dim=DINO_OUT, ema_tau=DINO_TAU, clip_grad=0.0)
        model = DINO(**dino, weight_decay_final=common["weight_decay"], **common)
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
    return model, dm.train_dataloader(), model.backbone_ema if method == "dino" else model.backbone


# ------------------------------------------------------------------------------ lightly
def lightly_side(method: str, args) -> tuple[pl.LightningModule, DataLoader, nn.Module]:
    """The method as lightly's examples write it (its heads, losses, memory banks, EMA helpers and
    augmentation), with the benchmark's shared widths, optimizer and schedule."""
    from lightly import loss as losses
    from lightly.models import modules as heads
    from lightly.models.modules.heads import VICRegProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import SimCLRTransform
    from lightly.utils.scheduler import cosine_schedule

    lr, steps_per_epoch = method_lr(args, method), 10 * args.per_class // args.batch_size
    total = args.epochs * steps_per_epoch
    momentum = {"mocov2": None, "byol": BYOL_TAU, "dino": DINO_TAU}  # None: constant MOCO_TAU

    class LightlyMethod(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = resnet18()
            self.predictor = None
            if method == "simclr":
                self.head, self.criterion = heads.SimCLRProjectionHead(512, 512, 128), losses.NTXentLoss(0.5)
            elif method == "mocov2":
                self.head = heads.MoCoProjectionHead(512, 2048, 128)
                self.criterion = losses.NTXentLoss(temperature=0.2, memory_bank_size=(QUEUE, 128))
            elif method == "byol":
                self.head = heads.BYOLProjectionHead(512, 4096, 256)
                self.predictor = heads.BYOLPredictionHead(256, 4096, 256)
                self.criterion = losses.NegativeCosineSimilarity()
            elif method == "barlowtwins":
                self.head = heads.BarlowTwinsProjectionHead(512, WIDE, WIDE)
                self.criterion = losses.BarlowTwinsLoss(lambda_param=5e-3)
            elif method == "vicreg":
                self.head, self.criterion = VICRegProjectionHead(512, WIDE, WIDE, num_layers=3), losses.VICRegLoss()
            elif method == "simsiam":
                self.head = heads.SimSiamProjectionHead(512, WIDE, WIDE)
                self.predictor = heads.SimSiamPredictionHead(WIDE, 512, WIDE)
                self.criterion = losses.NegativeCosineSimilarity()
            elif method == "nnclr":
                self.head = heads.NNCLRProjectionHead(512, WIDE, 256)
                self.predictor = heads.NNCLRPredictionHead(256, 4096, 256)
                self.memory_bank = heads.NNMemoryBankModule(size=(QUEUE, 256))
                self.criterion = losses.NTXentLoss(temperature=0.1)
            elif method == "swav":
                self.head = heads.SwaVProjectionHead(512, WIDE, 128)
                self.prototypes = heads.SwaVPrototypes(128, PROTOTYPES, n_steps_frozen_prototypes=steps_per_epoch)
                self.criterion = losses.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
            else:
                self.head = heads.DINOProjectionHead(512, WIDE, 256, DINO_OUT, freeze_last_layer=1)
                self.criterion = losses.DINOLoss(
                    output_dim=DINO_OUT, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30
                )
            if method in momentum:
                self.backbone_momentum = copy.deepcopy(self.backbone)
                if method == "dino":  # a weight-normalized layer cannot be deep-copied: build and load it
                    self.head_momentum = heads.DINOProjectionHead(512, WIDE, 256, DINO_OUT)
                    self.head_momentum.load_state_dict(self.head.state_dict())
                else:
                    self.head_momentum = copy.deepcopy(self.head)
                deactivate_requires_grad(self.backbone_momentum)
                deactivate_requires_grad(self.head_momentum)

        def embed(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            x0, x1 = batch[0]
            if method in momentum:
                tau = momentum[method]
                tau = MOCO_TAU if tau is None else cosine_schedule(self.global_step, total, tau, 1.0)
                update_momentum(self.backbone, self.backbone_momentum, m=tau)
                update_momentum(self.head, self.head_momentum, m=tau)
            if method in ("simclr", "barlowtwins", "vicreg"):
                return self.criterion(self.embed(x0), self.embed(x1))
            if method == "mocov2":
                key = self.head_momentum(self.backbone_momentum(x1)).detach()
                return self.criterion(self.embed(x0), key)
            if method == "byol":
                p0, p1 = self.predictor(self.embed(x0)), self.predictor(self.embed(x1))
                z0 = self.head_momentum(self.backbone_momentum(x0)).detach()
                z1 = self.head_momentum(self.backbone_momentum(x1)).detach()
                return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
            if method == "simsiam":
                z0, z1 = self.embed(x0), self.embed(x1)
                p0, p1 = self.predictor(z0), self.predictor(z1)
                return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
            if method == "nnclr":
                z0, z1 = self.embed(x0), self.embed(x1)
                p0, p1 = self.predictor(z0), self.predictor(z1)
                nn0 = self.memory_bank(z0.detach(), update=False)
                nn1 = self.memory_bank(z1.detach(), update=True)
                return 0.5 * (self.criterion(nn0, p1) + self.criterion(nn1, p0))
            if method == "swav":
                self.prototypes.normalize()
                scores = [
                    self.prototypes(nn.functional.normalize(self.embed(x), dim=1), step=self.global_step)
                    for x in (x0, x1)
                ]
                return self.criterion(scores, [])
            teacher = [self.head_momentum(self.backbone_momentum(x)) for x in (x0, x1)]
            return self.criterion(teacher, [self.embed(x0), self.embed(x1)], epoch=self.current_epoch)

        def on_after_backward(self):
            if method == "dino":
                self.head.cancel_last_layer_gradients(current_epoch=self.current_epoch)

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
    return model, loader, model.backbone_momentum if method == "dino" else model.backbone


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
            str(method_lr(args, method)),
            "--seed",
            str(args.seed),
            "--threads",
            "1",
        ]
        cmd += [f"--ours-set={key}={json.dumps(value)}" for key, value in args.ours_set.items()]
        procs[side] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    row = {"method": method, "lr": method_lr(args, method)}
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


def _keyword(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--root", type=Path, default=CIFAR_ROOT, help="the CIFAR-10 JPEG tree (train/, test/)")
    p.add_argument("--per-class", type=int, default=500, help="training images of each class")
    p.add_argument("--test-per-class", type=int, default=200, help="test images of each class for kNN")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"SGD lr of both sides (default {DEFAULT_LR}; VICReg {METHOD_LR['vicreg']})",
    )
    p.add_argument("--curve-every", type=int, default=0, help="kNN every N epochs too (0: only at the end)")
    p.add_argument(
        "--ours-set",
        type=_keyword,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ablation: pass KEY=VALUE (a JSON value) to our method's constructor, e.g. bias_lr_scale=0.024",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes: 4 images per class, 1 epoch, batch 16")
    p.add_argument("--worker", choices=["ours", "lightly"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = add_common_args(p).parse_args(argv)
    args.ours_set = dict(args.ours_set)
    if args.smoke:
        # batch 16: MoCo v2 simulates 8 devices (split_bn_groups=8), and batch norm needs 2 images per group
        args.per_class, args.test_per_class, args.epochs, args.batch_size = 4, 2, 1, 16
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        import lightly  # noqa: F401
    except ImportError:
        raise SystemExit('the peer benchmark needs lightly: pip install -e ".[peer]"') from None
    lr_text = ", ".join(f"{method_lr(args, method)} ({method})" for method in args.methods)
    print(
        header(
            f"ours vs lightly {lightly.__version__}; ResNet-18 (ImageNet stem), CIFAR-10 {args.per_class * 10} "
            f"training images, {args.epochs} epochs, batch {args.batch_size}, SGD lr "
            f"{lr_text}; the two "
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
