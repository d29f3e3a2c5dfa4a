"""Few-label fine-tuning (Chen et al. 2020, sec. 4.2 / B.5; Grill et al. 2020, sec. 4): the encoder
and a linear head trained together on 1% or 10% of the labels.

Same SGD protocol as ``LinearEvaluation`` (Nesterov momentum 0.9, cosine decay, no weight decay),
with the encoder trainable and in train mode; ``encoder_lr`` gives it its own learning rate
(default: the head's). ``labeled_fraction_subset`` picks a class-balanced subset of a dataset's
labels (SimCLR used fixed 1%/10% ImageNet lists; with ``seed`` fixed the subset is reproducible).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_ssl.evaluation.linear import LinearEvaluation

__all__ = ["FineTuning", "labeled_fraction_subset"]


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
    """Encoder + linear head, all trainable. Arguments as ``LinearEvaluation``, plus ``encoder_lr``
    (``None``: the head's ``lr``). Defaults follow SimCLR's fine-tuning: SGD, momentum 0.9, Nesterov."""

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
