"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) with label smoothing, as the ViT fine-tuning
recipes of DeiT, BEiT and MAE use them (timm's ``Mixup`` in ``mode="batch"``; MAE's ``main_finetune.py``:
``--mixup 0.8 --cutmix 1.0``, ``mixup_prob`` 1.0, ``mixup_switch_prob`` 0.5, ``--smoothing 0.1``).

One ``lambda ~ Beta(alpha, alpha)`` per batch; every image is mixed with its partner in the reversed batch
(``images.flip(0)``, timm's pairing). Mixup: ``lambda x + (1 - lambda) x'``. CutMix: a box of side
``sqrt(1 - lambda)`` times the image's, centered at a uniform random pixel and clipped to the image, is
pasted from ``x'``; ``lambda`` is then corrected to the share of the image outside the box. With both on,
each batch uses CutMix with probability ``switch_prob``. Targets are soft: ``lambda y + (1 - lambda) y'``
with ``y`` the label-smoothed one-hot (``1 - s + s / K`` on the label, ``s / K`` elsewhere). With both alphas
0 nothing is mixed and the targets are the smoothed one-hot labels. Draws use torch's global generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["Mixup", "smooth_one_hot", "mix_targets", "cutmix_box", "box_lambda", "mixup_images", "cutmix_images"]


def smooth_one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``B x K`` targets: ``1 - smoothing + smoothing / K`` at each label, ``smoothing / K`` elsewhere."""
    off = smoothing / num_classes
    return F.one_hot(target.long(), num_classes).float() * (1.0 - smoothing) + off


def mix_targets(target: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets of a batch mixed with its reverse: ``lam * y + (1 - lam) * y.flip(0)``, ``y`` smoothed."""
    y = smooth_one_hot(target, num_classes, smoothing)
    return lam * y + (1.0 - lam) * y.flip(0)


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of CutMix's box for ``lam``: sides ``int(H sqrt(1 - lam))`` and
    ``int(W sqrt(1 - lam))``, centered at a uniformly drawn pixel, clipped to the image (timm's ``rand_bbox``)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, ()))
    cx = int(torch.randint(0, width, ()))
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
    return top, bottom, left, right


def box_lambda(box: tuple[int, int, int, int], height: int, width: int) -> float:
    """The share of the image outside ``box``: CutMix's corrected ``lambda``."""
    top, bottom, left, right = box
    return 1.0 - (bottom - top) * (right - left) / float(height * width)


def mixup_images(images: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * x + (1 - lam) * x.flip(0)`` (a new tensor)."""
    return images * lam + images.flip(0) * (1.0 - lam)


def cutmix_images(images: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """A copy of ``images`` with ``box`` pasted from the reversed batch."""
    top, bottom, left, right = box
    out = images.clone()
    out[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
    return out


class Mixup:
    """Batch-wise Mixup / CutMix with label-smoothed soft targets (see the module docstring).

    Args:
        num_classes: number of classes of the targets.
        mixup_alpha: Mixup's Beta parameter (0: off; MAE/DeiT: 0.8).
        cutmix_alpha: CutMix's Beta parameter (0: off; MAE/DeiT: 1.0).
        switch_prob: with both on, the probability that a batch uses CutMix (timm, MAE: 0.5).
        label_smoothing: ``s`` of the soft targets (MAE: 0.1).
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0: off), got {mixup_alpha}, {cutmix_alpha}")
        if not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"switch_prob must lie in [0, 1], got {switch_prob}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.switch_prob, self.label_smoothing = float(switch_prob), float(label_smoothing)

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def sample(self) -> tuple[float, bool]:
        """``(lambda, use_cutmix)`` for one batch (``(1.0, False)`` when both are off)."""
        if not self.enabled:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(torch.rand(()) < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        return lam, use_cutmix

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mixed images, B x K soft targets)``; ``images`` itself when nothing is mixed."""
        lam, use_cutmix = self.sample()
        if use_cutmix:
            box = cutmix_box(images.shape[-2], images.shape[-1], lam)
            lam = box_lambda(box, images.shape[-2], images.shape[-1])
            images = cutmix_images(images, box)
        elif lam != 1.0:
            images = mixup_images(images, lam)
        soft = mix_targets(target, self.num_classes, lam, self.label_smoothing).to(images.device)
        return images, soft
