"""Shared fixtures. Tests run on CPU with tiny inputs; real-data tests skip without ../shared."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_TAR = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR_CACHE = Path(os.environ.get("LIGHTNING_SSL_CIFAR10", Path.home() / ".cache" / "lightning-ssl" / "cifar10-jpg"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """The CIFAR-10 JPEG tree (train/ and test/), unpacked from ../shared once; skips if unavailable."""
    if not (CIFAR_CACHE / "train").is_dir():
        if not SHARED_TAR.is_file():
            pytest.skip("CIFAR-10 JPEG copy not available (../shared/data/cifar10-jpg.tar.gz)")
        CIFAR_CACHE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SHARED_TAR) as tar:
            tar.extractall(CIFAR_CACHE, filter="data")
    return CIFAR_CACHE


class TinyConvNet(nn.Module):
    """A two-layer conv net: a fast stand-in backbone for tests (outputs B x 16 x H/2 x W/2)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def tiny_backbone() -> nn.Module:
    return TinyConvNet()


def tiny_vit() -> nn.Module:
    """A two-block ViT on 16x16 images (4x4 patches, width 32): the stand-in backbone of ViT-only methods."""
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def small_backbone(entry) -> nn.Module:
    """The fast test backbone of a registry entry: a tiny ViT for ViT-only methods, ``TinyConvNet`` otherwise."""
    return tiny_vit() if entry.vit_only else TinyConvNet()
