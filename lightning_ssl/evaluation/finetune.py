"""Fine-tuning: the encoder and a linear head trained together.

``FineTuning``: few-label fine-tuning (Chen et al. 2020, sec. 4.2 / B.5; Grill et al. 2020, sec. 4) on 1%
or 10% of the labels, with the SGD protocol of ``LinearEvaluation`` (Nesterov momentum 0.9, cosine decay,
no weight decay), the encoder trainable and in train mode; ``encoder_lr`` gives it its own learning rate
(default: the head's). ``labeled_fraction_subset`` picks a class-balanced subset of a dataset's labels
(SimCLR used fixed 1%/10% ImageNet lists; with ``seed`` fixed the subset is reproducible).

``ViTFineTuning``: the end-to-end fine-tuning recipe of ViTs in BEiT (Bao et al. 2022) and MAE (He et al.
2022, appendix A.2; the code's ``main_finetune.py``): AdamW with layer-wise lr decay, drop path, label
smoothing, optional Mixup/CutMix (``evaluation.mixup``), warmup then cosine.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_ssl.backbones import PooledBackbone, set_drop_path, vit_depth, vit_parameter_groups
from lightning_ssl.evaluation.export import POOLS, encoder_pool, pooled_encoder
from lightning_ssl.evaluation.linear import LinearEvaluation, images_and_targets
from lightning_ssl.evaluation.mixup import Mixup
from lightning_ssl.optim import GROUP_KEYS, lr_lambda, scaled_lr
from lightning_ssl.vit import vit_width

__all__ = ["FineTuning", "ViTFineTuning", "labeled_fraction_subset"]


def labeled_fraction_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``round(fraction x n_c)`` examples (at least one) of each class ``c``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1] (0.01 for 1%, 0.1 for 10%), got {fraction}")
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero(as_tuple=True)[0]
        n = max(1, int(round(fraction * idx.numel())))
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:n]])
    return torch.cat(chosen).sort().values


class FineTuning(LinearEvaluation):
    """Encoder + linear head, all trainable. Arguments as ``LinearEvaluation`` (``pool`` included), plus
    ``encoder_lr`` (``None``: the head's ``lr``). Defaults follow SimCLR's fine-tuning: SGD, momentum 0.9,
    Nesterov. For ViTs, ``ViTFineTuning`` is the recipe of BEiT and MAE."""

    freeze_encoder = False

    def __init__(
        self,
        encoder: str | Path | nn.Module,
        num_classes: int,
        lr: float = 0.05,
        encoder_lr: float | None = None,
        **kwargs,
    ):
        super().__init__(encoder, num_classes, lr=lr, **kwargs)
        self.encoder.requires_grad_(True)

    def trainable_parameter_groups(self) -> list[dict]:
        enc_lr = self.hparams.encoder_lr if self.hparams.encoder_lr is not None else self.hparams.lr
        return [{"params": list(self.head.parameters())}, {"params": list(self.encoder.parameters()), "lr": enc_lr}]


def _vit_inner(encoder: nn.Module) -> nn.Module:
    return encoder.module if isinstance(encoder, PooledBackbone) else encoder


def _require_vit(encoder: nn.Module) -> None:
    if vit_depth(encoder) is None:
        raise ValueError(
            f"ViTFineTuning fine-tunes a ViT (a torchvision VisionTransformer or a timm ViT, 'timm:<name>'), but "
            f"the encoder is a {type(_vit_inner(encoder)).__name__}: use FineTuning for other encoders"
        )


def _drop_final_norm(encoder: nn.Module) -> None:
    """Replace the ViT's final norm by ``nn.Identity`` in place (MAE's ``global_pool``: ``del self.norm``)."""
    inner = _vit_inner(encoder)
    if isinstance(inner, torchvision.models.VisionTransformer):
        inner.encoder.ln = nn.Identity()
    elif isinstance(getattr(inner, "norm", None), nn.Module):
        inner.norm = nn.Identity()


class ViTFineTuning(LinearEvaluation):
    """End-to-end fine-tuning of a ViT encoder (torchvision's or timm's) with the recipe of BEiT and MAE
    (He et al. 2022, appendix A.2, Table 9; defaults from MAE's ``main_finetune.py``).

    AdamW (betas 0.9, 0.999) at peak lr ``base_lr x B / 256`` (``B`` the global batch: batch x processes x
    gradient accumulation) or ``lr``, weight decay 0.05 (none on biases, norm parameters, position
    embeddings and class token: ``backbones.vit_parameter_groups``), layer-wise lr decay (a parameter of
    layer ``l`` of a depth-``d`` ViT gets ``layer_decay ** (d + 1 - l)`` of the lr; the head 1), drop path
    (``backbones.set_drop_path``, linear over the blocks), ``warmup_epochs`` of linear warmup then a cosine to
    ``min_lr`` per step, cross-entropy with label smoothing, Mixup/CutMix off by default (MAE: 0.8 / 1.0 on
    ImageNet; see ``evaluation.mixup``). Defaults: ``main_finetune.py``'s (blr 1e-3, layer decay 0.75, drop
    path 0.1 (FINETUNE.md: ViT-L 0.2, ViT-H 0.3), min_lr 1e-6, 5 warmup epochs, smoothing 0.1), the ViT-L/H
    recipe; MAE's ViT-B recipe is ``base_lr=5e-4, layer_decay=0.65`` (FINETUNE.md; 100 epochs, 50 for ViT-L/H:
    ``trainer.max_epochs``).

    Head: with ``pool="mean"``, MAE's ``global_pool``: the mean of the patch tokens of the last block, a
    fresh ``fc_norm`` (LayerNorm, eps 1e-6) and the linear classifier; the encoder's own final norm is
    replaced by ``nn.Identity`` in place, as MAE's ``models_vit.py`` deletes it (so is timm's
    ``global_pool="avg"``). With ``pool="cls"``: the class token after the final norm, then the classifier.
    The classifier's weight is drawn from a truncated normal with std 2e-5, its bias 0 (``main_finetune.py``).
    Image augmentation (MAE: RandAugment, random erasing 0.25) is the datamodule's.

    Args:
        encoder: a ViT encoder module (``build_backbone``'s ``ViTBackbone``, a timm ViT, or the bare model),
            or the path of a method's checkpoint / an export (see ``load_encoder``).
        num_classes: number of classes.
        arch: the architecture of a plain state_dict file or of a checkpoint of a module backbone.
        pool: ``"cls"`` or ``"mean"``; ``None``: what the checkpoint's ``encoder_spec`` says (a module:
            how it pools, ``"cls"`` for a plain ViT).
        feature_dim: the encoder's width (default: the ViT's).
        base_lr, lr: the peak lr is ``lr``, or ``base_lr x B / 256``.
        min_lr: where the cosine ends (an lr; MAE 1e-6).
        weight_decay, layer_decay, drop_path, warmup_epochs, label_smoothing: as above.
        mixup_alpha, cutmix_alpha, mixup_switch_prob: Mixup/CutMix (0: off), CutMix's share of the batches
            when both are on.
        betas: AdamW's.
    """

    freeze_encoder = False

    def __init__(
        self,
        encoder: str | Path | nn.Module,
        num_classes: int,
        arch: str | None = None,
        pool: str | None = None,
        feature_dim: int | None = None,
        base_lr: float = 1e-3,
        lr: float | None = None,
        min_lr: float = 1e-6,
        weight_decay: float = 0.05,
        layer_decay: float = 0.75,
        drop_path: float = 0.1,
        warmup_epochs: float = 5.0,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_switch_prob: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
    ):
        if pool is not None and pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS))} or None, got {pool!r}")
        if not base_lr > 0:
            raise ValueError(f"base_lr must be positive, got {base_lr} (the lr for a global batch of 256)")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if min_lr < 0 or weight_decay < 0 or warmup_epochs < 0:
            raise ValueError(
                f"min_lr, weight_decay and warmup_epochs must be >= 0, got {min_lr}, {weight_decay}, {warmup_epochs}"
            )
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must lie in (0, 1] (1: no decay), got {layer_decay}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must lie in [0, 1), got {drop_path}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        mixup = Mixup(num_classes, mixup_alpha, cutmix_alpha, mixup_switch_prob, label_smoothing)  # checks them
        if isinstance(encoder, nn.Module):
            _require_vit(encoder)
            encoder = pooled_encoder(encoder, pool or encoder_pool(encoder))
            feature_dim = feature_dim or vit_width(encoder)
        super().__init__(encoder, num_classes, arch=arch, feature_dim=feature_dim, pool=pool)
        _require_vit(self.encoder)
        self.mixup = mixup
        self.encoder.requires_grad_(True)
        if self.pool == "mean":
            _drop_final_norm(self.encoder)
        set_drop_path(self.encoder, drop_path)
        classifier = nn.Linear(self.feature_dim, num_classes)
        nn.init.trunc_normal_(classifier.weight, std=2e-5)
        nn.init.zeros_(classifier.bias)
        fc_norm = nn.LayerNorm(self.feature_dim, eps=1e-6) if self.pool == "mean" else nn.Identity()
        self.head = nn.Sequential(OrderedDict(fc_norm=fc_norm, fc=classifier))

    # ----------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx):
        images, target = images_and_targets(batch)
        images, soft = self.mixup(images, target)
        loss = F.cross_entropy(self(images).float(), soft)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ----------------------------------------------------------------- optimization
    def parameter_groups(self) -> list[dict]:
        """``vit_parameter_groups`` of this module (encoder and head) with ``weight_decay`` and ``layer_decay``."""
        hp = self.hparams
        return vit_parameter_groups(self, self.encoder, hp.weight_decay, hp.layer_decay)

    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes: batch x processes x accumulation."""
        loader = self.trainer.train_dataloader
        batch = getattr(loader, "batch_size", None)
        if batch is None:
            batch = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if batch is None:
            raise ValueError(
                "cannot read the batch size from the train dataloader; pass lr= instead of base_lr x batch / 256"
            )
        return int(batch) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def peak_lr(self) -> float:
        """``lr``, or ``base_lr x global batch / 256`` (MAE's linear scaling rule)."""
        hp = self.hparams
        return hp.lr if hp.lr is not None else scaled_lr(hp.base_lr, self.global_batch_size(), "linear")

    def configure_optimizers(self):
        hp = self.hparams
        if self.trainer.train_dataloader is None:  # estimated_stepping_batches skips it when max_epochs=-1
            self.trainer.fit_loop.setup_data()
        total = max(1, int(self.trainer.estimated_stepping_batches))
        batches, accumulate = self.trainer.num_training_batches, self.trainer.accumulate_grad_batches
        per_epoch = total if batches == float("inf") else max(1, math.ceil(batches / accumulate))
        warmup = int(round(hp.warmup_epochs * per_epoch))
        lr = self.peak_lr()
        groups = []
        for group in self.parameter_groups():
            plain = {k: v for k, v in group.items() if k not in GROUP_KEYS}
            groups.append({**plain, "lr": lr * group["lr_scale"]})
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas), foreach=True)
        final = min(1.0, hp.min_lr / lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, total, warmup, "cosine", final)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
