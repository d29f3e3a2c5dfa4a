"""Pretrain methods on (a subset of) the CIFAR-10 JPEG copy, then report weighted kNN top-1 on the
test split (k = 200, T = 0.1; Wu et al. 2018) next to the same backbone at random initialisation,
with wall times.

The training images are decoded once into a uint8 tensor (``benchmarks/cifar_data.py``) and two
SimCLR-style views are made per batch on the tensor's device; kNN uses un-augmented, normalised
images of the training subset as the memory bank and of the test subset as queries.

Settings are the papers' defaults except those tied to the dataset size and the budget, which are
arguments: warmup (``--warmup-epochs``), MoCo's queue (``--queue-size``, at most the subset) and key
encoder momentum (``--moco-tau``). Example (the CPU table in docs/speed.md)::

    python benchmarks/cifar10_knn.py --methods simclr mocov2 byol --backbone resnet18 \\
        --train-subset 5000 --test-subset 2000 --epochs 3 --batch-size 128

A new method is one entry in ``METHODS``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.cifar_data import CIFAR_ROOT, TensorTwoViewLoader, load_cifar10, normalize  # noqa: E402
from lightning_ssl import BYOL, CPC, MoCoV2, SimCLR  # noqa: E402
from lightning_ssl.evaluation.knn import weighted_knn_predict  # noqa: E402

METHODS = {
    "simclr": lambda a, **kw: SimCLR(warmup_epochs=a.warmup_epochs, **kw),
    "mocov2": lambda a, **kw: MoCoV2(warmup_epochs=a.warmup_epochs, queue_size=a.queue_size, momentum_tau=a.moco_tau, **kw),
    "byol": lambda a, **kw: BYOL(warmup_epochs=a.warmup_epochs, **kw),
    # CPC v1 on the 32x32 grid of the paper's small-image setting: 7x7 patches of 8 px, stride 4;
    # AdamW lr 1e-3 (the base-lr rule would give 5e-4 at batch 128; 1e-3 trains faster on this budget).
    "cpc": lambda a, **kw: CPC(patch_size=8, patch_stride=4, lr=1e-3, **kw),
}


@torch.no_grad()
def features(encode, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([encode(normalize(images[i : i + batch_size])).float() for i in range(0, len(images), batch_size)])


def knn_top1(encode, train, test, k: int, temperature: float) -> float:
    (train_x, train_y), (test_x, test_y) = train, test
    bank, queries = features(encode, train_x), features(encode, test_x)
    pred = weighted_knn_predict(bank, train_y, queries, num_classes=10, k=k, temperature=temperature)
    return (pred == test_y).float().mean().item()


def make_loader(args, train):
    # With the CIFAR-10 datamodule merged, a CIFAR10DataModule can take this loader's place.
    return TensorTwoViewLoader(*train, batch_size=args.batch_size, seed=args.seed)


_RANDOM_INIT: dict = {}


def run_method(name: str, args, train, test) -> dict:
    import pytorch_lightning as pl

    torch.manual_seed(args.seed)
    model = METHODS[name](args, backbone=args.backbone, small_image=args.small_image)
    # The same architecture and seed at random init, through the method's own representation (CPC's
    # is the mean over its patch grid); evaluated once per kind of representation.
    kind = type(model).representation
    if kind not in _RANDOM_INIT:
        random_backbone = model.random_init_backbone(args.seed).eval()
        model.eval()
        _RANDOM_INIT[kind] = knn_top1(lambda x: model.representation(x, backbone=random_backbone), train, test, args.knn_k, args.knn_t)
        model.train()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, default_root_dir=args.out)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=make_loader(args, train))
    train_s = time.perf_counter() - start
    model.eval()
    top1 = knn_top1(model.representation, train, test, args.knn_k, args.knn_t)
    return dict(method=name, knn_top1=top1, random_init_top1=_RANDOM_INIT[kind], pretrain_s=train_s,
                steps=trainer.global_step)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["simclr", "mocov2", "byol"], choices=sorted(METHODS))
    p.add_argument("--backbone", default="resnet18", help="torchvision model name")
    p.add_argument("--small-image", action=argparse.BooleanOptionalAction, default=True,
                   help="CIFAR stem (3x3 stride-1 conv1, no max-pool); --no-small-image keeps the ImageNet stem")
    p.add_argument("--train-subset", type=int, default=5000, help="balanced subset of the 50,000 training images")
    p.add_argument("--test-subset", type=int, default=2000, help="balanced subset of the 10,000 test images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--queue-size", type=int, default=4096, help="MoCo: a multiple of the batch size")
    p.add_argument("--moco-tau", type=float, default=0.99, help="MoCo key-encoder momentum (0.999 in the paper's 200-epoch ImageNet runs)")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=CIFAR_ROOT, help="folder holding train/ and test/ (JPEGs)")
    p.add_argument("--out", type=Path, default=Path("outputs/cifar10_knn"))
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    train = load_cifar10("train", args.train_subset, args.root)
    test = load_cifar10("test", args.test_subset, args.root)
    stem = "CIFAR stem" if args.small_image else "ImageNet stem"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.backbone} ({stem}); {len(train[0])} train / "
          f"{len(test[0])} test images; {args.epochs} epochs, batch {args.batch_size}, warmup {args.warmup_epochs}; "
          f"kNN k={args.knn_k} T={args.knn_t}; torch threads {torch.get_num_threads()}", flush=True)
    print(f"{'method':<8} {'kNN top-1':>10} {'random init':>12} {'pretrain s':>11} {'steps':>6}", flush=True)
    rows = []
    for name in args.methods:
        row = run_method(name, args, train, test)
        rows.append(row)
        print(f"{name:<8} {row['knn_top1']:>10.4f} {row['random_init_top1']:>12.4f} {row['pretrain_s']:>11.0f} "
              f"{row['steps']:>6}", flush=True)
    print(f"# total wall time {time.perf_counter() - wall:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
