"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ssl.heads import mlp
from lightning_ssl.losses import sinkhorn_knopp, swav_loss
from lightning_ssl.methods.base import SSLMethod

__all__ = ["SwAV"]


class SwAV(SSLMethod):
    """SwAV: each view's code (an equipartitioned assignment to prototypes) is predicted from the other views.

    Paper defaults (sec. 3, 4 and appendix A; ``main_swav.py`` of the paper's code): projector
    ``[D, 2048, 128]`` (BN, ReLU) then L2 normalization, 3000 prototypes (a bias-free linear layer,
    L2-normalized at the start of every step, not updated during the first epoch),
    Sinkhorn-Knopp with epsilon 0.05 and 3 iterations over the global batch, swapped prediction at
    temperature 0.1, codes from the global views only (multi-crop 2 x 224 + 6 x 96: the datamodule's
    ``local_crops=6``), LARS with lr 4.8 at batch 4096 (0.6 x B / 512, i.e. ``base_lr`` 0.3 per 256),
    weight decay 1e-6, cosine schedule (the 800-epoch script: 10 warmup epochs, final lr 0.0048, i.e.
    ``final_lr`` = base_lr / 1000). For small batches a queue of earlier projections of the
    global views (per process, 3840 at batch 256 in the paper's code) joins the Sinkhorn batch from
    epoch ``queue_start_epoch`` (15), once full.

    Args (the shared ones are ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: projector widths.
        num_prototypes: K.
        temperature: of the softmax over prototype scores.
        sinkhorn_epsilon, sinkhorn_iterations: of ``sinkhorn_knopp``.
        freeze_prototypes_epochs: epochs during which the prototypes get no update (the paper's "first
            epoch"; fractions allowed, counted in optimizer steps of the training loader).
        freeze_prototypes_steps: the same in optimizer steps (the reference's ``freeze_prototypes_niters``);
            overrides ``freeze_prototypes_epochs`` when given.
        global_crops: how many of the views (the first ones) are global: their codes are computed.
        queue_length: projections kept per global view and process (0: no queue).
        queue_start_epoch: the epoch from which the queue is filled; it is used once full.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        freeze_prototypes_epochs: float = 1.0,
        freeze_prototypes_steps: int | None = None,
        global_crops: int = 2,
        queue_length: int = 0,
        queue_start_epoch: int = 15,
        optimizer: str = "lars",
        base_lr: float = 0.3,
        weight_decay: float = 1e-6,
        **kwargs,
    ):
        super().__init__(backbone, optimizer=optimizer, base_lr=base_lr, weight_decay=weight_decay, **kwargs)
        if freeze_prototypes_epochs < 0 or (freeze_prototypes_steps is not None and freeze_prototypes_steps < 0):
            raise ValueError("freeze_prototypes_epochs and freeze_prototypes_steps must be >= 0")
        if global_crops < 1 or queue_length < 0 or sinkhorn_iterations < 1:
            raise ValueError("need global_crops >= 1, queue_length >= 0 and sinkhorn_iterations >= 1")
        self.temperature, self.epsilon, self.iterations = temperature, sinkhorn_epsilon, sinkhorn_iterations
        self.freeze_prototypes_epochs, self.freeze_prototypes_steps = freeze_prototypes_epochs, freeze_prototypes_steps
        self.global_crops = global_crops
        self.queue_length, self.queue_start_epoch = queue_length, queue_start_epoch
        self.projector = mlp([self.feature_dim, projection_hidden_dim, projection_dim])
        self.prototypes = nn.Linear(projection_dim, num_prototypes, bias=False)
        if queue_length > 0:
            self.register_buffer("queue", torch.zeros(global_crops, queue_length, projection_dim))

    def _queue_state(self, batch_idx: int, batch_size: int) -> tuple[bool, bool]:
        """``(fill, use)``: fill from ``queue_start_epoch`` on; use once ``queue_length`` projections have
        entered (derived from the epoch and the batch index: no device read, exact on resume)."""
        if self.queue_length == 0 or self._trainer is None or self.current_epoch < self.queue_start_epoch:
            return False, False
        batches = (self.current_epoch - self.queue_start_epoch) * int(self.trainer.num_training_batches) + batch_idx
        return True, batches >= math.ceil(self.queue_length / batch_size)

    def training_step(self, batch, batch_idx):
        views, _ = batch
        if len(views) < max(2, self.global_crops):
            raise ValueError(f"SwAV needs at least 2 and global_crops={self.global_crops} views, got {len(views)}")
        with torch.no_grad():  # prototypes on the unit sphere (the paper's code, at each iteration)
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z = self.forward_crops(self.backbone, lambda f: F.normalize(self.projector(f), dim=1), views)
        scores = [self.prototypes(zi) for zi in z]
        fill, use = self._queue_state(batch_idx, views[0].shape[0])
        codes = []
        with torch.no_grad():
            for i in range(self.global_crops):
                s = scores[i].detach()
                if use:
                    s = torch.cat([self.prototypes(self.queue[i].to(s.dtype)), s])
                codes.append(sinkhorn_knopp(s, self.epsilon, self.iterations)[-views[i].shape[0] :])
            if fill:  # the newest projections first, the oldest out, as the paper's code
                new = torch.stack([z[i].detach()[-self.queue_length :] for i in range(self.global_crops)])
                self.queue.copy_(torch.cat([new.to(self.queue.dtype), self.queue], dim=1)[:, : self.queue_length])
        loss = swav_loss(scores, codes, self.temperature)
        self.log("train/loss", loss)
        return loss

    def frozen_prototype_steps(self) -> int:
        """The optimizer steps at the start during which the prototypes get no update."""
        if self.freeze_prototypes_steps is not None:
            return self.freeze_prototypes_steps
        return math.ceil(self.freeze_prototypes_epochs * self.steps_per_epoch())

    def on_after_backward(self) -> None:
        """The prototypes are not updated during the first ``frozen_prototype_steps()`` optimizer steps."""
        if self.global_step < self.frozen_prototype_steps():
            self.prototypes.weight.grad = None
