"""Small datamodules for tests: random two-view batches on CPU."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class _RandomViews(Dataset):
    def __init__(self, num_samples: int, image_size: int, num_classes: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(num_samples, 3, image_size, image_size, generator=gen)
        self.noise = torch.randn(num_samples, 3, image_size, image_size, generator=gen) * 0.1
        self.labels = torch.randint(0, num_classes, (num_samples,), generator=gen)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return [self.images[i], self.images[i] + self.noise[i]], int(self.labels[i])


class RandomTwoViews(pl.LightningDataModule):
    """Deterministic random images; the second view is the first plus small noise."""

    def __init__(self, num_samples: int = 32, batch_size: int = 8, image_size: int = 32, num_classes: int = 4, seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.dataset = _RandomViews(num_samples, image_size, num_classes, seed)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def labelled_dataloader(self, split: str):
        images = torch.utils.data.TensorDataset(self.dataset.images, self.dataset.labels)
        return DataLoader(images, batch_size=self.batch_size)
