"""A callback for CLI runs under test: each rank's loss at every step and its final weights."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


class StepRecorder(pl.Callback):
    """Writes ``<path>/rank<r>.pt``: ``{"losses": [...], "state": state_dict, "global_step": n}``."""

    def __init__(self, path: str):
        self.path = path
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        report = {"losses": self.losses, "state": state, "global_step": trainer.global_step}
        torch.save(report, Path(self.path) / f"rank{trainer.global_rank}.pt")
