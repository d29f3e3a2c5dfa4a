"""Encoders: a torchvision model by name, or any ``nn.Module``, turned into a feature extractor.

``build_backbone`` returns ``(module, feature_dim)``; the module maps ``B x 3 x H x W`` images to
``B x feature_dim`` vectors. A classifier head (``fc``, ``classifier``, ``head(s)``) is replaced by
``nn.Identity``; convolutional outputs are average-pooled. ``small_image=True`` gives ResNets the
CIFAR stem used by SimCLR (Chen et al. 2020, appendix B.9): a 3x3 stride-1 first convolution and
no max-pool, for 32x32 inputs.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import torch
import torchvision
from torch import nn

__all__ = [
    "build_backbone",
    "PooledBackbone",
    "reset_parameters",
    "strip_classifier",
    "small_image_stem",
    "infer_feature_dim",
    "CLASSIFIER_ATTRS",
    "batch_norm_to_layer_norm",
]

CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


class PooledBackbone(nn.Module):
    """Wraps a module so that its output is always ``B x D``: 4-d maps are average-pooled."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        elif out.ndim != 2:
            out = out.flatten(1)
        return out


def strip_classifier(model: nn.Module) -> int | None:
    """Replace the classifier (``fc``, ``classifier``, ``heads``, ``head``) by ``nn.Identity``; return
    the width of the features that entered it (the pooled features, as in the papers' evaluations)."""
    for attr in CLASSIFIER_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            linears = [m for m in head if isinstance(m, nn.Linear)]
            if linears:
                setattr(model, attr, nn.Identity())
                return linears[0].in_features
    return None


def small_image_stem(model: nn.Module) -> None:
    """Give a ResNet the CIFAR stem in place: a 3x3 stride-1 ``conv1`` and no max-pool."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"small_image=True replaces a ResNet-style stem (attributes `conv1` and `maxpool`), but "
            f"{type(model).__name__} has none. Use a ResNet, or pass small_image=False and an "
            "encoder designed for small inputs."
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


@torch.no_grad()
def infer_feature_dim(module: nn.Module, image_size: int = 224) -> int:
    """Width of ``module``'s output for a ``2 x 3 x image_size x image_size`` input (eval mode, no gradient);
    raises if the output is not ``B x D``."""
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = module(torch.zeros(2, 3, image_size, image_size, device=device))
    finally:
        module.train(was_training)
    if out.ndim != 2:
        raise ValueError(
            f"the encoder must return B x D features, got shape {tuple(out.shape)}; wrap it in PooledBackbone"
        )
    return int(out.shape[1])


def build_backbone(
    backbone: str | nn.Module,
    small_image: bool = False,
    feature_dim: int | None = None,
    weights_path: str | Path | None = None,
) -> tuple[nn.Module, int]:
    """Build an encoder and return ``(module, feature_dim)``.

    Args:
        backbone: a torchvision classification model name (``"resnet18"``, ``"resnet50"``,
            ``"efficientnet_b0"``, ...) built with random weights, or any ``nn.Module``.
        small_image: CIFAR stem for ResNets (3x3 stride-1 conv1, no max-pool) for 32x32 inputs.
        feature_dim: the output dimension, when it cannot be inferred from a dummy forward.
        weights_path: a local file with a torchvision state_dict (e.g. supervised ImageNet weights)
            loaded with ``strict=True`` before the classifier is removed. Nothing is downloaded.
    """
    if isinstance(backbone, str):
        available = torchvision.models.list_models(module=torchvision.models)
        if backbone not in available:
            close = difflib.get_close_matches(backbone, available, n=3, cutoff=0.6)
            hint = f"Did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(
                f"Unknown backbone {backbone!r}. {hint}Use a torchvision classification model name "
                "(e.g. resnet18, resnet50; all: torchvision.models.list_models()) or pass an nn.Module."
            )
        model = torchvision.models.get_model(backbone, weights=None)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            model.load_state_dict(state, strict=True)
        inferred = strip_classifier(model)
    elif isinstance(backbone, nn.Module):
        if weights_path is not None:
            raise ValueError(
                "weights_path is only used with a torchvision model name; load your module's weights yourself."
            )
        model = backbone
        inferred = strip_classifier(model) if any(hasattr(model, a) for a in CLASSIFIER_ATTRS) else None
    else:
        raise TypeError(f"backbone must be a torchvision model name or an nn.Module, got {type(backbone).__name__}")

    if small_image:
        small_image_stem(model)
    module = PooledBackbone(model)
    if feature_dim is None:
        feature_dim = infer_feature_dim(module, 32 if small_image else 224) if inferred is None else inferred
    return module, int(feature_dim)


def reset_parameters(module: nn.Module, seed: int = 0) -> nn.Module:
    """Return a deep copy of ``module`` with every submodule's parameters re-initialized."""
    module = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
                sub.reset_parameters()
            if hasattr(sub, "reset_running_stats") and callable(sub.reset_running_stats):
                sub.reset_running_stats()
    return module


def batch_norm_to_layer_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` (in place) by ``GroupNorm(1, C)``, i.e. layer norm
    over C, H, W of each sample, as CPC v2 does in its encoder. Returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = nn.GroupNorm(1, child.num_features, eps=child.eps, affine=child.affine)
            ref = next(iter([*child.parameters(), *child.buffers()]), None)
            setattr(module, name, norm if ref is None else norm.to(ref.device))
        else:
            batch_norm_to_layer_norm(child)
    return module
