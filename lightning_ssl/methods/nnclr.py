"""NNCLR (Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning
of Visual Representations")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ssl.callbacks import QueueUpdate
from lightning_ssl.heads import mlp
from lightning_ssl.losses import nnclr_loss
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.queue import check_queue_size, enqueue_, nearest_neighbours

__all__ = ["NNCLR"]


class NNCLR(SSLMethod):
    """NNCLR: each embedding is replaced by its nearest neighbour in a support set of past embeddings,
    which must pick the prediction of the other view among the batch's predictions (NT-Xent).

    Paper defaults (sec. 3 and 4.1): projector ``[D, 2048, 2048, 256]`` with BN after every layer,
    predictor ``[256, 4096, 256]``, support set of 98,304 normalized embeddings (a FIFO queue of the
    first view's embeddings), temperature 0.1, symmetric loss
    ``(L(NN(z1), p2) + L(NN(z2), p1)) / 2`` (eq. 2), LARS with lr 0.3 x batch / 256, weight decay 1e-6,
    10 warmup epochs then cosine decay, batch 4096, 1000 epochs.

    The support set (``K x dim``) and its pointer are buffers, so checkpoints hold them; ``QueueUpdate``
    enqueues each step's embeddings gathered over processes (as MoCo's keys), so every process holds
    the same support set. It starts as random unit vectors. K must be a multiple of the global batch.

    Args (the shared ones are ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: projector widths.
        prediction_hidden_dim: the predictor's hidden width.
        queue_size: K, the size of the support set.
        temperature: tau of the loss.
        gather_distributed: take negatives (the other view's predictions) from every process.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        projection_hidden_dim: int = 2048,
        projection_dim: int = 256,
        prediction_hidden_dim: int = 4096,
        queue_size: int = 98304,
        temperature: float = 0.1,
        gather_distributed: bool = True,
        optimizer: str = "lars",
        base_lr: float = 0.3,
        weight_decay: float = 1e-6,
        warmup_epochs: float = 10,
        **kwargs,
    ):
        super().__init__(
            backbone,
            optimizer=optimizer,
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            **kwargs,
        )
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        dims = [self.feature_dim, projection_hidden_dim, projection_hidden_dim, projection_dim]
        self.projector = mlp(dims, last_batch_norm=True)
        self.predictor = mlp([projection_dim, prediction_hidden_dim, projection_dim])
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # contract with QueueUpdate ------------------------------------------------------------
    def enqueue(self, keys: torch.Tensor) -> None:
        enqueue_(self.queue, self.queue_ptr, keys)

    def configure_callbacks(self):
        return [*super().configure_callbacks(), QueueUpdate()]

    def on_train_start(self) -> None:
        super().on_train_start()
        check_queue_size("NNCLR", self.queue.shape[0], self.global_batch_size())

    # training -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        views, _ = batch
        z1, z2 = self.forward_views(lambda x: self.projector(self.backbone(x)), [views[0], views[1]])
        p1, p2 = self.forward_views(self.predictor, [z1, z2])
        nn1, nn2 = nearest_neighbours(z1, self.queue), nearest_neighbours(z2, self.queue)
        g = self.gather_distributed
        loss = 0.5 * (nnclr_loss(nn1, p2, self.temperature, g) + nnclr_loss(nn2, p1, self.temperature, g))
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return {"loss": loss, "keys": F.normalize(z1.detach().to(self.queue.dtype), dim=1)}
