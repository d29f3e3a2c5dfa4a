"""Contrastive Predictive Coding for images: CPC v1 (Oord et al. 2018, "Representation Learning with
Contrastive Predictive Coding", sec. 3.3) and CPC v2 (Henaff et al. 2019, "Data-Efficient Image
Recognition with Contrastive Predictive Coding")."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_ssl.backbones import batch_norm_to_layer_norm
from lightning_ssl.context import ContextNetwork
from lightning_ssl.losses import cpc_info_nce
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.patches import PatchGridEncoder, augment_patches, encode_patches, extract_patches

__all__ = ["CPC", "CPCv2"]


class CPC(SSLMethod):
    """CPC v1: an encoder on a grid of overlapping patches, a causal context network over rows, and
    InfoNCE on predictions of the patch vectors ``first_step .. prediction_steps`` rows below.

    Each image is cut into a grid of ``patch_size`` patches every ``patch_stride`` pixels (paper:
    256x256 images, 7x7 grid of 64x64 patches, stride 32; for 32x32 images 8x8 patches, stride 4).
    The backbone, mean-pooled, maps every patch to a vector, linearly projected to ``embedding_dim``
    (paper: 1024) when given, forming z (``B x D x 7 x 7``). A PixelCNN-style network
    (``ContextNetwork``) gives contexts c that see rows ``<= i``; ``W_k c_ij`` predicts
    ``z_{i+k, j}`` for k in ``first_step .. prediction_steps`` against every other patch of the
    batch as negatives (``cpc_info_nce``).

    Prediction offsets: Oord et al. (sec. 3.3) predict "up to five rows" and give no offset. At half
    overlap (stride = patch / 2) the row right below (k = 1) shares half its pixels with the context's
    own row, so part of the target is visible to the context; Greedy InfoMax's CPC loss (Loewe et al.
    2019) therefore predicts five rows starting at the next-but-one, k = 2..6, and so do we by default
    (``first_step=2, prediction_steps=6``; ``first_step=1`` gives the adjacent row back). ``CPCv2``
    uses Henaff et al.'s offsets.

    Optimization: the papers use Adam; defaults here are AdamW with lr 2e-4 for a global batch of
    256 (``base_lr``, scaled linearly; pass ``lr`` to fix it), no weight decay, constant schedule.

    Evaluation features (``representation``) are the frozen backbone's patch features averaged over
    the grid (before the projection), for this backbone or a ``random_init_backbone()``; exported and
    loaded encoders (``lightning_ssl.evaluation``) compute the same.

    Args beyond ``SSLMethod``'s:
        patch_size, patch_stride: the grid; ``grid_size`` optionally requires a square grid of that
            many rows (images must then have side ``(grid_size - 1) * patch_stride + patch_size``).
        embedding_dim: width of z; ``None`` uses the backbone's features directly.
        context_hidden_dim, context_blocks, context_kernel_size: the context network.
        prediction_steps, first_step: the offsets k predicted, ``first_step .. prediction_steps``.
        bidirectional: also predict bottom-up with a second context network and predictors (v2).
        horizontal: also predict left-to-right and right-to-left, each with its own context network
            and predictors (v2: four directions in all with ``bidirectional``). The loss is the mean
            over the directions.
        encoder_norm: ``"batch"`` keeps the backbone's batch norm; ``"layer"`` turns every
            ``BatchNorm2d`` of a torchvision backbone into ``GroupNorm(1, C)`` (v2). A module passed
            as ``backbone`` is used as given.
        patch_augment, patch_crop_fraction, flip_prob, color_drop_prob: per-patch augmentation
            in training mode (v2; see ``augment_patches``).
        gather_distributed: negatives from every process in a distributed run.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        patch_size: int = 64,
        patch_stride: int = 32,
        grid_size: int | None = None,
        embedding_dim: int | None = 1024,
        context_hidden_dim: int = 256,
        context_blocks: int = 5,
        context_kernel_size: int = 3,
        prediction_steps: int = 6,
        first_step: int = 2,
        bidirectional: bool = False,
        horizontal: bool = False,
        encoder_norm: str = "batch",
        patch_augment: bool = False,
        patch_crop_fraction: float = 0.875,
        flip_prob: float = 0.5,
        color_drop_prob: float = 0.5,
        gather_distributed: bool = True,
        optimizer: str = "adamw",
        base_lr: float = 2e-4,
        schedule: str = "constant",
        **kwargs,
    ):
        super().__init__(backbone, optimizer=optimizer, base_lr=base_lr, schedule=schedule, **kwargs)
        if encoder_norm not in ("batch", "layer"):
            raise ValueError(f"encoder_norm must be 'batch' or 'layer', got {encoder_norm!r}")
        if not 1 <= first_step <= prediction_steps:
            raise ValueError(
                f"need 1 <= first_step <= prediction_steps, got first_step={first_step}, "
                f"prediction_steps={prediction_steps}"
            )
        if grid_size is not None and grid_size <= prediction_steps:
            raise ValueError(
                f"a grid of {grid_size} rows cannot predict {prediction_steps} rows below; "
                f"use prediction_steps <= {grid_size - 1}"
            )
        self.patch_size, self.patch_stride, self.grid_size = patch_size, patch_stride, grid_size
        self.steps = list(range(first_step, prediction_steps + 1))
        self.bidirectional, self.horizontal = bidirectional, horizontal
        self.directions = ["top_down"] + ["bottom_up"] * bidirectional + ["left_right", "right_left"] * horizontal
        self.encoder_norm = encoder_norm
        self.patch_augment = patch_augment
        self.patch_crop_fraction, self.flip_prob, self.color_drop_prob = patch_crop_fraction, flip_prob, color_drop_prob
        self.gather_distributed = gather_distributed
        if encoder_norm == "layer":
            if isinstance(backbone, str):
                batch_norm_to_layer_norm(self.backbone)
            elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.backbone.modules()):
                rank_zero_warn(
                    "encoder_norm='layer' converts the batch norm of torchvision backbones only; the module "
                    "you passed keeps its batch norm layers. Build it with GroupNorm(1, C) for CPC v2."
                )
        dim = embedding_dim or self.feature_dim
        self.projector = nn.Linear(self.feature_dim, dim) if embedding_dim else nn.Identity()
        self.embedding_dim = dim
        context = lambda: ContextNetwork(dim, context_hidden_dim, context_blocks, context_kernel_size)  # noqa: E731
        # W_k for every k at once: one 1x1 convolution with len(steps) x D outputs.
        predictor = lambda: nn.Conv2d(dim, len(self.steps) * dim, 1, bias=False)  # noqa: E731
        self.context, self.predictor = context(), predictor()
        if bidirectional:
            self.context_up, self.predictor_up = context(), predictor()
        if horizontal:
            self.context_left, self.predictor_left = context(), predictor()  # left to right
            self.context_right, self.predictor_right = context(), predictor()  # right to left

    # ----------------------------------------------------------------- representation
    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``B x rows x cols x C x P x P`` patch grid of ``images``."""
        return extract_patches(images, self.patch_size, self.patch_stride, self.grid_size)

    def representation(self, images: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """Backbone features of the patch grid averaged over the grid: ``B x feature_dim``."""
        backbone = self.backbone if backbone is None else backbone
        return PatchGridEncoder(backbone, self.patch_size, self.patch_stride, self.grid_size)(images)

    def encoder_spec(self) -> dict:
        spec = super().encoder_spec()
        spec["layer_norm"] = self.encoder_norm == "layer" and isinstance(self.hparams.get("backbone"), str)
        spec["patch_grid"] = {
            "patch_size": self.patch_size,
            "patch_stride": self.patch_stride,
            "grid_size": self.grid_size,
        }
        return spec

    def random_init_backbone(
        self, seed: int = 0, calibrate_on: Iterable | None = None, max_images: int | None = 5000
    ) -> nn.Module:
        if self.encoder_norm == "layer" and isinstance(self.hparams.get("backbone"), str):
            # CPC v2's layer norm has no running statistics: nothing to calibrate
            return batch_norm_to_layer_norm(super().random_init_backbone(seed)).to(self.device, self.dtype)
        return super().random_init_backbone(seed, calibrate_on, max_images)

    # ----------------------------------------------------------------------- training
    def _direction_loss(self, z: torch.Tensor, context: nn.Module, predictor: nn.Module) -> torch.Tensor:
        b, d, rows, cols = z.shape
        predictions = predictor(context(z)).view(b, len(self.steps), d, rows, cols)
        return cpc_info_nce(predictions, z, self.steps, gather=self.gather_distributed)

    def _direction(self, z: torch.Tensor, direction: str) -> tuple[torch.Tensor, nn.Module, nn.Module]:
        """``z`` turned so that ``direction`` runs down the rows, with that direction's networks."""
        if direction == "top_down":
            return z, self.context, self.predictor
        if direction == "bottom_up":
            return z.flip(2), self.context_up, self.predictor_up
        if direction == "left_right":
            return z.transpose(2, 3), self.context_left, self.predictor_left
        return z.transpose(2, 3).flip(2), self.context_right, self.predictor_right

    def loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """CPC losses of a batch of images: ``"loss"`` (the mean over directions) and one per direction
        (``"top_down"``, and ``"bottom_up"``, ``"left_right"``, ``"right_left"`` when enabled)."""
        patches = self.patches(images)
        b, rows, cols = patches.shape[:3]
        if min(rows, cols) <= self.steps[-1] and (self.horizontal or rows <= self.steps[-1]):
            raise ValueError(
                f"images of {images.shape[2]}x{images.shape[3]} give a {rows}x{cols} grid of patches, too small to "
                f"predict {self.steps[-1]} patches ahead; use larger images, a smaller patch_stride or fewer "
                "prediction_steps"
            )
        if self.patch_augment and self.training:
            flat = patches.reshape(b * rows * cols, *patches.shape[3:])
            flat = augment_patches(flat, self.patch_crop_fraction, self.flip_prob, self.color_drop_prob)
            patches = flat.view(patches.shape)
        z = self.projector(encode_patches(patches, self.backbone)).permute(0, 3, 1, 2)  # B x D x rows x cols
        out = {direction: self._direction_loss(*self._direction(z, direction)) for direction in self.directions}
        out["loss"] = sum(out[d] for d in self.directions) / len(self.directions)
        return out

    def training_step(self, batch, batch_idx):
        views, _ = batch
        images = views[0] if isinstance(views, (list, tuple)) else views
        losses = self.loss(images)
        if len(self.directions) > 1:
            for direction in self.directions:
                self.log(f"train/loss_{direction}", losses[direction])
        self.log("train/loss", losses["loss"])  # no prog_bar: Lightning would .item() it (a host sync) every step
        return losses["loss"]


class CPCv2(CPC):
    """CPC v2 (Henaff et al. 2019): CPC with layer norm instead of batch norm in the encoder,
    per-patch augmentation (random crops inside each patch, flips, color dropping) and predictions
    in four directions, top-down, bottom-up and both horizontal ones (sec. 4.1, "BU" and "HP"; the
    loss is their mean). The offset: the paper's pseudo-code (appendix, Algorithm 1:
    ``steps_to_ignore=2, steps_to_predict=3``) predicts the patch three rows ahead only, the first two
    (overlapping and touching) skipped: ``first_step=3, prediction_steps=3``. Every other argument and
    default is ``CPC``'s.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        prediction_steps: int = 3,
        first_step: int = 3,
        bidirectional: bool = True,
        horizontal: bool = True,
        encoder_norm: str = "layer",
        patch_augment: bool = True,
        **kwargs,
    ):
        super().__init__(
            backbone,
            prediction_steps=prediction_steps,
            first_step=first_step,
            bidirectional=bidirectional,
            horizontal=horizontal,
            encoder_norm=encoder_norm,
            patch_augment=patch_augment,
            **kwargs,
        )
