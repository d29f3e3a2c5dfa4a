"""Datamodules that feed two-view batches ``([view1, view2], label)`` to the methods."""
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.cityscapes import CityscapesDataModule
from datamodules.digits import DigitsDataModule
from datamodules.imagenet import ImageNetDataModule
from datamodules.two_views import MultiViewDataset, TensorImageDataset

__all__ = [
    "CIFAR10DataModule", "CityscapesDataModule", "DigitsDataModule", "ImageNetDataModule",
    "MultiViewDataset", "TensorImageDataset",
]
