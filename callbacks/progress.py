"""A progress bar that shows the loss and the throughput without a host synchronization per step."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

__all__ = ["SSLProgressBar"]


class SSLProgressBar(TQDMProgressBar):
    """Lightning's bar, plus ``loss`` and ``img/s`` (source images per second), without ``v_num``.

    The loss is a device tensor: reading it waits for the device. The bar reads it only every
    ``trainer.log_every_n_steps`` optimizer steps (when the loggers read it anyway) and at the end of an
    epoch, so the steps in between make no host synchronization. Methods put it in place of Lightning's
    default bar (not of a bar you chose, and not when the bar is off).
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._loss: float | None = None
        self._images, self._since, self._rate = 0, 0.0, None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._images, self._since = 0, time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        views = batch[0] if isinstance(batch, (tuple, list)) else batch
        first = views[0] if isinstance(views, (tuple, list)) else views
        self._images += int(first.shape[0]) if isinstance(first, torch.Tensor) else 0
        last = batch_idx + 1 == self.total_train_batches
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 or last:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self._loss = float(loss.detach())  # the one host synchronization, every log_every_n_steps
            elapsed = time.perf_counter() - self._since
            self._rate = self._images / elapsed if elapsed > 0 else None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        shown: dict[str, int | str | float] = {}
        if self._loss is not None:
            shown["loss"] = f"{self._loss:.4g}"
        if self._rate is not None:
            shown["img/s"] = f"{self._rate:.0f}"
        return {**shown, **metrics}
