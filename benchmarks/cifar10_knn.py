"""Pretrain registered methods on (a subset of) the CIFAR-10 JPEG copy, then report weighted kNN
top-1 on the test split (k = 200, T = 0.1; Wu et al. 2018) and, optionally, linear-evaluation
top-1 and (ViTs) end-to-end fine-tuning top-1 (``ViTFineTuning``, MAE's recipe), next to the same
backbone at random initialization (its batch-norm statistics recomputed on the training images, no
weight changed: the honest baseline), with wall times.

The data is ``CIFAR10DataModule(in_memory=True, gpu_augment=True)``: the JPEGs decoded once into a
uint8 tensor, views made per batch by the library's on-device augmentation (on the CPU here), from
the recipe ``--augmentation``. Fine-tuning starts from the method's checkpoint through
``ViTFineTuning(checkpoint)``, as a user would (so the evaluated encoder and its pooling are the
checkpoint's), and from the random-init ViT with the same pooling. kNN uses un-augmented training
images as the memory bank and test images as queries (``lightning_ssl.evaluation.knn``).

Settings are the methods' paper defaults (and ``REGISTRY[name].cifar`` on 32x32 images) except what
the budget changes: warmup (``--warmup-epochs``) and ``--method-args`` (default: MoCo's queue 4096
and key-encoder momentum 0.99 as in the MoCo CIFAR-10 demo; CPC's lr 1e-3; the later methods' heads
and optimizers from their CIFAR-10 configs). SwAV and DINO see the recipe's two views (no local crops).
Example::

    python -m benchmarks.cifar10_knn --methods simclr mocov2 byol --train-per-class 500 \\
        --test-per-class 200 --epochs 3 --batch-size 128
"""

from __future__ import annotations

import argparse
import ast
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    CIFAR_ROOT,
    IMAGE_METHODS,
    add_common_args,
    apply_threads,
    cifar10,
    header,
    print_table,
    quiet_trainer,
    write_json,
)
from lightning_ssl import REGISTRY
from lightning_ssl.evaluation import LinearEvaluation, ViTFineTuning, extract_features, knn_accuracy

DEFAULT_METHOD_ARGS = [
    "moco:queue_size=4096,ema_tau=0.99",
    "mocov2:queue_size=4096,ema_tau=0.99",
    "cpc:lr=1e-3",
    "cpcv2:lr=1e-3",
    # the later methods: heads and optimizer settings of their configs/<name>_cifar10.yaml; step counts
    # scaled to this budget (an epoch of 5,000 images at batch 128 is 39 steps), support set 4096
    "simsiam:projection_dim=2048,projection_hidden_dim=2048,projection_layers=2,base_lr=0.03,weight_decay=5e-4",
    "barlow_twins:projection_hidden_dim=2048,projection_dim=2048,lambd=0.0051,loss_scale=0.1,base_lr=0.3,"
    "weight_decay=1e-4",
    "vicreg:expander_hidden_dim=2048,expander_dim=2048,base_lr=0.3,weight_decay=1e-4",
    "nnclr:projection_hidden_dim=2048,projection_dim=256,prediction_hidden_dim=4096,queue_size=4096,"
    "temperature=0.2,base_lr=0.4,weight_decay=1e-5",
    "swav:projection_hidden_dim=2048,projection_dim=128,num_prototypes=3000,freeze_prototypes_steps=39,"
    "base_lr=0.6,weight_decay=1e-6",
    "dino:out_dim=4096,head_hidden_dim=2048,head_bottleneck_dim=256,optimizer='sgd',base_lr=0.03,"
    "weight_decay=1e-4,weight_decay_final=1e-4,warmup_teacher_temperature_epochs=3",
]


class Representation(nn.Module):
    """A method's evaluation features (``representation``) as an encoder module, for linear evaluation."""

    def __init__(self, method: nn.Module, backbone: nn.Module | None = None):
        super().__init__()
        self.method, self.backbone = method, backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.representation(images, backbone=self.backbone)


def parse_method_args(items: list[str]) -> dict[str, dict]:
    """``["mocov2:queue_size=4096,ema_tau=0.99", ...]`` -> ``{"mocov2": {"queue_size": 4096, ...}}``."""
    out: dict[str, dict] = {}
    for item in items:
        name, _, assignments = item.partition(":")
        for assignment in filter(None, assignments.split(",")):
            key, _, value = assignment.partition("=")
            out.setdefault(name, {})[key] = ast.literal_eval(value)
    return out


def knn(model, dm, backbone: nn.Module | None = None) -> float:
    model.eval()
    if backbone is not None:
        backbone.eval()
    encode = lambda x: model.representation(x, backbone=backbone)  # noqa: E731
    train = extract_features(encode, dm.labeled_dataloader("train"), model.device)
    test = extract_features(encode, dm.labeled_dataloader("val"), model.device)
    return knn_accuracy(*train, *test)["all"]


def linear(model, dm, backbone: nn.Module | None, epochs: int, lr: float) -> float:
    probe = LinearEvaluation(Representation(model, backbone).eval(), num_classes=10, lr=lr)
    trainer = quiet_trainer(max_epochs=epochs)
    trainer.fit(probe, dm.labeled_dataloader("train", augment=True))  # raises if the frozen encoder changed
    return trainer.validate(probe, dm.labeled_dataloader("val"), verbose=False)[0]["val/top1"]


