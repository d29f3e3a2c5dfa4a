"""Offline linear evaluation of a frozen encoder (the standard protocol of Zhang et al. 2016,
Chen et al. 2020 sec. B.6, He et al. 2020 sec. 4.1).

A linear layer is trained on the features of a frozen encoder kept in eval mode (BN statistics do
not move), with SGD (momentum 0.9, Nesterov, no weight decay) and a cosine learning-rate decay over
``trainer.max_epochs`` (90-100 epochs at ImageNet scale, on random-resized-crop + flip views that
the datamodule supplies). At the end of fit the encoder's parameters and buffers are compared with
the copy taken at the start: any change raises ``EncoderChangedError``. Logs ``train/loss``,
``val/top1`` and ``val/top5`` (torchmetrics, reduced over processes).
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ssl.backbones import infer_feature_dim
from lightning_ssl.evaluation.export import POOLS, encoder_pool, load_encoder, pooled_encoder

__all__ = ["LinearEvaluation", "EncoderChangedError", "snapshot", "changed_tensors", "images_and_targets"]


class EncoderChangedError(RuntimeError):
    """The encoder that linear evaluation must keep frozen was modified."""


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer of ``module``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_tensors(module: nn.Module, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of ``module`` that differ from ``reference`` (bit for bit)."""
    current = module.state_dict()
    return [k for k, v in reference.items() if k not in current or not torch.equal(current[k].detach().cpu(), v.cpu())]


def images_and_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)`` of a labeled batch; of a two-view batch, the first view's images."""
    images, target = batch
    if isinstance(images, (list, tuple)):  # a two-view batch: evaluate on the first view
        images = images[0]
    return images, target


class LinearEvaluation(pl.LightningModule):
    """A linear classifier on a frozen encoder.

    Args:
        encoder: an ``nn.Module`` mapping images to ``B x D`` features, or the path of a method's
            checkpoint / a torchvision state_dict file (see ``load_encoder``).
        num_classes: number of classes.
        arch: the torchvision architecture of a plain state_dict file (``resnet50``, ...).
        small_image: the encoder in the file has the CIFAR stem.
        feature_dim: the encoder's output size (inferred for files and with a dummy forward otherwise).
        lr: SGD learning rate (0.1 for batch 256 in SimCLR's protocol; scale with your batch).
        momentum, nesterov, weight_decay: SGD settings (0.9, True, 0 by default).
        pool: a ViT encoder's features: ``"cls"`` its class token, ``"mean"`` the mean of its patch tokens
            (``export.pooled_encoder``). ``None``: what the checkpoint's ``encoder_spec`` (or an export's
            sidecar) says, ``"cls"`` if nothing; a module is used as it is.
    """

    freeze_encoder = True

    def __init__(
        self,
        encoder: str | Path | nn.Module,
        num_classes: int,
        arch: str | None = None,
        small_image: bool = False,
        feature_dim: int | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        pool: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"] if isinstance(encoder, nn.Module) else None)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if pool is not None and pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS))} or None, got {pool!r}")
        if isinstance(encoder, nn.Module):
            self.encoder = encoder if pool is None else pooled_encoder(encoder, pool)
            if feature_dim is None:
                feature_dim = infer_feature_dim(self.encoder, 32)
        else:
            self.encoder, dim = load_encoder(encoder, arch=arch, small_image=small_image, pool=pool)
            feature_dim = feature_dim or dim
        self.pool = encoder_pool(self.encoder)
        self.feature_dim = int(feature_dim)
        self.head = nn.Linear(self.feature_dim, num_classes)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
        top_k = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self._reference: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------- frozen encoder
    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # BN running statistics stay those of pretraining
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            if self.encoder.training:  # Lightning's loops may restore submodule modes directly
                self.encoder.eval()
            with torch.no_grad():
                return self.encoder(images).detach()
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def on_fit_start(self) -> None:
        if self.freeze_encoder:
            self._reference = snapshot(self.encoder)
        else:
            # fine-tuning trains the encoder in train mode: one passed in eval mode (after feature
            # extraction, say) would keep its batch-norm statistics, and dropout and drop path off
            self.train()

    def on_fit_end(self) -> None:
        self.verify_encoder_unchanged()

    def verify_encoder_unchanged(self) -> None:
        """Raise ``EncoderChangedError`` naming the encoder tensors that changed since fit started."""
        if not self.freeze_encoder or self._reference is None:
            return
        changed = changed_tensors(self.encoder, self._reference)
        if changed:
            raise EncoderChangedError(
                f"linear evaluation must not change the frozen encoder, but {len(changed)} tensor(s) changed: "
                f"{changed[:10]}{' ...' if len(changed) > 10 else ''}. Something trained or re-normalized it "
                "(an optimizer over all parameters, BN in train mode, or a callback): "
                "the accuracy is not a linear-evaluation result."
            )

    # ----------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx):
        images, target = images_and_targets(batch)
        loss = F.cross_entropy(self(images), target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, target = images_and_targets(batch)
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, target), sync_dist=True)
        self.val_top1.update(logits, target)
        self.val_top5.update(logits, target)
        self.log("val/top1", self.val_top1, prog_bar=True)
        self.log("val/top5", self.val_top5)

    test_step = validation_step

    def trainable_parameter_groups(self) -> list[dict]:
        return [{"params": list(self.head.parameters())}]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.trainable_parameter_groups(),
            lr=hp.lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov and hp.momentum > 0,
            weight_decay=hp.weight_decay,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
