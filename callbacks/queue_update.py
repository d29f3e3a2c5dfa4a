"""Maintenance of MoCo's queue of negative keys."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lightning_ssl.contracts import HasQueue, require
from lightning_ssl.distributed import gather_no_grad

__all__ = ["QueueUpdate"]


class QueueUpdate(pl.Callback):
    """After each training batch, enqueue the keys it produced (``outputs["keys"]``), gathered over
    processes in rank order, so every process holds the same queue (He et al. 2020, Algorithm 1:
    the current keys enter after the loss is computed; the oldest leave).

    The queue and pointer are buffers of the module (``pl_module.enqueue(keys)`` writes them), so
    checkpoints restore them exactly and this callback keeps no state.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require(pl_module, HasQueue, "QueueUpdate", "a module with enqueue(keys)")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, dict) or "keys" not in outputs:
            raise ValueError("QueueUpdate needs training_step to return a dict with 'keys' (N x D normalized keys)")
        pl_module.enqueue(gather_no_grad(outputs["keys"]))
