"""Honest random-initialization baselines.

A freshly initialized encoder's batch-norm layers hold their initial running statistics (mean 0,
variance 1), which do not match the activations of real images; comparing a pretrained encoder, whose
statistics were fitted to the data, with such an encoder overstates what pretraining gained (the
quickstart's all-labels kNN baseline rises from 0.83 to 0.87 once its statistics are recomputed, with
no weight change). ``calibrate_norm_statistics`` recomputes them on training images: every
normalization layer's running statistics are reset and re-estimated as a cumulative average over the
batches, with no gradient and no change to any weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["calibrate_norm_statistics"]


@torch.no_grad()
def calibrate_norm_statistics(
    backbone: nn.Module,
    loader: Iterable,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_images: int | None = 5000,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Re-estimate the running statistics of every batch-norm layer of ``backbone`` (in place) from the
    images of ``loader`` (``(images, labels)`` batches), up to ``max_images``; returns ``backbone`` in eval
    mode. ``encode(images)`` runs the forward (default: ``backbone(images)``; CPC passes its patch-grid
    representation so the statistics are those of patches). Weights are not touched. Encoders without
    batch norm (layer/group norm has no running statistics) are returned unchanged."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return backbone.eval()
    device = device or next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    encode = encode or backbone
    momenta = [m.momentum for m in norms]
    backbone.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    seen = 0
    try:
        for images, _ in loader:
            if max_images is not None and seen >= max_images:
                break
            images = images.to(device, dtype) if images.is_floating_point() else images.to(device)
            if max_images is not None:
                images = images[: max_images - seen]
            encode(images)
            seen += images.shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        backbone.eval()
    if seen == 0:
        raise ValueError("calibrate_norm_statistics got no images from the loader")
    return backbone
