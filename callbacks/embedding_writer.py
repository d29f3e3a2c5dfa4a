"""Write the embeddings of ``predict`` to a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from tqdm.auto import tqdm

__all__ = ["EmbeddingWriter"]


class EmbeddingWriter(BasePredictionWriter):
    """Saves ``{"features": N x D, "labels": N}`` from the predictions of an ``SSLMethod`` (its
    ``predict_step``) to ``path`` with ``torch.save`` (default ``<default_root_dir>/embeddings.pt``). In a
    multi-process run each process writes its share to ``<stem>-rank<r>.pt`` with the dataset indices of
    its rows. Methods attach it to ``predict`` unless the trainer has one."""

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="epoch")
        self.path = path

    def output_path(self, trainer: pl.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.default_root_dir) / "embeddings.pt"

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        if predictions and isinstance(predictions[0], list):  # one list per dataloader: the first
            predictions, batch_indices = predictions[0], batch_indices[0] if batch_indices else None
        features = torch.cat([p["features"] for p in predictions])
        labels = [p["labels"] for p in predictions]
        out = {"features": features, "labels": torch.cat(labels) if all(x is not None for x in labels) else None}
        path = self.output_path(trainer)
        if trainer.world_size > 1:
            out["indices"] = torch.tensor([i for batch in batch_indices or [] for i in batch])
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
        if trainer.is_global_zero:
            where = str(path.resolve())
            if trainer.world_size > 1:
                shards = path.resolve().parent / f"{path.stem}-rank*{path.suffix}"
                where = f"{shards} (one file per process, with 'indices')"
            # tqdm.write: on its own line above a live progress bar
            tqdm.write(
                f"Embeddings: {len(features)} x {features.shape[1]} {{'features', 'labels'}} written to {where} "
                "(torch.load)"
            )
