"""CIFAR-10: brief SimCLR pretraining on a subset, then weighted kNN and offline linear top-1 of the
frozen encoder against the same architecture at random initialisation.

A CPU-sized check that the evaluation pipeline measures real learning, not a reproduction of the
paper's numbers (those need hundreds of epochs on all 50,000 images and a GPU). Images come from
the JPEG copy in ImageFolder layout (``~/.cache/lightning-ssl/cifar10-jpg/{train,test}``), loaded
into memory. During pretraining the online linear probe runs on the labelled batches.

    python benchmarks/cifar10_eval.py --train-per-class 500 --test-per-class 100 --epochs 5
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from callbacks import OnlineLinearProbe
from datamodules.two_views import MultiViewDataset, TensorImageDataset
from lightning_ssl import SimCLR
from lightning_ssl.evaluation import LinearEvaluation, extract_features, weighted_knn_predict

CIFAR = Path(os.environ.get("LIGHTNING_SSL_CIFAR10", Path.home() / ".cache" / "lightning-ssl" / "cifar10-jpg"))
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def load_split(root: Path, split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images (sorted file names) of each class as uint8 ``N x 3 x 32 x 32``."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    if len(classes) != 10:
        raise FileNotFoundError(f"expected 10 class folders in {root / split}, found {len(classes)}")
    images, labels = [], []
    for c, name in enumerate(classes):
        for path in sorted((root / split / name).glob("*.jpg"))[:per_class]:
            images.append(decode_image(str(path), mode=ImageReadMode.RGB))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def simclr_views(size: int = 32) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def linear_train_transform(size: int = 32) -> v2.Compose:
    """The linear-evaluation protocol's augmentation: random resized crop + flip."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
    ])


class InMemoryCIFAR(pl.LightningDataModule):
    """Two-view labelled batches of an in-memory CIFAR-10 subset, plus ``labelled_dataloader``."""

    def __init__(self, train, test, batch_size: int):
        super().__init__()
        self.train, self.test, self.batch_size = train, test, batch_size

    def train_dataloader(self):
        views = simclr_views()
        return DataLoader(MultiViewDataset(TensorImageDataset(*self.train), [views, views]),
                          batch_size=self.batch_size, shuffle=True, drop_last=True)

    def labelled_dataloader(self, split: str):
        data = self.train if split == "train" else self.test
        return DataLoader(TensorImageDataset(*data, transform=eval_transform()), batch_size=500)


def knn_top1(encoder, dm) -> float:
    encoder.eval()
    train_x, train_y = extract_features(encoder, dm.labelled_dataloader("train"))
    test_x, test_y = extract_features(encoder, dm.labelled_dataloader("val"))
    return (weighted_knn_predict(train_x, train_y, test_x, 10, k=200, temperature=0.1) == test_y).float().mean().item()


def linear_top1(encoder, dm, epochs: int, lr: float, batch_size: int) -> dict[str, float]:
    model = LinearEvaluation(encoder, num_classes=10, lr=lr)
    train = DataLoader(TensorImageDataset(*dm.train, transform=linear_train_transform()), batch_size=batch_size, shuffle=True)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, train)  # raises if the frozen encoder changed
    result = trainer.validate(model, dm.labelled_dataloader("val"), verbose=False)[0]
    return {"top1": result["val/top1"], "top5": result["val/top5"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=CIFAR)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5, help="SimCLR pretraining epochs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--linear-epochs", type=int, default=10)
    parser.add_argument("--linear-lr", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cifar10_eval.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    start = time.time()

    dm = InMemoryCIFAR(load_split(args.root, "train", args.train_per_class), load_split(args.root, "test", args.test_per_class),
                       args.batch_size)
    # ImageNet stem (stride 4) keeps a 32x32 ResNet-18 affordable on a CPU, as in the quickstart
    model = SimCLR(backbone="resnet18", small_image=False, temperature=0.2, base_lr=0.3, warmup_epochs=1)
    random_encoder = model.random_init_backbone(seed=0)
    probe = OnlineLinearProbe(num_classes=10, lr=1e-3)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    trainer.fit(model, datamodule=dm)
    pretrain_s = time.time() - start

    results = {"pretrained": {}, "random_init": {}}
    for name, encoder in (("pretrained", model.backbone), ("random_init", random_encoder)):
        results[name]["knn_top1"] = knn_top1(encoder, dm)
        linear = linear_top1(encoder, dm, args.linear_epochs, args.linear_lr, args.batch_size)
        results[name]["linear_top1"], results[name]["linear_top5"] = linear["top1"], linear["top5"]
    results["online_probe_top1_last_epoch"] = probe.last_metrics.get("top1")
    results["setup"] = {
        "train_images": len(dm.train[1]), "test_images": len(dm.test[1]), "pretrain_epochs": args.epochs,
        "linear_epochs": args.linear_epochs, "batch_size": args.batch_size, "backbone": "resnet18 (ImageNet stem)",
        "pretrain_seconds": round(pretrain_s, 1), "total_seconds": round(time.time() - start, 1), "threads": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'':<14}{'kNN top-1':>10}{'linear top-1':>14}{'linear top-5':>14}")
    for name in ("pretrained", "random_init"):
        r = results[name]
        print(f"{name:<14}{r['knn_top1']:>10.4f}{r['linear_top1']:>14.4f}{r['linear_top5']:>14.4f}")
    print(f"online probe top-1 after pretraining: {results['online_probe_top1_last_epoch']:.4f}")
    print(f"wall time {results['setup']['total_seconds']} s (pretraining {results['setup']['pretrain_seconds']} s)")


if __name__ == "__main__":
    main()
