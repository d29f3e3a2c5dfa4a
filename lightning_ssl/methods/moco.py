"""MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning") and
MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ssl.distributed import batch_shuffle, batch_unshuffle
from lightning_ssl.heads import mlp
from lightning_ssl.losses import moco_info_nce
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.momentum import make_target
from lightning_ssl.queue import enqueue_

__all__ = ["MoCo", "MoCoV2"]

_VERSION_DEFAULTS = {1: {"temperature": 0.07, "schedule": "step"}, 2: {"temperature": 0.2, "schedule": "cosine"}}


class MoCo(SSLMethod):
    """MoCo: a query encoder, a momentum key encoder and a queue of K negative keys.

    v1 defaults: linear 128-d head, T = 0.07, m = 0.999, K = 65536, SGD lr 0.03 x batch / 256
    (momentum 0.9, weight decay 1e-4), x0.1 at epochs 120 and 160 of 200.
    v2 (``version=2`` or ``MoCoV2``): MLP head ``[D, 2048, 128]``, T = 0.2, cosine schedule
    (and blur in the augmentation, chosen by the datamodule).

    The queue (``K x dim``, normalised keys) and its pointer are buffers, so checkpoints hold them;
    ``callbacks.QueueUpdate`` enqueues each step's keys (gathered over processes) after the step.
    K must be a multiple of the global batch size.

    ``shuffle_bn`` (default on, as in the paper, sec. 3.3): in a multi-process run the key batch is
    shuffled across processes before the key encoder and unshuffled after, so BN statistics of a
    key never come from its own query's sub-batch (a no-op in one process). The alternative is
    ``shuffle_bn=False`` with ``Trainer(sync_batchnorm=True)`` (global BN statistics, as in SimCLR).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        small_image: bool = False,
        version: int = 1,
        projection_dim: int = 128,
        projection_hidden_dim: int = 2048,
        temperature: float | None = None,
        momentum_tau: float = 0.999,
        queue_size: int = 65536,
        optimizer: str = "sgd",
        base_lr: float = 0.03,
        lr: float | None = None,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0,
        schedule: str | None = None,
        shuffle_bn: bool = True,
        channels_last: bool = False,
        compile_backbone: bool = False,
        fused_optimizer: bool = False,
    ):
        if version not in _VERSION_DEFAULTS:
            raise ValueError(f"MoCo version must be 1 or 2, got {version}")
        defaults = _VERSION_DEFAULTS[version]
        schedule = schedule or defaults["schedule"]
        super().__init__(
            backbone, small_image, optimizer, base_lr, lr, weight_decay, momentum, warmup_epochs, schedule,
            channels_last=channels_last, compile_backbone=compile_backbone, fused_optimizer=fused_optimizer,
        )
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        if not 0.0 <= momentum_tau <= 1.0:
            raise ValueError(f"momentum_tau must lie in [0, 1], got {momentum_tau}")
        self.version = version
        self.temperature = temperature if temperature is not None else defaults["temperature"]
        # LightningCLI hands save_hyperparameters the config's raw values (None): store the resolved ones.
        self.hparams.update(schedule=schedule, temperature=self.temperature)
        self.momentum_tau = momentum_tau
        self.shuffle_bn = shuffle_bn
        if version == 1:
            self.projector = mlp([self.feature_dim, projection_dim])
        else:
            self.projector = mlp([self.feature_dim, projection_hidden_dim, projection_dim], batch_norm=False)
        self.backbone_momentum = make_target(self.backbone)
        self.projector_momentum = make_target(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # contracts with the callbacks -------------------------------------------------------
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_momentum), (self.projector, self.projector_momentum)]

    def enqueue(self, keys: torch.Tensor) -> None:
        enqueue_(self.queue, self.queue_ptr, keys)

    def configure_callbacks(self):
        from callbacks import MomentumUpdate, QueueUpdate

        return [MomentumUpdate(tau_base=self.momentum_tau, tau_final=self.momentum_tau), QueueUpdate()]

    def on_train_start(self) -> None:
        batch = self.global_batch_size()
        if self.queue.shape[0] % batch != 0:
            raise ValueError(
                f"MoCo queue_size={self.queue.shape[0]} is not a multiple of the global batch size {batch} "
                "(batch x processes x accumulation). Choose a queue_size that the global batch divides, "
                f"e.g. {max(batch, self.queue.shape[0] // batch * batch)}."
            )

    # training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        views, _ = batch
        x_q, x_k = views[0], views[1]
        q = self.projector(self.backbone(x_q))  # N x dim
        with torch.no_grad():
            if self.shuffle_bn:
                x_k, unshuffle_idx = batch_shuffle(x_k)
            k = F.normalize(self.projector_momentum(self.backbone_momentum(x_k)), dim=1)  # N x dim
            if self.shuffle_bn:
                k = batch_unshuffle(k, unshuffle_idx)
        loss = moco_info_nce(q, k, self.queue, self.temperature)  # logits N x (1+K)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return {"loss": loss, "keys": k}


class MoCoV2(MoCo):
    """MoCo v2: ``MoCo(version=2)`` with an MLP head, T = 0.2 and a cosine schedule."""

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        small_image: bool = False,
        projection_dim: int = 128,
        projection_hidden_dim: int = 2048,
        temperature: float | None = None,
        momentum_tau: float = 0.999,
        queue_size: int = 65536,
        optimizer: str = "sgd",
        base_lr: float = 0.03,
        lr: float | None = None,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0,
        schedule: str | None = None,
        shuffle_bn: bool = True,
        channels_last: bool = False,
        compile_backbone: bool = False,
        fused_optimizer: bool = False,
    ):
        super().__init__(
            backbone, small_image, 2, projection_dim, projection_hidden_dim, temperature, momentum_tau,
            queue_size, optimizer, base_lr, lr, weight_decay, momentum, warmup_epochs, schedule, shuffle_bn,
            channels_last=channels_last, compile_backbone=compile_backbone, fused_optimizer=fused_optimizer,
        )
