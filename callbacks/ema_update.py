"""Exponential moving average of EMA targets (MoCo's key encoder, BYOL's target network)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lightning_ssl.contracts import HasEMATargets, require
from lightning_ssl.ema import EMA_SCHEDULES, cosine_tau, ema_update_, linear_ema_tau

__all__ = ["EMAUpdate"]


class EMAUpdate(pl.Callback):
    """After every optimizer step, ``target <- tau * target + (1 - tau) * online`` for each pair of
    ``pl_module.ema_pairs()``.

    ``tau`` follows BYOL's cosine from ``tau`` to ``tau_final`` over
    ``trainer.estimated_stepping_batches`` optimizer steps, evaluated at ``trainer.global_step``
    (the number of optimizer steps taken, after the step); ``tau == tau_final`` gives MoCo's
    constant momentum; ``schedule="linear"`` is I-JEPA's linear increase (``ema.linear_ema_tau``). The
    update runs only when ``global_step`` advanced, so gradient-accumulation
    micro-batches do not count. Everything is derived from the trainer's step, which checkpoints
    restore, so a resumed run continues the exact schedule. Logs ``train/ema_tau``.
    """

    def __init__(self, tau: float = 0.996, tau_final: float = 1.0, schedule: str = "cosine"):
        if not 0.0 <= tau <= tau_final <= 1.0:
            raise ValueError(f"need 0 <= tau <= tau_final <= 1, got {tau} and {tau_final}")
        if schedule not in EMA_SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(EMA_SCHEDULES)}; got {schedule!r}")
        self.tau, self.tau_final, self.schedule = tau, tau_final, schedule
        self._last_step: int | None = None

    def tau_at(self, step: int, total_steps: int) -> float:
        """tau after ``step`` of ``total_steps`` optimizer steps."""
        schedule = linear_ema_tau if self.schedule == "linear" else cosine_tau
        return schedule(step, total_steps, self.tau, self.tau_final)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require(pl_module, HasEMATargets, "EMAUpdate", "a module with ema_pairs() returning (online, target) pairs")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step on this micro-batch
            return
        self._last_step = step
        tau = self.tau_at(step, int(trainer.estimated_stepping_batches))
        ema_update_(pl_module.ema_pairs(), tau)
        pl_module.log("train/ema_tau", tau)
