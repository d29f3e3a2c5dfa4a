"""The quickstart dataset: scikit-learn's bundled handwritten digits (no download).

1,797 real 8x8 gray-level images of the digits 0-9 (UCI optical recognition of handwritten digits,
shipped inside scikit-learn), upsampled to ``image_size`` x ``image_size`` RGB and held in memory as
uint8 tensors. A fixed, stratified 80/20 split (seed 0) gives 1,437 training and 360 held-out images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_ssl.datamodules.augmentations import DIGITS_MEAN, DIGITS_STD
from lightning_ssl.datamodules.two_view_datamodule import TwoViewDataModule
from lightning_ssl.datamodules.two_views import TensorImageDataset

__all__ = ["DigitsDataModule", "load_digits_images"]


def load_digits_images(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``N x 3 x S x S`` uint8 images and their labels."""
    from sklearn.datasets import load_digits  # scikit-learn is imported only for this dataset

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.as_tensor(data.target, dtype=torch.long)


class DigitsDataModule(TwoViewDataModule):
    """Two-view batches ``([view1, view2], label)`` of the bundled digits, for the offline quickstart,
    with the ``digits`` augmentation recipe (crops, small rotations and shears, brightness, contrast
    and blur; no flips: a flipped digit is another symbol).

    ``labeled_dataloader("train" | "val")`` gives un-augmented ``(images, labels)`` for evaluation.

    Args:
        val_fraction, split_seed: the stratified held-out split.
        Others: see ``TwoViewDataModule``.
    """

    tensor_images = True

    def __init__(
        self,
        batch_size: int = 256,
        image_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        drop_last: bool = True,
        augmentation: str = "digits",
        eval_batch_size: int = 512,
        mean: tuple[float, float, float] = DIGITS_MEAN,
        std: tuple[float, float, float] = DIGITS_STD,
        **kwargs,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            augmentation=augmentation,
            image_size=image_size,
            drop_last=drop_last,
            eval_resize=None,
            eval_crop=None,
            eval_batch_size=eval_batch_size,
            mean=mean,
            std=std,
            **kwargs,
        )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.image_size = image_size
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self._splits: dict[str, TensorImageDataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_images(self.image_size)
        train_idx, val_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.val_fraction,
            random_state=self.split_seed,
            stratify=labels.numpy(),
        )
        train_idx, val_idx = torch.as_tensor(train_idx).sort().values, torch.as_tensor(val_idx).sort().values
        self._splits = {
            "train": TensorImageDataset(images[train_idx], labels[train_idx]),
            "val": TensorImageDataset(images[val_idx], labels[val_idx]),
        }

    def _base_dataset(self, split: str) -> Dataset:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.setup()
        return self._splits[split]
