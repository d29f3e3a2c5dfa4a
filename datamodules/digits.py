"""The quickstart dataset: scikit-learn's bundled handwritten digits (no download).

1,797 real 8x8 grey-level images of the digits 0-9 (UCI optical recognition of handwritten digits,
shipped inside scikit-learn), upsampled to ``image_size`` x ``image_size`` RGB. A fixed, stratified
80/20 split (seed 0) gives 1,437 training and 360 held-out images.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from datamodules.two_views import MultiViewDataset, TensorImageDataset

__all__ = ["DigitsDataModule", "digits_augmentation", "load_digits_images"]

MEAN, STD = (0.31,) * 3, (0.32,) * 3  # of the upsampled digits, in [0, 1]


def load_digits_images(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``N x 3 x S x S`` uint8 images and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.as_tensor(data.target, dtype=torch.long)


def digits_augmentation(image_size: int = 32) -> v2.Compose:
    """Views for digits: crops, small rotations and shears, contrast and blur; no flips (a flipped
    digit is another symbol)."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), ratio=(0.75, 1.33), antialias=True),
        v2.RandomAffine(degrees=15, shear=10),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def _eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class DigitsDataModule(pl.LightningDataModule):
    """Two-view batches ``([view1, view2], label)`` of the bundled digits, for the offline quickstart.

    ``labelled_dataloader("train" | "val")`` gives un-augmented ``(images, labels)`` for evaluation.
    """

    def __init__(
        self,
        batch_size: int = 256,
        image_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        drop_last: bool = True,
    ):
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.batch_size, self.image_size, self.num_workers = batch_size, image_size, num_workers
        self.val_fraction, self.split_seed, self.drop_last = val_fraction, split_seed, drop_last
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_images(self.image_size)
        train_idx, val_idx = train_test_split(
            torch.arange(len(labels)).numpy(), test_size=self.val_fraction, random_state=self.split_seed,
            stratify=labels.numpy(),
        )
        train_idx, val_idx = torch.as_tensor(train_idx).sort().values, torch.as_tensor(val_idx).sort().values
        self._splits = {"train": (images[train_idx], labels[train_idx]), "val": (images[val_idx], labels[val_idx])}

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.setup()
        return self._splits[split]

    def train_dataloader(self) -> DataLoader:
        augment = digits_augmentation(self.image_size)
        dataset = MultiViewDataset(TensorImageDataset(*self._split("train")), [augment, augment])
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def labelled_dataloader(self, split: str) -> DataLoader:
        dataset = TensorImageDataset(*self._split(split), transform=_eval_transform())
        return DataLoader(dataset, batch_size=512, shuffle=False, num_workers=0)
