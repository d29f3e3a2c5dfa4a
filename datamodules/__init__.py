"""Datamodules that feed two-view batches ``([view1, view2], label)`` to the methods."""
from datamodules.cityscapes import CityscapesDataModule
from datamodules.digits import DigitsDataModule
from datamodules.two_views import MultiViewDataset, TensorImageDataset

__all__ = ["CityscapesDataModule", "DigitsDataModule", "MultiViewDataset", "TensorImageDataset"]
