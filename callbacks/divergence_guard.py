"""Stop (or skip) on a non-finite loss instead of training on silently."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["DivergenceGuard", "DivergenceError"]


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss (or gradient)."""


class DivergenceGuard(pl.Callback):
    """Watches the training loss for NaN/inf.

    Default (``max_skipped_steps=0``): training stops with ``DivergenceError`` naming the first bad
    step, the method and the likely causes. The check reads a flag kept on the device every
    ``check_every_n_steps`` optimizer steps (default: the trainer's ``log_every_n_steps``, when the
    logger synchronizes anyway) and before every checkpoint, so it adds no host synchronization per
    step and a checkpoint is never written after a bad step: the last good one stays intact.

    ``max_skipped_steps=N > 0``: a step whose gradients are not finite is skipped instead (its
    gradients are dropped before the optimizer step, which then changes no parameter or optimizer
    state), up to N times in a run; the N+1-th stops training. Deciding per step costs one host
    synchronization per step. Methods attach a default guard unless the trainer has one.
    """

    def __init__(self, check_every_n_steps: int | None = None, max_skipped_steps: int = 0):
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1 (or None), got {check_every_n_steps}")
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.check_every_n_steps, self.max_skipped_steps = check_every_n_steps, max_skipped_steps
        self.skipped: list[int] = []  # global steps whose update was skipped
        self._first_bad: torch.Tensor | None = None  # on the device: first step with a non-finite loss, or -1

    # ------------------------------------------------------------------ stop mode
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or self.max_skipped_steps > 0:  # skip mode decides per step
            return
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()).all() & (self._first_bad < 0)
        self._first_bad = torch.where(bad, trainer.global_step, self._first_bad)
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every == 0:
            self.check(trainer, pl_module)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise ``DivergenceError`` if a non-finite loss was seen (one host synchronization)."""
        if self._first_bad is None:
            return
        first = int(self._first_bad)
        if first >= 0:
            raise DivergenceError(self.message(first, pl_module))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.check(trainer, pl_module)  # raising here writes no checkpoint: the last good one stays

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer, pl_module)

    @staticmethod
    def message(step: int, pl_module: pl.LightningModule) -> str:
        hp = getattr(pl_module, "hparams", {})
        lr = hp.get("lr") if hp.get("lr") is not None else hp.get("base_lr")
        return (
            f"{type(pl_module).__name__}: the training loss became NaN or inf at optimizer step {step}; training "
            "stopped and no checkpoint was written after it. Likely causes: a learning rate too high "
            f"(lr/base_lr = {lr}), "
            "16-bit precision overflowing (try precision=bf16-mixed or 32-true), a temperature too low, or bad input "
            "data. Resume from the last checkpoint with a smaller learning rate, or pass "
            "DivergenceGuard(max_skipped_steps=N) to skip up to N bad steps."
        )

    # ------------------------------------------------------------------ skip mode
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.max_skipped_steps == 0:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return
        self.skipped.append(trainer.global_step)
        if len(self.skipped) > self.max_skipped_steps:
            raise DivergenceError(
                f"{type(pl_module).__name__}: more than max_skipped_steps={self.max_skipped_steps} steps had "
                f"non-finite gradients (steps {self.skipped}); training stopped. "
                + self.message(self.skipped[0], pl_module)
            )
        for group in optimizer.param_groups:  # no gradient: the optimizer leaves parameters and state as they are
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = list(state_dict.get("skipped", []))
