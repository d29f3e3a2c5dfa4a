"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent")."""
from __future__ import annotations

import torch
from torch import nn

from lightning_ssl.heads import mlp
from lightning_ssl.losses import byol_loss
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.momentum import make_target

__all__ = ["BYOL"]


class BYOL(SSLMethod):
    """BYOL: an online network with a predictor regresses a slow-moving target network; no negatives.

    Paper defaults: projector ``[D, 4096, 256]`` and predictor ``[256, 4096, 256]`` (BN, ReLU),
    target EMA with tau from 0.996 to 1 on a cosine over all optimizer steps, symmetric loss
    ``(2 - 2 cos(p1, z2')) + (2 - 2 cos(p2, z1'))``, LARS lr 0.2 x batch / 256, weight decay 1.5e-6,
    10 warmup epochs then cosine decay.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        small_image: bool = False,
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        tau_base: float = 0.996,
        tau_final: float = 1.0,
        optimizer: str = "lars",
        base_lr: float = 0.2,
        lr: float | None = None,
        weight_decay: float = 1.5e-6,
        momentum: float = 0.9,
        warmup_epochs: float = 10,
        schedule: str = "cosine",
        channels_last: bool = False,
        compile_backbone: bool = False,
        fused_optimizer: bool = False,
    ):
        super().__init__(
            backbone, small_image, optimizer, base_lr, lr, weight_decay, momentum, warmup_epochs, schedule,
            channels_last=channels_last, compile_backbone=compile_backbone, fused_optimizer=fused_optimizer,
        )
        if not 0.0 <= tau_base <= tau_final <= 1.0:
            raise ValueError(f"need 0 <= tau_base <= tau_final <= 1, got {tau_base} and {tau_final}")
        self.tau_base, self.tau_final = tau_base, tau_final
        self.projector = mlp([self.feature_dim, projection_hidden_dim, projection_dim])
        self.predictor = mlp([projection_dim, projection_hidden_dim, projection_dim])
        self.backbone_target = make_target(self.backbone)
        self.projector_target = make_target(self.projector)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_target), (self.projector, self.projector_target)]

    def configure_callbacks(self):
        from callbacks import MomentumUpdate

        return [MomentumUpdate(tau_base=self.tau_base, tau_final=self.tau_final)]

    def training_step(self, batch, batch_idx):
        views, _ = batch
        x1, x2 = views[0], views[1]
        p1 = self.predictor(self.projector(self.backbone(x1)))
        p2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            z1 = self.projector_target(self.backbone_target(x1))
            z2 = self.projector_target(self.backbone_target(x2))
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return loss
