"""What the image datamodules share: two-view pretraining loaders made on the CPU (PIL, in the
workers) or on the accelerator (``gpu_augment=True``), and un-augmented labelled loaders.

With ``gpu_augment=True`` the workers only decode and resize each image to a fixed
``gpu_load_size`` square, shipping uint8 tensors and the original sizes; ``on_after_batch_transfer``
then makes the views on the device with ``GPUAugment`` (same distributions as the CPU recipe).
"""
from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.augmentations import ViewConfig, cpu_view_transform, eval_transform, preset
from datamodules.gpu_augment import GPUAugment
from datamodules.two_views import MultiViewDataset

__all__ = ["TwoViewDataModule", "FixedSizeUint8", "TransformedDataset", "UINT8_KEY"]

UINT8_KEY = "uint8_images"  # marks a batch still to be augmented on the device


class FixedSizeUint8:
    """PIL image -> ``(3 x S x S uint8 tensor, tensor([height, width]))``: the image squashed to a
    square (the on-device crop is drawn in original pixels, so the aspect ratio is restored there)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        w, h = image.size
        if (w, h) != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR, reducing_gap=3.0)
        t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return t.permute(2, 0, 1).contiguous(), torch.tensor([h, w])


class TransformedDataset(Dataset):
    """``(transform(image), label)`` over a dataset of ``(image, label)``."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), label


class _Uint8Views(Dataset):
    def __init__(self, dataset: Dataset, size: int):
        self.dataset, self.to_uint8 = dataset, FixedSizeUint8(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        pixels, size = self.to_uint8(image)
        return {UINT8_KEY: pixels, "sizes": size, "target": label}


class TwoViewDataModule(pl.LightningDataModule):
    """Base class. Subclasses implement ``_base_dataset(split)`` returning ``(RGB PIL image, label)``
    pairs for ``split`` in ``"train"`` / ``"val"`` and may override ``_labelled_train_dataset()``.

    Args:
        augmentation: a preset of ``datamodules.augmentations`` (simclr, moco_v1, moco_v2, byol, seed).
        image_size: side of the views.
        strength: colour jitter strength ``s``.
        small_image: drop the blur (small-image variant of the recipe).
        gpu_augment: make the views on the accelerator instead of in the workers.
        gpu_load_size: side of the square uint8 images shipped when ``gpu_augment`` is on
            (default ``image_size x 8 / 7``: 256 for 224).
        eval_resize, eval_crop: evaluation transform (resize shorter side, centre crop; None skips).
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        augmentation: str,
        image_size: int,
        strength: float,
        small_image: bool,
        gpu_augment: bool,
        gpu_load_size: int | None,
        drop_last: bool,
        eval_resize: int | None,
        eval_crop: int | None,
        eval_batch_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        pin_memory: bool | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.eval_batch_size = eval_batch_size
        self.views: list[ViewConfig] = preset(augmentation, image_size, strength, small_image, mean, std)
        self.gpu_augment = gpu_augment
        # default: the views' size x 8/7 (256 for 224-pixel views), as the evaluation resize
        self.gpu_load_size = gpu_load_size or round(image_size * 8 / 7)
        self.eval_resize, self.eval_crop = eval_resize, eval_crop
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.augmenter = GPUAugment(self.views) if gpu_augment else None
        self._augment_generator: torch.Generator | None = None

    # ---------------------------------------------------------------- to implement
    def _base_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _labelled_train_dataset(self) -> Dataset:
        return self._base_dataset("train")

    # ---------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
        )

    def cpu_transforms(self) -> list:
        return [cpu_view_transform(v) for v in self.views]

    def pretrain_dataset(self) -> Dataset:
        """The two-view training set: ``([view1, view2], label)`` or, with ``gpu_augment``, uint8 dicts."""
        base = self._base_dataset("train")
        if self.gpu_augment:
            return _Uint8Views(base, self.gpu_load_size)
        return MultiViewDataset(base, self.cpu_transforms())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.pretrain_dataset(), self.batch_size, shuffle=True, drop_last=self.drop_last)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Makes the views on the device when the loader shipped uint8 images."""
        if isinstance(batch, dict) and UINT8_KEY in batch:
            images = batch[UINT8_KEY]
            augmenter = self.augmenter or GPUAugment(self.views)
            self.augmenter = augmenter.to(images.device)
            return self.augmenter(images, batch["sizes"], self._generator(images.device)), batch["target"]
        return batch

    def _generator(self, device: torch.device) -> torch.Generator:
        """A generator per device and process, seeded from the global seed and the process rank, so that
        processes with the same seed do not draw the same augmentation parameters."""
        if self._augment_generator is None or self._augment_generator.device != device:
            rank = int(getattr(self.trainer, "global_rank", 0) or 0) if self.trainer is not None else 0
            self._augment_generator = torch.Generator(device=device)
            self._augment_generator.manual_seed((torch.initial_seed() + 1_000_003 * rank) % 2**63)
        return self._augment_generator

    def labelled_dataloader(self, split: str, augment: bool = False) -> DataLoader:
        """Un-augmented ``(images, labels)`` of ``split`` ("train" or "val"), for kNN and linear probes.
        ``augment=True`` (train only) gives crop-and-flip training views for fine-tuning, shuffled."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        dataset = self._labelled_train_dataset() if split == "train" else self._base_dataset("val")
        if augment:
            if split != "train":
                raise ValueError("augment=True is for the training split only")
            import torchvision.transforms as T

            transform = T.Compose([
                T.RandomResizedCrop(self.views[0].size, antialias=True), T.RandomHorizontalFlip(),
                T.ToTensor(), T.Normalize(self.mean, self.std),
            ])
            return self._loader(TransformedDataset(dataset, transform), self.eval_batch_size, True, False)
        transform = eval_transform(self.eval_resize, self.eval_crop, self.mean, self.std)
        return self._loader(TransformedDataset(dataset, transform), self.eval_batch_size, False, False)
