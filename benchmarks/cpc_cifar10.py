"""Pretrain CPC on a CIFAR-10 subset on CPU and compare frozen features with the same encoder at random init.

    PYTHONPATH=$PWD python benchmarks/cpc_cifar10.py --train-size 5000 --test-size 2000 --epochs 5

Reads the CIFAR-10 JPEG copy (ImageFolder layout ``{train,test}/<class>/*.jpg``; default
``~/.cache/lightning-ssl/cifar10-jpg``, unpacked from ``../shared/data/cifar10-jpg.tar.gz``) into
memory: a class-balanced random subset of the training split for pretraining and as the kNN memory
bank, and a class-balanced subset of the test split to classify. The encoder is a small 3-layer conv
net applied to each 8x8 patch of the 7x7 grid (stride 4). Prints weighted kNN top-1 (k = 200,
T = 0.1) of the pretrained encoder, of the same encoder at random initialisation, and of raw pixels.
"""
from __future__ import annotations

import argparse
import random
import tarfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.io import ImageReadMode, decode_image

from lightning_ssl import CPC, CPCv2
from lightning_ssl.evaluation import weighted_knn_predict
from lightning_ssl.methods.cpc import batch_norm_to_layer_norm

CACHE = Path.home() / ".cache" / "lightning-ssl" / "cifar10-jpg"
SHARED_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class PatchEncoder(nn.Module):
    """Three 3x3 convolutions (32, 64, 128 channels; the last two stride 2) for 8x8 patches."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c_out, stride in ((32, 1), (64, 2), (128, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def load_split(root: Path, split: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced random subset of ``size`` images: ``N x 3 x 32 x 32`` uint8 and labels."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    rng = random.Random(seed)
    per_class = size // len(classes)
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((root / split / name).glob("*.jpg"))
        for path in rng.sample(files, min(per_class, len(files))):
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            images.append(decode_image(data, mode=ImageReadMode.RGB))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - MEAN) / STD


def augment_collate(items):
    """Random crop with 4-pixel padding and a horizontal flip for each image of the batch."""
    images = normalise(torch.stack([x for x, _ in items]))
    padded = F.pad(images, (4, 4, 4, 4), mode="reflect")
    out = torch.empty_like(images)
    for n in range(len(items)):
        dy, dx = random.randint(0, 8), random.randint(0, 8)
        crop = padded[n, :, dy : dy + 32, dx : dx + 32]
        out[n] = crop.flip(-1) if random.random() < 0.5 else crop
    return [out], torch.stack([y for _, y in items])


@torch.no_grad()
def features(model: CPC, images: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
    model.eval()
    if backbone is not None:
        backbone.eval()
    return torch.cat([model.representation(normalise(x), backbone=backbone) for x in images.split(500)])


def knn_top1(train_x, train_y, test_x, test_y) -> float:
    pred = weighted_knn_predict(train_x, train_y, test_x, num_classes=10, k=200, temperature=0.1)
    return (pred == test_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=CACHE)
    parser.add_argument("--version", choices=["v1", "v2"], default="v1")
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prediction-steps", type=int, default=5)
    parser.add_argument("--first-step", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    if not (args.root / "train").is_dir():
        if not SHARED_TAR.is_file():
            raise SystemExit(f"no CIFAR-10 JPEG copy at {args.root} nor {SHARED_TAR}")
        args.root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_TAR) as tar:
            tar.extractall(args.root, filter="data")
    train_x, train_y = load_split(args.root, "train", args.train_size, args.seed)
    test_x, test_y = load_split(args.root, "test", args.test_size, args.seed)
    print(f"loaded {len(train_x)} train / {len(test_x)} test images in {time.time() - start:.0f}s", flush=True)

    pl.seed_everything(args.seed, verbose=False)
    random.seed(args.seed)
    encoder = PatchEncoder()
    cls = CPCv2 if args.version == "v2" else CPC
    if cls is CPCv2:
        batch_norm_to_layer_norm(encoder)  # v2's layer norm, for a module passed as backbone
    model = cls(
        backbone=encoder, patch_size=8, patch_stride=4, grid_size=7, embedding_dim=128, context_hidden_dim=64,
        context_blocks=3, prediction_steps=args.prediction_steps, first_step=args.first_step, lr=args.lr,
    )
    baseline = model.random_init_backbone(seed=args.seed)  # a copy re-initialised before training

    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size, shuffle=True,
                        drop_last=True, collate_fn=augment_collate)
    with torch.no_grad():
        model.train()
        first = model.loss(next(iter(loader))[0][0])["loss"].item()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10)
    fit_start = time.time()
    trainer.fit(model, loader)
    fit_time = time.time() - fit_start
    last = trainer.callback_metrics["train/loss"].item()
    n_candidates = args.batch_size * 49
    print(f"CPC {args.version}: {args.epochs} epochs x {len(loader)} steps in {fit_time:.0f}s; "
          f"loss {first:.3f} (first batch, log N = {torch.tensor(float(n_candidates)).log().item():.3f}) "
          f"-> {last:.3f} (last step)", flush=True)

    results = {}
    for name, backbone in (("pretrained", None), ("random init", baseline)):
        results[name] = knn_top1(features(model, train_x, backbone), train_y, features(model, test_x, backbone), test_y)
    results["raw pixels"] = knn_top1(normalise(train_x).flatten(1), train_y, normalise(test_x).flatten(1), test_y)
    print(f"weighted kNN top-1 (k=200, T=0.1), {len(train_x)} train -> {len(test_x)} test images:")
    for name, acc in results.items():
        print(f"  {name:<12} {acc:.4f}")
    print(f"total wall time {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
