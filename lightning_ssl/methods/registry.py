"""The registry entry of a method: what the CLI, the contract tests and the benchmarks need to know."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_ssl.methods.base import SSLMethod

__all__ = ["MethodEntry", "MODALITIES", "VIT_BACKBONE"]

MODALITIES = ("image", "audio")
VIT_BACKBONE = {"backbone": "vit_ti_16", "small_image": True}  # ViT-Ti with 4x4 patches for small images


@dataclass(frozen=True)
class MethodEntry:
    """A method of the library.

    Attributes:
        cls: the ``SSLMethod`` subclass.
        small: arguments that shrink the method's heads, buffers and grids for smoke runs on 16-32
            pixel images with a small backbone (the contract tests and the benchmarks' smoke modes);
            the paper defaults stay the class's defaults.
        cifar: arguments the method needs on 32x32 images beyond ``small_image=True`` (e.g. CPC's
            patch grid), used by the CIFAR-10 benchmarks.
        modality: ``"image"`` (views ``B x 3 x H x W``) or ``"audio"`` (views ``B x 1 x L`` mono
            16 kHz waveforms); ``example_views`` makes inputs of that kind.
        configs: the datasets of the method's configs, ``configs/<name>_<dataset>.yaml``.
        named_backbone: the arguments of a small backbone given by name (a hyperparameter, so that a
            checkpoint rebuilds it): ResNet-18 with the CIFAR stem for images (``VIT_BACKBONE`` for ViT-only
            methods).
        vit_only: the method needs a ViT's patch tokens (masked-image and joint-embedding methods); the
            contract tests give it a tiny ViT instead of a small convolutional network.
    """

    cls: type[SSLMethod]
    small: Mapping[str, Any] = field(default_factory=dict)
    cifar: Mapping[str, Any] = field(default_factory=dict)
    modality: str = "image"
    configs: tuple[str, ...] = ("cifar10", "imagenet")
    named_backbone: Mapping[str, Any] = field(default_factory=lambda: {"backbone": "resnet18", "small_image": True})
    vit_only: bool = False

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}; got {self.modality!r}")

    def example_views(self, n: int, seed: int = 0, size: int = 16, num_views: int = 2) -> list[torch.Tensor]:
        """``num_views`` random input batches of ``n`` examples for this method's modality: images
        ``n x 3 x size x size`` or waveforms ``n x 1 x (size x 160)`` (``size`` vectors of CPC's
        10 ms hop), standard normal, from a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        shape = (n, 3, size, size) if self.modality == "image" else (n, 1, size * 160)
        return [torch.randn(shape, generator=gen) for _ in range(num_views)]

    def build(self, *, size: str = "paper", **kwargs) -> SSLMethod:
        """An instance with the paper defaults (``size="paper"``), the ``small`` or the ``cifar`` arguments,
        and ``kwargs`` on top."""
        extra = {"paper": {}, "small": self.small, "cifar": self.cifar}[size]
        return self.cls(**{**extra, **kwargs})
