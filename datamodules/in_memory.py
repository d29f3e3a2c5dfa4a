"""Image datasets held in memory as uint8 tensors (CIFAR-10 with ``in_memory=True``, your own tensors).

``load_images`` decodes ``(image, label)`` pairs of any dataset of RGB PIL images into an
``N x 3 x H x W`` uint8 tensor (all images must share one size); ``balanced_subset`` picks the first
``n`` examples of each class, a deterministic, class-balanced subset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_ssl.datamodules.two_view_datamodule import TwoViewDataModule, Uint8ViewsDataset
from lightning_ssl.datamodules.two_views import TensorImageDataset

__all__ = ["load_images", "balanced_subset", "InMemoryDataModule"]


def balanced_subset(targets: Sequence[int], per_class: int) -> list[int]:
    """Indices of the first ``per_class`` examples of each class (all of a class with fewer), sorted."""
    if per_class < 1:
        raise ValueError(f"per_class must be positive, got {per_class}")
    seen: dict[int, int] = {}
    keep = []
    for i, t in enumerate(targets):
        t = int(t)
        if seen.get(t, 0) < per_class:
            seen[t] = seen.get(t, 0) + 1
            keep.append(i)
    return keep


def load_images(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(RGB PIL image, label)`` pairs of ``dataset`` as ``N x 3 x H x W`` uint8 images and labels."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot load an empty dataset into memory")
    first, _ = dataset[0]
    w, h = first.size
    images = torch.empty(n, h, w, 3, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        image, label = dataset[i]
        if image.size != (w, h):
            raise ValueError(
                f"images held in memory must share one size: image {i} is {image.size[0]}x{image.size[1]}, "
                f"the first is {w}x{h}; use in_memory=False"
            )
        images[i] = torch.from_numpy(np.array(image, dtype=np.uint8))  # writable copy (no torch warning)
        labels[i] = int(label)
    return images.permute(0, 3, 1, 2).contiguous(), labels


class InMemoryDataModule(TwoViewDataModule):
    """Multi-view batches of images you already hold as uint8 tensors (``N x 3 x H x W``) with labels.

    Everything of ``TwoViewDataModule`` applies: a recipe from the presets, the CPU path (``transforms.v2``
    on each uint8 image) or the on-device path (``gpu_augment=True``: whole batches gathered from the
    tensor, views made on the device; ``resident_device`` keeps the training images on the accelerator).
    ``val_images``/``val_labels`` feed ``labeled_dataloader("val")`` (kNN monitor, probe).
    """

    tensor_images = True

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        val_images: torch.Tensor | None = None,
        val_labels: torch.Tensor | None = None,
        resident_device: str | None = None,
        image_size: int = 32,
        gpu_load_size: int | None = None,
        eval_resize: int | None = None,
        eval_crop: int | None = None,
        **kwargs,
    ):
        super().__init__(
            image_size=image_size,
            gpu_load_size=gpu_load_size or int(train_images.shape[-1]),
            eval_resize=eval_resize,
            eval_crop=eval_crop,
            **kwargs,
        )
        for name, images in (("train_images", train_images), ("val_images", val_images)):
            if images is not None and (images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3):
                raise ValueError(
                    f"{name} must be an N x 3 x H x W uint8 tensor, got {images.dtype} {tuple(images.shape)}"
                )
        if resident_device is not None and not (self.gpu_augment and self.num_workers == 0):
            raise ValueError("resident_device needs gpu_augment=True and num_workers=0")
        self.resident_device = resident_device
        self._splits = {"train": TensorImageDataset(train_images, train_labels)}
        if val_images is not None:
            self._splits["val"] = TensorImageDataset(val_images, val_labels)

    def _base_dataset(self, split: str) -> Dataset:
        if split not in self._splits:
            raise ValueError(f"no {split!r} images: pass val_images and val_labels for a validation split")
        return self._splits[split]

    def pretrain_dataset(self) -> Dataset:
        if self.resident_device is None:
            return super().pretrain_dataset()
        return Uint8ViewsDataset(self._splits["train"].to(self.resident_device), self.gpu_load_size)
