"""I-JEPA (Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture")."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock

from lightning_ssl.backbones import PooledBackbone, vit_depth, vit_parameter_groups
from lightning_ssl.callbacks import EMAUpdate
from lightning_ssl.ema import cosine_tau, ema_copy
from lightning_ssl.losses import at_least_float32
from lightning_ssl.mask_sampling import MaskSampler
from lightning_ssl.masking import MultiBlockMasks, gather_tokens, multi_block_masks
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.vit import encode_tokens, patch_grid, require_vit, sincos_2d, use_sincos_positions, vit_width

__all__ = ["IJEPA", "IJEPAPredictor", "ijepa_loss", "ijepa_targets", "ijepa_init_weights", "LOSSES"]

LOSSES = ("l2", "smooth_l1")


def ijepa_targets(patches: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """The regression targets: the target encoder's ``B x N x D`` patch tokens layer-normed over the width
    without affine parameters (src/train.py: ``h = F.layer_norm(h, (h.size(-1),))``, in float32), then the
    tokens of each of the M ``B x Kt`` target blocks, stacked block-major: ``(M * B) x Kt x D``, row
    ``m * B + b`` holding block ``m`` of image ``b`` (the code's ``apply_masks``)."""
    h = F.layer_norm(at_least_float32(patches), (patches.shape[-1],))
    return torch.cat([gather_tokens(h, t.to(h.device, non_blocking=True)) for t in targets], dim=0)


def ijepa_loss(predictions: torch.Tensor, targets: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """The mean over target patches, blocks and channels of the squared error (``"l2"``: the paper's eq. 4,
    ``1/M sum_i sum_{j in B_i} ||s_hat_j - s_j||^2``, up to the constant factor ``1 / (|B_i| D)``) or of
    ``F.smooth_l1_loss`` with ``beta = 1`` (``"smooth_l1"``: what src/train.py's ``loss_fn`` computes). In
    float32 whatever the inputs' precision."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
    p, t = at_least_float32(predictions), at_least_float32(targets)
    if loss == "l2":
        return (p - t).pow(2).mean()
    return F.smooth_l1_loss(p, t)


@torch.no_grad()
def ijepa_init_weights(module: nn.Module) -> nn.Module:
    """The initialization the paper's code ends with, in place: every ``nn.Linear`` and ``nn.Conv2d`` (the patch
    embedding) a truncated-normal weight (std 0.02, cut at +-2) and a zero bias, every ``nn.LayerNorm`` weight 1
    and bias 0; the fused query/key/value projection of ``nn.MultiheadAttention`` (torchvision's attention,
    timm's ``qkv`` linear layer) the same as a linear layer. In the code, ``init_model`` of src/helper.py
    re-initializes every linear layer after the models' constructors, which undoes their ``fix_init_weight``
    rescaling of the residual projections, so none is applied here. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)
    return module


class IJEPAPredictor(nn.Module):
    """I-JEPA's predictor (``VisionTransformerPredictor`` of src/models/vision_transformer.py): a narrow ViT
    that embeds the context encoder's tokens linearly to ``predictor_dim``, adds their fixed 2-D sin-cos
    position embeddings (``vit.sincos_2d`` of the image's patch grid), appends for each target block one
    learned mask token plus the sin-cos embedding of every target position, runs ``depth`` pre-norm
    transformer blocks (torchvision's ``EncoderBlock``: MLP ratio 4, GELU, LayerNorm eps 1e-6, biased qkv as
    the code's ``qkv_bias=True``), a LayerNorm, and projects the target positions back to ``embed_dim``.

    The M target blocks run as one batch of ``M * B`` sequences (the context repeated block-major, the
    code's ``x.repeat(len(masks), 1, 1)``), so each block is predicted from the context alone. Initialized
    as the code ends up (``ijepa_init_weights``; the mask token truncated normal, std 0.02).
    """

    def __init__(
        self,
        embed_dim: int,
        predictor_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if predictor_dim % 4:
            raise ValueError(f"predictor_dim must be a multiple of 4 (2-D sin-cos positions), got {predictor_dim}")
        if num_heads < 1 or predictor_dim % num_heads:
            raise ValueError(f"predictor_dim={predictor_dim} must be a multiple of num_heads={num_heads} (>= 1)")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.predictor_dim = predictor_dim
        self.embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_dim))
        mlp_dim = int(predictor_dim * mlp_ratio)
        blocks = [EncoderBlock(num_heads, predictor_dim, mlp_dim, 0.0, 0.0, norm) for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm(predictor_dim)
        self.proj = nn.Linear(predictor_dim, embed_dim)
        self._positions: dict[tuple, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The code's initialization (``ijepa_init_weights``) and a truncated-normal (std 0.02) mask token."""
        ijepa_init_weights(self)
        with torch.no_grad():
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def positions(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """``N x predictor_dim`` fixed sin-cos embeddings of the ``rows x cols`` grid (cached per grid and device)."""
        key = (tuple(grid), str(device))
        if key not in self._positions:
            self._positions[key] = sincos_2d(self.predictor_dim, tuple(grid)).to(device)
        return self._positions[key]

    def forward(
        self,
        context: torch.Tensor,
        context_index: torch.Tensor,
        target_indices: Sequence[torch.Tensor],
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """Predictions ``(M * B) x Kt x embed_dim`` for the M target blocks (each ``B x Kt`` patch indices),
        row ``m * B + b`` for block ``m`` of image ``b``, from the ``B x Kc x embed_dim`` context tokens at
        the ``B x Kc`` patch indices ``context_index`` of a ``grid`` of patches."""
        if context.ndim != 3 or context_index.shape != context.shape[:2]:
            raise ValueError(
                f"context must be B x Kc x D and context_index B x Kc, got {tuple(context.shape)} and "
                f"{tuple(context_index.shape)}"
            )
        if not target_indices:
            raise ValueError("target_indices must hold at least one B x Kt block of patch indices")
        batch, kc = context_index.shape
        for t in target_indices:
            if t.ndim != 2 or t.shape != target_indices[0].shape or t.shape[0] != batch:
                raise ValueError(
                    f"every target block must be B x Kt with B = {batch} and one Kt, got "
                    f"{[tuple(t.shape) for t in target_indices]}"
                )
        pos = self.positions(grid, context.device)
        context_index = context_index.to(context.device, non_blocking=True)
        targets = torch.cat([t.to(context.device, non_blocking=True) for t in target_indices], dim=0)
        x = self.embed(context) + pos[context_index]
        queries = self.mask_token + pos[targets]
        x = torch.cat([x.repeat(len(target_indices), 1, 1), queries.to(x.dtype)], dim=1)
        x = self.norm(self.blocks(x))
        return self.proj(x[:, kc:])


def _encoder_heads(backbone: nn.Module) -> int:
    inner = backbone.module if isinstance(backbone, PooledBackbone) else backbone
    if isinstance(inner, torchvision.models.VisionTransformer):
        return int(inner.encoder.layers[0].self_attention.num_heads)
    return int(inner.blocks[0].attn.num_heads)


def _native_grid(backbone: nn.Module) -> tuple[int, int] | None:
    """The patch grid the ViT was built for (``None`` where it does not say)."""
    inner = backbone.module if isinstance(backbone, PooledBackbone) else backbone
    if isinstance(inner, torchvision.models.VisionTransformer):
        side = inner.image_size // inner.patch_size
        return side, side
    grid = getattr(getattr(inner, "patch_embed", None), "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


class IJEPA(SSLMethod):
    """I-JEPA: from one context block of an image, a predictor regresses the representations that an EMA
    target encoder gives to several target blocks of the same image, in representation space (no pixels,
    no augmented views).

    Per batch (sec. 3; src/train.py, src/masks/multiblock.py): ``masking.multi_block_masks`` draws 4 target
    blocks (scale 0.15-0.2, aspect ratio 0.75-1.5) and one context block (scale 0.85-1, aspect ratio 1) from
    which the target patches are removed (``allow_overlap: false``), with ``min_keep: 10``; the target
    encoder (EMA of the context encoder, no gradient) runs on all patches, its patch tokens are layer-normed
    without affine parameters and the target blocks gathered (``ijepa_targets``); the context encoder (the
    backbone) runs on the context patches only (``vit.encode_tokens(..., keep=context)``); the predictor
    (``IJEPAPredictor``) predicts each target block from the context; the loss (``ijepa_loss``) is the
    paper's L2, averaged over target patches and blocks (``loss="smooth_l1"``: the code's
    ``F.smooth_l1_loss``). Only patch tokens enter: a torchvision ViT's class token is carried through the
    encoders (``encode_tokens`` prepends it) but never predicted nor regressed, and the paper's ViTs have none.
    Fixed 2-D sin-cos position embeddings in the encoders (``vit.use_sincos_positions``) and the predictor.
    The masks of the global batch are drawn on the CPU by a ``MaskSampler`` (seeded from the epoch and batch
    index; its seed is in the state dict), so 1 or N processes and a resumed run draw the same ones; the
    contexts are cut to the shortest of the global batch (the code cuts to the shortest of each GPU's 128).
    Only the first view of a batch is used (the ``ijepa`` augmentation: crop 0.3-1, no flip; further views
    the datamodule makes are ignored).

    Defaults: ``in1k_vith14_ep300.yaml`` of the paper's code unless said: AdamW; lr 0.001 at the
    global batch 2048, i.e. ``base_lr`` 1.25e-4 for 256 under the linear scaling rule, reached from
    ``start_lr`` 0.0002 (``warmup_start_lr`` 2.5e-5 here) after 40 linear warmup epochs, then a cosine to
    ``final_lr`` 1e-6 (1.25e-7 here); weight decay 0.04 -> 0.4 on a cosine over all steps (weights only:
    biases and 1-d parameters get none, the code's ``init_opt``); target EMA 0.996 -> 1.0 linearly over all
    optimizer steps (``ema: [0.996, 1.0]``; ``linear_ema_tau``); 300 epochs, bf16. The backbone
    ``vit_b_16`` and the predictor (width 384, depth 6, the encoder's number of heads) are the defaults of
    the code's ``init_model`` (``model_name='vit_base'``, patch 16, ``pred_depth=6``, ``pred_emb_dim=384``);
    the paper's ViT-H/14 recipe has a predictor of depth 12 (``configs/ijepa_imagenet.yaml``). Encoder and
    predictor start from the code's final initialization (``ijepa_init_weights``).

    Args (the shared ones are ``SSLMethod``'s):
        predictor_dim, predictor_depth: the predictor's width and number of blocks.
        predictor_heads: its attention heads (``None``: the encoder's, as the code's ``num_heads``).
        num_targets, target_scale, target_aspect: the target blocks (``multi_block_masks``).
        context_scale: the context block's scale (aspect ratio 1, as in the code).
        min_keep: the fewest context patches a context placement may keep (``multi_block_masks``).
        allow_overlap: keep the target patches in the context (off in the paper).
        loss: ``"l2"`` (the paper) or ``"smooth_l1"`` (the code).
        ema_tau, ema_tau_final: the target encoder's EMA rate at the first and last update (linear between).
        weight_decay_final: the weight decay at the last step (cosine from ``weight_decay``).
        warmup_start_lr: the lr at the start of the warmup (the code's ``start_lr``), in the units of the
            peak: scaled by the global batch like ``base_lr``, or as it is when ``lr`` is given; 0 is the
            library's warmup from zero.
        evaluate: the representation (kNN monitor, ``validate``, ``predict``, ``export``, ``load_encoder``):
            the mean of the ``"target"`` encoder's patch tokens (the paper's evaluation) or of the
            ``"context"`` encoder's.
        ijepa_init: re-initialize the encoder as the code does (``ijepa_init_weights``; off: keep the
            backbone's own initialization).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_b_16",
        predictor_dim: int = 384,
        predictor_depth: int = 6,
        predictor_heads: int | None = None,
        num_targets: int = 4,
        target_scale: Sequence[float] = (0.15, 0.2),
        target_aspect: Sequence[float] = (0.75, 1.5),
        context_scale: Sequence[float] = (0.85, 1.0),
        min_keep: int = 10,
        allow_overlap: bool = False,
        loss: str = "l2",
        ema_tau: float = 0.996,
        ema_tau_final: float = 1.0,
        optimizer: str = "adamw",
        base_lr: float = 1.25e-4,
        warmup_start_lr: float = 2.5e-5,
        final_lr: float = 1.25e-7,
        weight_decay: float = 0.04,
        weight_decay_final: float = 0.4,
        warmup_epochs: float = 40,
        evaluate: str = "target",
        ijepa_init: bool = True,
        **kwargs: Any,
    ):
        super().__init__(
            backbone,
            optimizer=optimizer,
            base_lr=base_lr,
            final_lr=final_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            **kwargs,
        )
        require_vit(self.backbone, "I-JEPA")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
        if not 0.0 <= ema_tau <= ema_tau_final <= 1.0:
            raise ValueError(f"need 0 <= ema_tau <= ema_tau_final <= 1, got {ema_tau} and {ema_tau_final}")
        if weight_decay_final < 0:
            raise ValueError(f"weight_decay_final must be >= 0, got {weight_decay_final}")
        peak = self.optim_config["lr"] if self.optim_config["lr"] is not None else base_lr
        if not 0.0 <= warmup_start_lr <= peak:
            name = "lr" if self.optim_config["lr"] is not None else "base_lr"
            raise ValueError(f"warmup_start_lr must lie in [0, {name}={peak}], got {warmup_start_lr}")
        if evaluate not in ("target", "context"):
            raise ValueError(f"evaluate must be 'target' or 'context', got {evaluate!r}")
        self.mask_config = dict(
            num_targets=num_targets,
            target_scale=tuple(target_scale),
            target_aspect=tuple(target_aspect),
            context_scale=tuple(context_scale),
            min_keep=min_keep,
            allow_overlap=allow_overlap,
        )
        grid = _native_grid(self.backbone)
        if grid is not None:  # the arguments against the ViT's own grid, without touching the global generator
            self._draw_masks(1, grid, torch.Generator().manual_seed(0))
        self.loss_name = loss
        self.ema_tau, self.ema_tau_final = ema_tau, ema_tau_final
        self.weight_decay_range = (weight_decay, weight_decay_final)
        self.warmup_start_lr = warmup_start_lr
        self.evaluate = evaluate
        self.ijepa_init = ijepa_init
        self.prepare_backbone(self.backbone)
        heads = _encoder_heads(self.backbone) if predictor_heads is None else predictor_heads
        if heads < 1 or predictor_dim % heads:
            source = "the encoder's number of heads" if predictor_heads is None else "predictor_heads"
            raise ValueError(
                f"predictor_dim={predictor_dim} must be a multiple of predictor_heads={heads} ({source}): "
                "change predictor_dim or set predictor_heads"
            )
        self.predictor = IJEPAPredictor(vit_width(self.backbone), predictor_dim, predictor_depth, heads)
        self.backbone_ema = ema_copy(self.backbone)
        self.mask_sampler = MaskSampler()
        self._decay_groups: list[int] = []

    # ----------------------------------------------------------------- masks and the step
    def _draw_masks(self, batch: int, grid: tuple[int, int], generator: torch.Generator | None) -> MultiBlockMasks:
        cfg = self.mask_config
        return multi_block_masks(
            batch,
            grid,
            num_targets=cfg["num_targets"],
            target_scale=cfg["target_scale"],
            target_aspect=cfg["target_aspect"],
            context_scale=cfg["context_scale"],
            context_aspect=(1.0, 1.0),
            min_keep=cfg["min_keep"],
            allow_overlap=cfg["allow_overlap"],
            generator=generator,
        )

    def sample_masks(self, batch: int, grid: tuple[int, int], epoch: int = 0, batch_idx: int = 0) -> MultiBlockMasks:
        """The multi-block masks (on the CPU) of this process's ``batch`` images at ``(epoch, batch_idx)``: its
        rows of the global batch's masks, drawn by the method's ``MaskSampler`` (the same on 1 or N processes
        and on resume)."""
        draw = lambda n, generator: self._draw_masks(n, grid, generator)
        return self.mask_sampler.sample(draw, batch, epoch, batch_idx)

    def training_step(self, batch, batch_idx):
        views, _ = batch
        if not views:
            raise ValueError("I-JEPA needs one view per batch (augmentation 'ijepa'), got none")
        images = views[0]
        grid = patch_grid(self.backbone, images.shape[-2], images.shape[-1])
        masks = self.sample_masks(images.shape[0], grid, self.current_epoch, batch_idx)
        with torch.no_grad():
            targets = ijepa_targets(encode_tokens(self.backbone_ema, images).patches, masks.targets)
        context_index = masks.context.to(images.device, non_blocking=True)
        context = encode_tokens(self.backbone, images, keep=context_index).patches
        predictions = self.predictor(context, context_index, masks.targets, grid)
        loss = ijepa_loss(predictions, targets, self.loss_name)
        self.log("train/loss", loss)
        self.log("train/context_patches", float(masks.context.shape[1]))
        self.log("train/target_patches", float(masks.targets[0].shape[1]))
        return loss

    # ----------------------------------------------------------------- representation and EMA
    def representation(self, images: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """The mean of the patch tokens of the target encoder (``evaluate="context"``: the context encoder's),
        or of ``backbone``: the paper's average-pooled evaluation of the target encoder."""
        if backbone is None:
            backbone = self.backbone_ema if self.evaluate == "target" else self.backbone
        return encode_tokens(backbone, images).mean_patches()

    def encoder_spec(self) -> dict:
        """``SSLMethod.encoder_spec`` with mean-pooled patch tokens and the evaluated encoder's checkpoint entries."""
        prefix = "backbone_ema." if self.evaluate == "target" else "backbone."
        return {**super().encoder_spec(), "pool": "mean", "state_prefix": prefix}

    def prepare_backbone(self, module: nn.Module) -> nn.Module:
        """The code's initialization (``ijepa_init_weights``, with ``ijepa_init``) and fixed sin-cos positions."""
        if self.ijepa_init:
            ijepa_init_weights(module)
        return use_sincos_positions(module)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_ema)]

    def configure_callbacks(self):
        """The base callbacks and an ``EMAUpdate`` whose rate follows I-JEPA's linear schedule
        (``ema.linear_ema_tau``)."""
        return [*super().configure_callbacks(), EMAUpdate(self.ema_tau, self.ema_tau_final, schedule="linear")]

    # ----------------------------------------------------------------- optimization
    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """``vit_parameter_groups`` with the code's rule (``init_opt``): no weight decay on biases and 1-d
        parameters only, so the predictor's mask token and a class token are decayed (the fixed position
        embeddings are not trained)."""
        if vit_depth(self.backbone) is not None:
            return vit_parameter_groups(self, self.backbone, weight_decay, self.layer_decay, decay_tokens=True)
        return super().parameter_groups(weight_decay)

    def optimizer_and_schedule(self, global_batch_size, total_steps, warmup_steps):
        """``SSLMethod.optimizer_and_schedule`` with the warmup starting at ``warmup_start_lr`` instead of 0:
        ``lr_k = start + (peak - start) (k + 1) / warmup_steps`` during the warmup (``WarmupCosineSchedule``
        of src/utils/schedulers.py), the base's cosine after it."""
        optimizer, scheduler = super().optimizer_and_schedule(global_batch_size, total_steps, warmup_steps)
        cfg = self.optim_config
        start = self.warmup_start_lr / (cfg["lr"] if cfg["lr"] is not None else cfg["base_lr"])
        if start == 0 or warmup_steps == 0:
            return optimizer, scheduler

        def from_start(base):
            return lambda step: start + (1.0 - start) * base(step) if step < warmup_steps else base(step)

        # A second LambdaLR on the optimizer: the groups keep the peak lr as their initial_lr
        lambdas = [from_start(base) for base in scheduler.lr_lambdas]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    def configure_optimizers(self):
        config = super().configure_optimizers()
        groups = config["optimizer"].param_groups
        self._decay_groups = [i for i, g in enumerate(groups) if g["weight_decay"] > 0]
        return config

    def weight_decay_at(self, step: int, total_steps: int) -> float:
        """Weight decay after ``step`` of ``total_steps``: cosine from ``weight_decay`` to ``weight_decay_final``
        (the code's ``CosineWDSchedule``)."""
        return cosine_tau(step, total_steps, *self.weight_decay_range)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Sets this step's weight decay on the decayed groups (derived from the trainer's step: exact on resume)."""
        wd = self.weight_decay_at(self.global_step, int(self.trainer.estimated_stepping_batches))
        optimizer = self.trainer.optimizers[0]
        for i in self._decay_groups:
            optimizer.param_groups[i]["weight_decay"] = wd
