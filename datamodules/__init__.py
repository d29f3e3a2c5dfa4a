"""Datamodules that feed two-view batches ``([view1, view2], label)`` to the methods."""
from datamodules.digits import DigitsDataModule
from datamodules.two_views import MultiViewDataset, TensorImageDataset

__all__ = ["DigitsDataModule", "MultiViewDataset", "TensorImageDataset"]
