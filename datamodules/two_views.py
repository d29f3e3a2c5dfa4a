"""Datasets that return several augmented views of each image."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["MultiViewDataset", "TensorImageDataset"]


class TensorImageDataset(Dataset):
    """Images held in memory as a ``N x C x H x W`` uint8 tensor, with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """The same dataset with its images and labels on ``device``."""
        return TensorImageDataset(self.images.to(device), self.labels.to(device), self.transform)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class MultiViewDataset(Dataset):
    """Wraps a dataset of ``(image, label)`` (untransformed) and returns ``([t1(image), t2(image), ...], label)``."""

    def __init__(self, dataset: Dataset, transforms: Sequence[Callable]):
        if len(transforms) < 2:
            raise ValueError("a multi-view dataset needs at least two view transforms")
        self.dataset, self.transforms = dataset, list(transforms)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return [t(image) for t in self.transforms], label
