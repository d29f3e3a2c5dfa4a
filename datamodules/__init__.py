"""Datamodules that feed multi-view batches ``([view1, view2], label)`` to the methods (images), and
``([waveforms], speaker)`` to ``CPCAudio`` (``AudioFolderDataModule``).

Installed as ``lightning_ssl.datamodules`` (the repository keeps the folder at its top level).
"""

from lightning_ssl.datamodules.audio import AudioFolderDataModule
from lightning_ssl.datamodules.cifar10 import CIFAR10DataModule
from lightning_ssl.datamodules.cityscapes import CityscapesDataModule
from lightning_ssl.datamodules.digits import DigitsDataModule
from lightning_ssl.datamodules.imagenet import ImageNetDataModule
from lightning_ssl.datamodules.in_memory import InMemoryDataModule
from lightning_ssl.datamodules.two_view_datamodule import TwoViewDataModule
from lightning_ssl.datamodules.two_views import MultiViewDataset, TensorImageDataset

__all__ = [
    "AudioFolderDataModule",
    "CIFAR10DataModule",
    "CityscapesDataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
    "InMemoryDataModule",
    "TwoViewDataModule",
    "MultiViewDataset",
    "TensorImageDataset",
]
