"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent")."""

from __future__ import annotations

import torch
from torch import nn

from lightning_ssl.callbacks import EMAUpdate
from lightning_ssl.ema import ema_copy
from lightning_ssl.heads import mlp
from lightning_ssl.losses import byol_loss
from lightning_ssl.methods.base import SSLMethod

__all__ = ["BYOL"]


class BYOL(SSLMethod):
    """BYOL: an online network with a predictor regresses a slow-moving target network; no negatives.

    Paper defaults (sec. 3.3): projector ``[D, 4096, 256]`` and predictor ``[256, 4096, 256]`` (BN,
    ReLU), target EMA with tau from 0.996 to 1 on a cosine over all optimizer steps, symmetric loss
    ``(2 - 2 cos(p1, z2')) + (2 - 2 cos(p2, z1'))``, LARS lr 0.2 x batch / 256, weight decay 1.5e-6,
    10 warmup epochs then cosine decay.

    Args (the shared ones are ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: projector widths (the predictor uses the same).
        ema_tau, ema_tau_final: the target's EMA rate at the first and the last step (cosine between).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        ema_tau: float = 0.996,
        ema_tau_final: float = 1.0,
        optimizer: str = "lars",
        base_lr: float = 0.2,
        weight_decay: float = 1.5e-6,
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
        if not 0.0 <= ema_tau <= ema_tau_final <= 1.0:
            raise ValueError(f"need 0 <= ema_tau <= ema_tau_final <= 1, got {ema_tau} and {ema_tau_final}")
        self.ema_tau, self.ema_tau_final = ema_tau, ema_tau_final
        self.projector = mlp([self.feature_dim, projection_hidden_dim, projection_dim])
        self.predictor = mlp([projection_dim, projection_hidden_dim, projection_dim])
        self.backbone_ema = ema_copy(self.backbone)
        self.projector_ema = ema_copy(self.projector)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_ema), (self.projector, self.projector_ema)]

    def configure_callbacks(self):
        return [*super().configure_callbacks(), EMAUpdate(tau=self.ema_tau, tau_final=self.ema_tau_final)]

    def training_step(self, batch, batch_idx):
        views, _ = batch
        pair = [views[0], views[1]]
        p1, p2 = self.forward_views(lambda x: self.predictor(self.projector(self.backbone(x))), pair)
        with torch.no_grad():
            z1, z2 = self.forward_views(lambda x: self.projector_ema(self.backbone_ema(x)), pair)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return loss
