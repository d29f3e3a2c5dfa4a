"""Semantic segmentation with an FCN-8s head on a ResNet (Long et al. 2015, "Fully Convolutional
Networks for Semantic Segmentation").

FCN-8s: 1x1 score layers on the stride-32, -16 and -8 features (ResNet ``layer4``, ``layer3``,
``layer2``); the stride-32 scores are upsampled x2 and added to the stride-16 scores, the sum is
upsampled x2 and added to the stride-8 scores, and the result is upsampled x8 to the input size.
As in the paper (sec. 3.3 and 4.2), the two x2 upsamplings are learned deconvolutions initialized to
bilinear interpolation (``BilinearUpsample2x``: before training they give exactly
``F.interpolate(..., scale_factor=2, mode="bilinear")``) and the final x8 is fixed bilinear. The two
skip score layers start at zero, as in the paper.

``SegmentationModule`` trains it with cross-entropy ignoring 255, SGD (momentum 0.9, weight decay
1e-4) and the poly learning-rate decay (power 0.9), and reports mIoU over the classes
(``val/miou``, torchmetrics' ``MulticlassJaccardIndex``, classes absent from both prediction and
ground truth of the whole split excluded). The backbone starts from random weights, a supervised
torchvision state_dict file (e.g. ImageNet weights saved locally), or any method's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_ssl.backbones import PooledBackbone
from lightning_ssl.evaluation.export import load_encoder
from lightning_ssl.patches import PatchGridEncoder

__all__ = [
    "FCN8s",
    "BilinearUpsample2x",
    "SegmentationModule",
    "build_segmentation_backbone",
    "mean_iou",
    "IGNORE_INDEX",
]

IGNORE_INDEX = 255


def _as_resnet(encoder: nn.Module) -> torchvision.models.ResNet:
    model = encoder
    while isinstance(model, (PooledBackbone, PatchGridEncoder)):  # the ResNet inside the evaluation wrappers
        model = model.module if isinstance(model, PooledBackbone) else model.backbone
    needed = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if not all(hasattr(model, n) for n in needed):
        raise TypeError(f"FCN-8s needs a ResNet encoder (attributes {', '.join(needed)}), got {type(model).__name__}")
    return model


def _out_channels(layer: nn.Module) -> int:
    last = layer[-1]
    conv = getattr(last, "conv3", None) or last.conv2
    return conv.out_channels


class BilinearUpsample2x(nn.Module):
    """An x2 upsampling of ``C`` channels: a ``C -> C`` deconvolution (kernel 4, stride 2, no bias, Long et
    al.'s ``upscore2``) initialized to bilinear interpolation (the bilinear kernel on the channel
    diagonal, zeros elsewhere), learned or (``learn=False``) fixed. The input is padded by replication
    and the output cropped so that, with the initial weights, it equals ``F.interpolate(x,
    scale_factor=2, mode="bilinear", align_corners=False)`` exactly, borders included. ``size`` crops
    the output to a smaller size (ResNet feature maps of odd sides), as FCN crops its deconvolutions'
    outputs."""

    def __init__(self, channels: int, learn: bool = True):
        super().__init__()
        weight = torch.zeros(channels, channels, 4, 4)
        taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
        weight[range(channels), range(channels)] = taps[:, None] * taps[None, :]
        self.weight = nn.Parameter(weight, requires_grad=learn)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        out_h, out_w = size if size is not None else (2 * h, 2 * w)
        if out_h > 2 * h or out_w > 2 * w:
            raise ValueError(f"a x2 upsampling of {h}x{w} cannot give {out_h}x{out_w}")
        y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.weight, stride=2)
        return y[..., 3 : 3 + out_h, 3 : 3 + out_w]


class FCN8s(nn.Module):
    """FCN-8s head on a ResNet encoder (a torchvision ResNet or ``build_backbone``'s wrapper): x2
    upsamplings (``up32``, ``up16``) initialized to bilinear, fixed bilinear x8 at the end.

    ``learn_upsampling``: the paper (sec. 3.3, 4.2) learns the two x2 upsamplings (the default); the
    reference Caffe nets freeze their deconvolutions (``lr_mult: 0``), which ``False`` gives. In our
    short synthetic-Cityscapes test (16 SGD steps at lr 0.05) the learned form trains slower (mIoU 0.006
    -> 0.008, fixed: -> 0.04); at full length the paper reports learning them helps slightly."""

    def __init__(self, encoder: nn.Module, num_classes: int = 19, learn_upsampling: bool = True):
        super().__init__()
        self.encoder = _as_resnet(encoder)
        self.score8 = nn.Conv2d(_out_channels(self.encoder.layer2), num_classes, 1)
        self.score16 = nn.Conv2d(_out_channels(self.encoder.layer3), num_classes, 1)
        self.score32 = nn.Conv2d(_out_channels(self.encoder.layer4), num_classes, 1)
        self.up32 = BilinearUpsample2x(num_classes, learn=learn_upsampling)
        self.up16 = BilinearUpsample2x(num_classes, learn=learn_upsampling)
        for skip in (self.score8, self.score16):
            nn.init.zeros_(skip.weight)
            nn.init.zeros_(skip.bias)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.encoder
        x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
        c8 = e.layer2(e.layer1(x))
        c16 = e.layer3(c8)
        c32 = e.layer4(c16)
        return c8, c16, c32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c8, c16, c32 = self.features(x)
        s16 = self.score16(c16) + self.up32(self.score32(c32), c16.shape[-2:])
        s8 = self.score8(c8) + self.up16(s16, c8.shape[-2:])
        return F.interpolate(s8, size=x.shape[-2:], mode="bilinear", align_corners=False)  # fixed x8


def build_segmentation_backbone(arch: str = "resnet50", init: str | Path | None = None) -> nn.Module:
    """A ResNet encoder: random (``init=None``), or from a file: a torchvision state_dict
    (supervised weights, or ``lightning-ssl export`` output) or any method's Lightning checkpoint."""
    if init is None or str(init) == "random":
        return torchvision.models.get_model(arch, weights=None)
    encoder, _ = load_encoder(init, arch=arch)
    return encoder


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 19) -> float:
    """mIoU of index predictions against targets (255 ignored), as ``SegmentationModule`` reports it."""
    metric = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")
    return float(metric(pred.flatten(), target.flatten()))


class SegmentationModule(pl.LightningModule):
    """FCN-8s training and mIoU evaluation (see the module docstring).

    Args:
        arch: torchvision ResNet name (``resnet50`` in the seed's experiment; any ResNet works).
        init: ``None``/``"random"``, or a file (supervised torchvision weights, an exported encoder,
            or an SSL checkpoint of any method).
        num_classes: 19 for Cityscapes.
        lr, momentum, weight_decay: SGD (0.01, 0.9, 1e-4: FCN/DeepLab-style Cityscapes training).
        poly_power: the learning rate decays as ``(1 - step / total) ** poly_power``.
        learn_upsampling: learn FCN-8s's x2 upsamplings (the paper) or keep them bilinear (see ``FCN8s``).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        init: str | None = None,
        num_classes: int = 19,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        learn_upsampling: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = FCN8s(build_segmentation_backbone(arch, init), num_classes, learn_upsampling)
        self.val_miou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, masks = batch
        loss = F.cross_entropy(self(images), masks, ignore_index=IGNORE_INDEX)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, masks = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX), sync_dist=True)
        self.val_miou.update(logits.argmax(1), masks)
        self.log("val/miou", self.val_miou, prog_bar=True)

    test_step = validation_step

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1 - step / total) ** hp.poly_power
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
