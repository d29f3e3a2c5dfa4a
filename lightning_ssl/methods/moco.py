"""MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning") and
MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ssl.callbacks import EMAUpdate, QueueUpdate
from lightning_ssl.distributed import batch_shuffle, batch_unshuffle
from lightning_ssl.ema import ema_copy
from lightning_ssl.heads import mlp
from lightning_ssl.losses import moco_info_nce
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.queue import check_queue_size, enqueue_

__all__ = ["MoCo", "MoCoV2"]


class MoCo(SSLMethod):
    """MoCo: a query encoder, an EMA key encoder and a queue of K negative keys.

    v1 defaults (He et al. 2020, sec. 3.3 and 4.1): linear 128-d head, T = 0.07, m = 0.999,
    K = 65536, SGD lr 0.03 x batch / 256 (momentum 0.9, weight decay 1e-4), x0.1 at epochs 120
    and 160 of 200. ``MoCoV2`` changes only the defaults that v2 changed.

    The queue (``K x dim``, normalized keys) and its pointer are buffers, so checkpoints hold them;
    ``QueueUpdate`` enqueues each step's keys (gathered over processes) after the step, and
    ``EMAUpdate`` moves the key encoder. K must be a multiple of the global batch size.

    Args (the shared ones are ``SSLMethod``'s):
        projection_dim: width of the keys and queries.
        projection_hidden_dim: ``None`` for v1's linear head; a width for v2's MLP head (no BN).
        temperature: tau of InfoNCE (eq. 1).
        ema_tau: the key encoder's momentum m (eq. 2), constant.
        queue_size: K.
        shuffle_bn: shuffling BN (sec. 3.3): in a multi-process run the key batch is shuffled across
            processes before the key encoder and unshuffled after, so BN statistics of a key never
            come from its own query's sub-batch (a no-op in one process). The alternative is
            ``shuffle_bn=False`` with ``Trainer(sync_batchnorm=True)`` (global BN statistics).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        projection_dim: int = 128,
        projection_hidden_dim: int | None = None,
        temperature: float = 0.07,
        ema_tau: float = 0.999,
        queue_size: int = 65536,
        shuffle_bn: bool = True,
        optimizer: str = "sgd",
        base_lr: float = 0.03,
        weight_decay: float = 1e-4,
        schedule: str = "step",
        **kwargs,
    ):
        super().__init__(
            backbone, optimizer=optimizer, base_lr=base_lr, weight_decay=weight_decay, schedule=schedule, **kwargs
        )
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        if not 0.0 <= ema_tau <= 1.0:
            raise ValueError(f"ema_tau must lie in [0, 1], got {ema_tau}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.ema_tau = ema_tau
        self.shuffle_bn = shuffle_bn
        if projection_hidden_dim is None:
            self.projector = mlp([self.feature_dim, projection_dim])
        else:
            self.projector = mlp([self.feature_dim, projection_hidden_dim, projection_dim], batch_norm=False)
        self.backbone_ema = ema_copy(self.backbone)
        self.projector_ema = ema_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # contracts with the callbacks -------------------------------------------------------
    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_ema), (self.projector, self.projector_ema)]

    def enqueue(self, keys: torch.Tensor) -> None:
        enqueue_(self.queue, self.queue_ptr, keys)

    def configure_callbacks(self):
        return [*super().configure_callbacks(), EMAUpdate(tau=self.ema_tau, tau_final=self.ema_tau), QueueUpdate()]

    def on_train_start(self) -> None:
        super().on_train_start()
        check_queue_size("MoCo", self.queue.shape[0], self.global_batch_size())

    # training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        views, _ = batch
        x_q, x_k = views[0], views[1]
        q = self.projector(self.backbone(x_q))  # N x dim
        with torch.no_grad():
            if self.shuffle_bn:
                x_k, unshuffle_idx = batch_shuffle(x_k)
            k = F.normalize(self.projector_ema(self.backbone_ema(x_k)), dim=1)  # N x dim
            if self.shuffle_bn:
                k = batch_unshuffle(k, unshuffle_idx)
        loss = moco_info_nce(q, k, self.queue, self.temperature)  # logits N x (1+K)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return {"loss": loss, "keys": k}


class MoCoV2(MoCo):
    """MoCo v2 (Chen et al. 2020, sec. 3): MoCo with an MLP head ``[D, 2048, 128]`` (no BN), T = 0.2
    and a cosine schedule (and blur in the augmentation, chosen by the datamodule's ``moco_v2``
    preset). Every other argument and default is ``MoCo``'s."""

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        projection_hidden_dim: int | None = 2048,
        temperature: float = 0.2,
        schedule: str = "cosine",
        **kwargs,
    ):
        super().__init__(
            backbone, projection_hidden_dim=projection_hidden_dim, temperature=temperature, schedule=schedule, **kwargs
        )
