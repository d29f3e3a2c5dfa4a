"""VICReg (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning")."""

from __future__ import annotations

from torch import nn

from lightning_ssl.heads import mlp
from lightning_ssl.losses import vicreg_loss
from lightning_ssl.methods.base import SSLMethod

__all__ = ["VICReg"]


class VICReg(SSLMethod):
    """VICReg: invariance between the two views' embeddings, a hinge on each dimension's standard
    deviation (variance) and decorrelation of the dimensions (covariance); no negatives, no EMA.

    Paper defaults (sec. 4.1 and appendix C): expander ``[D, 8192, 8192, 8192]`` (BN and ReLU after the
    hidden layers, no bias in the last, as the reference code), coefficients invariance 25,
    variance 25, covariance 1, std target 1, eps 1e-4
    (eq. 1-6, in the form of the reference code: see ``vicreg_loss``), LARS with base lr 0.2 x batch /
    256 and weight decay 1e-6 (biases and BN parameters without decay or LARS adaptation), 10 warmup
    epochs then cosine decay, batch 2048, 1000 epochs. In a distributed run the variance and covariance
    are computed over the global batch (the embeddings gathered with gradients).

    Args (the shared ones are ``SSLMethod``'s):
        expander_hidden_dim, expander_dim: expander widths.
        invariance, variance, covariance: the loss coefficients lambda, mu, nu.
        std_target, eps: gamma and epsilon of the variance term.
    """

    zero_init_residual = True  # reference resnet.py: built with zero_init_residual=True

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        expander_hidden_dim: int = 8192,
        expander_dim: int = 8192,
        invariance: float = 25.0,
        variance: float = 25.0,
        covariance: float = 1.0,
        std_target: float = 1.0,
        eps: float = 1e-4,
        optimizer: str = "lars",
        base_lr: float = 0.2,
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
        if min(invariance, variance, covariance) < 0 or eps <= 0:
            raise ValueError("the loss coefficients must be >= 0 and eps > 0")
        self.coefficients = dict(invariance=invariance, variance=variance, covariance=covariance)
        self.std_target, self.eps = std_target, eps
        self.expander = mlp([self.feature_dim, expander_hidden_dim, expander_hidden_dim, expander_dim], last_bias=False)

    def training_step(self, batch, batch_idx):
        views, _ = batch
        z1, z2 = self.forward_views(lambda x: self.expander(self.backbone(x)), [views[0], views[1]])
        loss = vicreg_loss(z1, z2, **self.coefficients, std_target=self.std_target, eps=self.eps)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return loss