def finetune(encoder, dm, args, pool: str | None = None) -> float:
    """Top-1 after ``ViTFineTuning`` of ``encoder`` (a checkpoint path or a module) for ``--finetune-epochs``."""
    model = ViTFineTuning(encoder, num_classes=10, pool=pool, warmup_epochs=args.finetune_warmup_epochs)
    trainer = quiet_trainer(max_epochs=args.finetune_epochs)
    trainer.fit(model, dm.labeled_dataloader("train", augment=True))
    return trainer.validate(model, dm.labeled_dataloader("val"), verbose=False)[0]["val/top1"]


def run_method(name: str, args, dm) -> dict:
    torch.manual_seed(args.seed)
    kwargs = dict(backbone=args.backbone, small_image=args.small_image, warmup_epochs=args.warmup_epochs)
    kwargs.update(args.method_args.get(name, {}))
    model = REGISTRY[name].build(size="cifar", **kwargs)
    # the honest baseline: random weights, batch-norm statistics recomputed on the training images
    random_backbone = model.random_init_backbone(args.seed, calibrate_on=dm.labeled_dataloader("train"))
    row = {"method": name, "random_init_knn": knn(model, dm, random_backbone)}
    model.train()
    trainer = quiet_trainer(max_epochs=args.epochs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    row.update(pretrain_s=time.perf_counter() - start, steps=trainer.global_step, knn=knn(model, dm))
    if args.linear_epochs:
        row["linear"] = linear(model, dm, None, args.linear_epochs, args.linear_lr)
        row["random_init_linear"] = linear(model, dm, random_backbone, args.linear_epochs, args.linear_lr)
    if args.finetune_epochs:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = f"{folder}/{name}.ckpt"
            trainer.save_checkpoint(checkpoint)
            start = time.perf_counter()
            row["finetune"] = finetune(checkpoint, dm, args)
            row["finetune_s"] = time.perf_counter() - start
        pool = model.encoder_spec().get("pool", "cls")
        row["random_init_finetune"] = finetune(copy.deepcopy(random_backbone), dm, args, pool=pool)
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["simclr", "mocov2", "byol"], choices=IMAGE_METHODS)
    p.add_argument("--backbone", default="resnet18", help="torchvision model name (ViTs: vit_ti_16, vit_s_16, ...)")
    p.add_argument(
        "--small-image",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CIFAR stem (3x3 stride-1 conv1, no max-pool; ViTs: 4x4 patches); --no-small-image: the ImageNet stem",
    )
    p.add_argument("--train-per-class", type=int, default=500, help="first N training images of each class")
    p.add_argument("--test-per-class", type=int, default=200, help="first N test images of each class")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--augmentation", default="simclr", help="recipe of lightning_ssl.datamodules.augmentations")
    p.add_argument("--global-crops", type=int, default=2, help="views per image (1: MAE's and I-JEPA's one view)")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--method-args", nargs="*", default=DEFAULT_METHOD_ARGS, help="NAME:key=value,key=value ...")
    p.add_argument("--linear-epochs", type=int, default=0, help="linear evaluation epochs (0: kNN only)")
    p.add_argument("--linear-lr", type=float, default=0.5)
    p.add_argument("--finetune-epochs", type=int, default=0, help="ViTFineTuning epochs (0: none; ViTs only)")
    p.add_argument("--finetune-warmup-epochs", type=float, default=1.0, help="its warmup (MAE: 5 of 100)")
    p.add_argument("--root", type=Path, default=CIFAR_ROOT, help="folder holding train/ and test/ (JPEGs)")
    args = add_common_args(p).parse_args(argv)
    args.method_args = parse_method_args(args.method_args)
    if args.finetune_epochs and not args.backbone.startswith("vit_"):
        p.error(f"--finetune-epochs fine-tunes a ViT (ViTFineTuning); --backbone {args.backbone} is not one")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    apply_threads(args)
    wall = time.perf_counter()
    dm = cifar10(
        args.root,
        args.train_per_class,
        args.test_per_class,
        args.batch_size,
        args.augmentation,
        global_crops=args.global_crops,
    )
    stem = "CIFAR stem" if args.small_image else "ImageNet stem"
    if args.backbone.startswith("vit_"):
        stem = "4x4 patches" if args.small_image else "its own patches"
    n_train, n_test = len(dm.labeled_dataloader("train").dataset), len(dm.labeled_dataloader("val").dataset)
    print(
        header(
            f"{args.backbone} ({stem}); CIFAR-10 {n_train} train / {n_test} test images; {args.epochs} epochs, "
            f"batch {args.batch_size}, {args.augmentation} views; kNN k=200 T=0.1"
        ),
        flush=True,
    )
    rows = []
    for name in args.methods:
        rows.append(run_method(name, args, dm))
        print(f"# {name} done", flush=True)
    columns = [("method", "method", ""), ("knn", "kNN top-1", ".4f"), ("random_init_knn", "random init", ".4f")]
    if args.linear_epochs:
        columns += [("linear", "linear top-1", ".4f"), ("random_init_linear", "random init", ".4f")]
    if args.finetune_epochs:
        columns += [("finetune", "fine-tune top-1", ".4f"), ("random_init_finetune", "random init", ".4f")]
    columns += [("pretrain_s", "pretrain s", ".0f"), ("steps", "steps", "d")]
    print_table(rows, columns)
    print(f"# total wall time {time.perf_counter() - wall:.0f} s", flush=True)
    write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
