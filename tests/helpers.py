"""Small datamodules for tests (random two-view batches on CPU) and a host-synchronization counter."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_ssl.callbacks import PreemptionCheckpoint


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

    def __init__(
        self, num_samples: int = 32, batch_size: int = 8, image_size: int = 32, num_classes: int = 4, seed: int = 0
    ):
        super().__init__()
        self.batch_size = batch_size
        self.dataset = _RandomViews(num_samples, image_size, num_classes, seed)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def labeled_dataloader(self, split: str):
        images = torch.utils.data.TensorDataset(self.dataset.images, self.dataset.labels)
        return DataLoader(images, batch_size=self.batch_size)


_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class SyncCounter(pl.Callback):
    """Counts Python-level host synchronizations of tensors between consecutive batch starts."""

    def __init__(self):
        self.per_step, self._count = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._count is not None:
            self.per_step.append(self._count)
        self._count = 0

    def patch(self, monkeypatch):
        for name in _SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *a, _original=original, **k):
                # Adam(W) reads its step counters with .item(); PyTorch keeps them on the host unless the
                # optimizer is capturable, so that read is no device synchronization: not counted.
                caller = sys._getframe(1).f_code.co_filename
                host_step = "torch/optim/" in caller and tensor.ndim == 0
                # the patch-mask generators work on CPU tensors by design (their draws are never on a device)
                cpu_masks = caller.endswith("lightning_ssl/masking.py")
                if self._count is not None and not host_step and not cpu_masks:
                    self._count += 1
                return _original(tensor, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpointing, progress bar or model summary (unless given)."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


class PauseAt(pl.Callback):
    """Blocks after optimizer step ``step`` (writing ``marker`` first) until a stop signal arrives or
    ``timeout`` seconds pass: lets a test kill or signal a real training process at a known step."""

    def __init__(self, step: int, marker: str, timeout: float = 120.0):
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(trainer.global_step))
        preemption = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not any(c.received for c in preemption):
            time.sleep(0.05)
