"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations")."""

from __future__ import annotations

from torch import nn

from lightning_ssl.heads import mlp
from lightning_ssl.losses import nt_xent
from lightning_ssl.methods.base import SSLMethod

__all__ = ["SimCLR", "PROJECTION_HEADS"]

PROJECTION_HEADS = ("paper", "reference")


class SimCLR(SSLMethod):
    """SimCLR: two views of each image, NT-Xent with every other view in the batch as a negative.

    Paper defaults: projection MLP ``[D, D, 128]`` with BN, temperature 0.5 (CIFAR-10; configs for
    ImageNet use 0.1), LARS with lr = 0.3 x batch / 256, 10 warmup epochs then cosine decay, weight
    decay 1e-6 on weights only. In a distributed run the negatives come from every process.

    The projection head: the paper (sec. 2.1) writes ``g(h) = W2 relu(W1 h)``, an MLP whose output
    layer is a plain linear map; the reference code (google-research/simclr, ``projection_head``) ends
    with a linear layer without bias followed by BN without centering (a learned scale, no shift).
    Paper and code disagree, so the default is the paper's (``"paper"``: Linear, BN, ReLU, Linear with
    bias; the hidden BN is in both); ``"reference"`` gives the code's.

    Args (the shared ones are ``SSLMethod``'s):
        projection_head: ``"paper"`` or ``"reference"`` (see above).
        projection_hidden_dim: hidden width of the projection MLP (``None``: the backbone's width).
        projection_dim: output width of the projection.
        temperature: tau of NT-Xent (eq. 1).
        gather_distributed: take negatives from every process.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        projection_head: str = "paper",
        projection_hidden_dim: int | None = None,
        projection_dim: int = 128,
        temperature: float = 0.5,
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
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        if projection_head not in PROJECTION_HEADS:
            raise ValueError(f"projection_head must be one of {', '.join(PROJECTION_HEADS)}; got {projection_head!r}")
        hidden = projection_hidden_dim or self.feature_dim
        reference = projection_head == "reference"
        dims = [self.feature_dim, hidden, projection_dim]
        self.projector = mlp(dims, last_batch_norm=reference, last_scale=reference)

    def training_step(self, batch, batch_idx):
        views, _ = batch
        # view_batching="concat": one pass, BN statistics over the 2N views (the paper); "per_view": faster on CPUs
        z1, z2 = self.forward_views(lambda x: self.projector(self.backbone(x)), [views[0], views[1]])
        loss = nt_xent(z1, z2, self.temperature, gather=self.gather_distributed)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return loss
