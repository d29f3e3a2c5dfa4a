"""MoCo v1 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning") and
MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ssl.callbacks import EMAUpdate, QueueUpdate
from lightning_ssl.distributed import batch_shuffle, batch_unshuffle, split_shuffle, world_size
from lightning_ssl.ema import ema_copy
from lightning_ssl.heads import mlp
from lightning_ssl.losses import moco_info_nce
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.queue import check_queue_size, enqueue_
from lightning_ssl.split_batch_norm import convert_split_batch_norm, split_batch_norms

__all__ = ["MoCo", "MoCoV2"]


class MoCo(SSLMethod):
    """MoCo: a query encoder, an EMA key encoder and a queue of K negative keys.

    v1 defaults (He et al. 2020, sec. 3.3 and 4.1): linear 128-d head, T = 0.07, m = 0.999,
    K = 65536, SGD lr 0.03 x batch / 256 (momentum 0.9, weight decay 1e-4 on every parameter, biases
    and batch norm included, as the reference ``main_moco.py`` does), x0.1 at epochs 120 and 160 of 200.
    ``MoCoV2`` changes only the defaults that v2 changed.

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
            come from its own query's sub-batch. In one process, see ``split_bn_groups``. The
            alternative is ``shuffle_bn=False`` with ``Trainer(sync_batchnorm=True)`` (global BN
            statistics; no protection in one process).
        split_bn_groups: in a one-process run with ``shuffle_bn``, the number of devices simulated, as
            in the authors' CIFAR-10 demo (8): the batch norm of both encoders normalizes
            ``split_bn_groups`` sub-batches separately (``SplitBatchNorm``) and the keys are shuffled
            in the batch so that every key lands in another sub-batch than its query
            (``split_shuffle``). The batch size must be a multiple of it. ``1``: plain batch norm
            (the earlier behavior). Unused with several processes (the cross-process shuffle applies).
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
        split_bn_groups: int = 8,
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
        if split_bn_groups < 1:
            raise ValueError(f"split_bn_groups must be >= 1, got {split_bn_groups}")
        self.shuffle_bn = shuffle_bn
        self.split_bn_groups = split_bn_groups if shuffle_bn else 1
        if self.split_bn_groups > 1:  # before ema_copy: the key encoder gets the same layers
            convert_split_batch_norm(self.backbone)
        if projection_hidden_dim is None:
            self.projector = mlp([self.feature_dim, projection_dim])
        else:
            self.projector = mlp([self.feature_dim, projection_hidden_dim, projection_dim], batch_norm=False)
        self.backbone_ema = ema_copy(self.backbone)
        self.projector_ema = ema_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """One group: the reference (``main_moco.py``) decays every parameter, biases and BN included."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay, "lars_exclude": False}]

    # contracts with the callbacks -------------------------------------------------------
    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_ema), (self.projector, self.projector_ema)]

    def enqueue(self, keys: torch.Tensor) -> None:
        enqueue_(self.queue, self.queue_ptr, keys)

    def configure_callbacks(self):
        return [*super().configure_callbacks(), EMAUpdate(tau=self.ema_tau, tau_final=self.ema_tau), QueueUpdate()]

    def on_train_start(self) -> None:
        super().on_train_start()
        batch = self.global_batch_size()
        check_queue_size("MoCo", self.queue.shape[0], batch)
        local = batch // (self.trainer.world_size * self.trainer.accumulate_grad_batches)
        if self.shuffle_bn and self.trainer.world_size == 1 and local % self.split_bn_groups != 0:
            raise ValueError(
                f"MoCo split_bn_groups={self.split_bn_groups} needs a batch size that it divides, got {local}: "
                "use a multiple of it, or split_bn_groups=1 (plain batch norm, no shuffling in one process)"
            )

    # training ------------------------------------------------------------------------------
    def _set_split_bn(self, groups: int) -> None:
        for layer in split_batch_norms(self.backbone) + split_batch_norms(self.backbone_ema):
            layer.num_splits = groups

    def _keys(self, x_k: torch.Tensor) -> torch.Tensor:
        encode = lambda x: F.normalize(self.projector_ema(self.backbone_ema(x)), dim=1)  # noqa: E731
        if not self.shuffle_bn:
            return encode(x_k)
        if world_size() > 1 or self.split_bn_groups == 1:
            x_k, unshuffle_idx = batch_shuffle(x_k)
            return batch_unshuffle(encode(x_k), unshuffle_idx)
        perm = split_shuffle(x_k.shape[0], self.split_bn_groups, x_k.device)
        return encode(x_k[perm])[torch.argsort(perm)]

    def training_step(self, batch, batch_idx):
        views, _ = batch
        x_q, x_k = views[0], views[1]
        # split batch norm only inside the step, and only in one process (several: the real shuffle)
        self._set_split_bn(self.split_bn_groups if self.shuffle_bn and world_size() == 1 else 1)
        try:
            q = self.projector(self.backbone(x_q))  # N x dim
            with torch.no_grad():
                k = self._keys(x_k)  # N x dim
        finally:
            self._set_split_bn(1)
        loss = moco_info_nce(q, k, self.queue, self.temperature)  # logits N x (1+K)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return {"loss": loss, "keys": k}


class MoCoV2(MoCo):
    """MoCo v2 (Chen et al. 2020, sec. 3): MoCo with an MLP head ``[D, 2048, 128]`` (no BN), T = 0.2
    and a cosine schedule (and blur in the augmentation, chosen by the datamodule's ``moco_v2``
    preset). Every other argument and default is ``MoCo``'s.

    The hidden width: the paper says 2048 (with ResNet-50, whose width is 2048); the reference code
    takes the backbone's width (``dim_mlp = fc.weight.shape[1]``: 512 for ResNet-18). We keep the
    paper's 2048 whatever the backbone (also solo-learn's CIFAR choice); pass
    ``projection_hidden_dim=512`` for the reference's ResNet-18 head."""

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
