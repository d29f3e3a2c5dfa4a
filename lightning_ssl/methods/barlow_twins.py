"""Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction")."""

from __future__ import annotations

from torch import nn

from lightning_ssl.heads import mlp
from lightning_ssl.losses import barlow_twins_loss
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.optim import split_weight_decay

__all__ = ["BarlowTwins"]


class BarlowTwins(SSLMethod):
    """Barlow Twins: the cross-correlation of two views' batch-standardized embeddings is pushed to identity.

    Paper defaults (sec. 2 and 4, "Implementation details"): projector ``[D, 8192, 8192, 8192]`` (BN and ReLU
    after the hidden layers, no bias in the last, as the reference code), loss ``sum_i (1 - C_ii)^2 + lambda
    sum_{i != j} C_ij^2`` with lambda 5e-3 (eq. 1-2), LARS with lr 0.2 x batch / 256 for the weights and
    0.0048 x batch / 256 for the biases and BN parameters (which get neither weight decay nor LARS
    adaptation), weight decay 1.5e-6, 10 warmup epochs then cosine decay, batch 2048, 1000 epochs.

    The loss is not scaled (``loss_scale=1``, as the reference code today, whose learning rates above go
    with the unscaled loss; its first release multiplied the loss by 0.024 and used lambda 0.0051). In a
    distributed run the cross-correlation is summed over processes, so it equals the one-process value
    on the global batch.

    Args (the shared ones are ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: projector widths.
        lambd: the weight of the redundancy-reduction (off-diagonal) term.
        loss_scale: a factor on the whole loss.
        bias_lr_scale: the lr of biases and norm parameters relative to the weights'. Default: 0.0048 / 0.2
            with LARS (the reference's pair, where only the weights get LARS's trust ratio), 1 with any
            other optimizer (without LARS adaptation the weights' lr is not the small effective lr that
            0.0048 was set against, and 0.024 x lr would all but freeze the batch-norm parameters).
    """

    zero_init_residual = (
        True  # the reference ``main.py`` builds ``torchvision.models.resnet50(zero_init_residual=True)``
    )

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        projection_hidden_dim: int = 8192,
        projection_dim: int = 8192,
        lambd: float = 5e-3,
        loss_scale: float = 1.0,
        bias_lr_scale: float | None = None,
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
        if bias_lr_scale is None:
            bias_lr_scale = 0.024 if optimizer == "lars" else 1.0
        if lambd < 0 or loss_scale <= 0 or bias_lr_scale < 0:
            raise ValueError(
                f"need lambd >= 0, loss_scale > 0 and bias_lr_scale >= 0; got {lambd}, {loss_scale}, {bias_lr_scale}"
            )
        self.lambd, self.loss_scale, self.bias_lr_scale = lambd, loss_scale, bias_lr_scale
        dims = [self.feature_dim, projection_hidden_dim, projection_hidden_dim, projection_dim]
        self.projector = mlp(dims, last_bias=False)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Weights with decay and LARS at the lr; biases and norm parameters without, at ``bias_lr_scale`` x lr."""
        weights, others = split_weight_decay([self], weight_decay)
        return [weights, {**others, "lr_scale": self.bias_lr_scale}]

    def training_step(self, batch, batch_idx):
        views, _ = batch
        z1, z2 = self.forward_views(lambda x: self.projector(self.backbone(x)), [views[0], views[1]])
        loss = barlow_twins_loss(z1, z2, self.lambd, self.loss_scale)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return loss
