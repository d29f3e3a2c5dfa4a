"""Exponential moving average of target networks (MoCo's key encoder, BYOL's target)."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lightning_ssl.momentum import cosine_tau, ema_update_

__all__ = ["MomentumUpdate"]


class MomentumUpdate(pl.Callback):
    """After every optimizer step, ``target <- tau * target + (1 - tau) * online`` for each pair of
    ``pl_module.momentum_pairs()``.

    ``tau`` follows BYOL's cosine from ``tau_base`` to ``tau_final`` over
    ``trainer.estimated_stepping_batches`` optimizer steps, evaluated at ``trainer.global_step``
    (the number of optimizer steps taken, after the step); ``tau_base == tau_final`` gives MoCo's
    constant momentum. The update runs only when ``global_step`` advanced, so gradient-accumulation
    micro-batches do not count. Everything is derived from the trainer's step, which checkpoints
    restore, so a resumed run continues the exact schedule.
    """

    def __init__(self, tau_base: float = 0.996, tau_final: float = 1.0):
        if not 0.0 <= tau_base <= tau_final <= 1.0:
            raise ValueError(f"need 0 <= tau_base <= tau_final <= 1, got {tau_base} and {tau_final}")
        self.tau_base, self.tau_final = tau_base, tau_final
        self._last_step: int | None = None

    def tau(self, step: int, total_steps: int) -> float:
        return cosine_tau(step, total_steps, self.tau_base, self.tau_final)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not callable(getattr(pl_module, "momentum_pairs", None)):
            raise TypeError(
                f"MomentumUpdate needs {type(pl_module).__name__}.momentum_pairs() returning (online, target) pairs"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step on this micro-batch
            return
        self._last_step = step
        tau = self.tau(step, int(trainer.estimated_stepping_batches))
        ema_update_(pl_module.momentum_pairs(), tau)
        pl_module.log("train/tau", tau)
