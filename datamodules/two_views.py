"""Datasets that return several augmented views of each image."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["MultiViewDataset", "TensorImageDataset", "split_key"]


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


def split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    """``index`` or ``(index, seed)`` (a ``ResumableSampler`` key) -> ``(index, seed or None)``."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


class MultiViewDataset(Dataset):
    """Wraps a dataset of ``(image, label)`` (untransformed) and returns ``([t1(image), t2(image), ...], label)``.

    Indexed with an ``(index, seed)`` key (``ResumableSampler``), the views are drawn from torch's CPU
    generator seeded with ``seed`` (its state is restored afterwards), so they depend on the sample
    alone: not on the worker, the number of workers, or an interruption."""

    def __init__(self, dataset: Dataset, transforms: Sequence[Callable]):
        if len(transforms) < 1:  # one view: MAE, I-JEPA
            raise ValueError("a multi-view dataset needs at least one view transform")
        self.dataset, self.transforms = dataset, list(transforms)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = split_key(key)
        image, label = self.dataset[index]
        if seed is None:
            return [t(image) for t in self.transforms], label
        generator = torch.random.default_generator  # the CPU generator only: CUDA's are left alone
        state = generator.get_state()
        try:
            generator.manual_seed(seed)
            return [t(image) for t in self.transforms], label
        finally:
            generator.set_state(state)
