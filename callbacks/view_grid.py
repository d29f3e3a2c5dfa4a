"""Log a picture of the augmented views at the start of training."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lightning_ssl.visualize import log_image, view_pairs_grid

__all__ = ["ViewGridLogger"]


class ViewGridLogger(pl.Callback):
    """After the first training batch, logs ``media/views``: its first ``n`` images, each row the views of
    one image side by side, de-normalized with the datamodule's ``mean``/``std`` when it has them (else
    stretched to [0, 1]). Goes to W&B, TensorBoard, or ``<log_dir>/images/`` (see
    ``lightning_ssl.visualize.log_image``). Methods attach it unless the trainer has one; it does nothing
    without a logger."""

    def __init__(self, n: int = 8):
        self.n = n
        self.done = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.done or not trainer.loggers:
            return
        self.done = True
        views = batch[0] if isinstance(batch, (tuple, list)) else None
        if not isinstance(views, (tuple, list)) or not views or getattr(views[0], "ndim", 0) != 4:
            return  # not image views (e.g. waveforms): nothing to picture
        dm = trainer.datamodule
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
        log_image(trainer, "media/views", view_pairs_grid(views, mean, std, n=self.n))

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
