"""Random inputs of any registered method's modality for the contract and distributed tests (images
keep their own helpers): a datamodule over ``MethodEntry.example_views``."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_ssl.methods import MethodEntry


class ExampleViews(Dataset):
    """``([view1, ...], label)`` rows of ``entry.example_views(n, seed)`` with random labels."""

    def __init__(self, entry: MethodEntry, n: int, seed: int = 0, num_views: int = 1, num_classes: int = 4):
        self.views = entry.example_views(n, seed=seed, num_views=num_views)
        self.labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed + 1))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return [v[i] for v in self.views], int(self.labels[i])


class ExampleViewsDataModule(pl.LightningDataModule):
    """Deterministic example inputs of ``entry``'s modality; ``labeled_dataloader`` gives the first view."""

    def __init__(self, entry: MethodEntry, num_samples: int = 24, batch_size: int = 8, seed: int = 0, shuffle=False):
        super().__init__()
        self.dataset = ExampleViews(entry, num_samples, seed)
        self.batch_size, self.shuffle = batch_size, shuffle

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=True)

    def labeled_dataloader(self, split: str):
        pairs = torch.utils.data.TensorDataset(self.dataset.views[0], self.dataset.labels)
        return DataLoader(pairs, batch_size=self.batch_size)
