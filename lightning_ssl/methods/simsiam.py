"""SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning")."""

from __future__ import annotations

from torch import nn

from lightning_ssl.heads import mlp
from lightning_ssl.losses import simsiam_loss
from lightning_ssl.methods.base import SSLMethod

__all__ = ["SimSiam"]


class SimSiam(SSLMethod):
    """SimSiam: a predictor on one branch, stop-gradient on the other, no negatives and no EMA.

    Paper defaults (sec. 4 and appendix A, ImageNet): projector of 3 layers ``[D, 2048, 2048, 2048]``
    with BN after every layer (the output BN without affine parameters, as in the reference code),
    predictor ``[2048, 512, 2048]`` (BN and ReLU in the hidden layer), loss
    ``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with ``D`` the negative cosine (eq. 1-4), SGD lr
    0.05 x batch / 256, momentum 0.9, weight decay 1e-4 on every parameter (the reference code's
    choice, biases and BN included), cosine decay with no warmup, and the predictor's lr fixed at the
    peak lr (not decayed, sec. 4.2 and the code's ``--fix-pred-lr``). CIFAR-10 (appendix D): the
    CIFAR ResNet-18, a 2-layer projector, lr 0.03 x batch / 256, weight decay 5e-4, 800 epochs.

    Args (the shared ones are ``SSLMethod``'s):
        projection_dim, projection_hidden_dim: projector widths (output and hidden).
        projection_layers: linear layers of the projector (3 on ImageNet, 2 on CIFAR-10).
        prediction_hidden_dim: the predictor's bottleneck width.
        fix_predictor_lr: keep the predictor at the peak lr (no warmup or decay).
    """

    zero_init_residual = (
        True  # the reference ``main_simsiam.py`` builds ``models.__dict__[arch](zero_init_residual=True)``
    )

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        projection_dim: int = 2048,
        projection_hidden_dim: int = 2048,
        projection_layers: int = 3,
        prediction_hidden_dim: int = 512,
        fix_predictor_lr: bool = True,
        optimizer: str = "sgd",
        base_lr: float = 0.05,
        weight_decay: float = 1e-4,
        **kwargs,
    ):
        super().__init__(backbone, optimizer=optimizer, base_lr=base_lr, weight_decay=weight_decay, **kwargs)
        if projection_layers < 1:
            raise ValueError(f"projection_layers must be at least 1, got {projection_layers}")
        self.fix_predictor_lr = fix_predictor_lr
        widths = [self.feature_dim, *[projection_hidden_dim] * (projection_layers - 1), projection_dim]
        self.projector = mlp(widths, last_batch_norm=True)
        self.predictor = mlp([projection_dim, prediction_hidden_dim, projection_dim])

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on every parameter (the reference code); the predictor in its own group with
        ``fixed_lr`` when ``fix_predictor_lr``."""
        predictor = {id(p) for p in self.predictor.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in predictor]
        head = [p for p in self.predictor.parameters() if p.requires_grad]
        return [
            {"params": rest, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": head, "weight_decay": weight_decay, "lars_exclude": False, "fixed_lr": self.fix_predictor_lr},
        ]

    def training_step(self, batch, batch_idx):
        views, _ = batch
        z1, z2 = self.forward_views(lambda x: self.projector(self.backbone(x)), [views[0], views[1]])
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return loss
