"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

A ViT encoder sees a random 25% of the patches of each image; a lightweight decoder gets the encoded
visible patches and a shared learned mask token at every removed position, and predicts the pixels of
every patch; the loss is the mean squared error on the removed patches only, against per-patch
normalized pixels (``norm_pix_loss``). The paper's code is ``models_mae.py`` / ``main_pretrain.py`` of
facebookresearch/mae; what is taken from it is said where it is used.
"""

from __future__ import annotations

from functools import partial

import torch
import torchvision
from torch import nn

from lightning_ssl.backbones import PooledBackbone, vit_parameter_groups
from lightning_ssl.losses import at_least_float32
from lightning_ssl.mask_sampling import MaskSampler
from lightning_ssl.masking import RandomMask, random_masking, restore_tokens
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.vit import (
    Tokens,
    encode_tokens,
    patch_grid,
    patch_projection,
    patchify,
    require_vit,
    sincos_2d,
    unpatchify,
    use_sincos_positions,
    vit_patch_size,
    vit_width,
)

__all__ = ["MAE", "MAEDecoder", "mae_init_weights", "norm_pix_target", "mae_patch_errors", "mae_loss"]

NORM_PIX_EPS = 1e-6  # models_mae.py forward_loss: (var + 1.e-6) ** .5


# ----------------------------------------------------------------------------- the loss
def norm_pix_target(target: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """MAE's per-patch normalized pixels (``norm_pix_loss``; paper sec. 4, "Reconstruction target"): each
    patch ``t`` (last dimension) becomes ``(t - mean(t)) / (var(t) + eps) ** 0.5``. The variance is the
    unbiased one (divides by ``P - 1``), as ``target.var(dim=-1, keepdim=True)`` in ``forward_loss`` of
    models_mae.py."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def mae_patch_errors(
    pred: torch.Tensor, images: torch.Tensor, patch_size: int, norm_pix_loss: bool = True, eps: float = NORM_PIX_EPS
) -> torch.Tensor:
    """``B x N``: the mean squared error of each patch's prediction (``pred``, ``B x N x (p * p * C)`` in
    ``vit.patchify``'s pixel order) against the pixels of ``images`` (``B x C x H x W``), per-patch
    normalized when ``norm_pix_loss``; in float32."""
    target = patchify(at_least_float32(images), patch_size)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"pred must be B x N x (p * p * C) = {tuple(target.shape)} for images of shape {tuple(images.shape)} "
            f"and {patch_size}x{patch_size} patches, got {tuple(pred.shape)}"
        )
    if norm_pix_loss:
        target = norm_pix_target(target, eps)
    return (at_least_float32(pred) - target).pow(2).mean(dim=-1)


def _masked_mean(errors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(errors.dtype)
    return (errors * weights).sum() / weights.sum()


def mae_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = True,
    eps: float = NORM_PIX_EPS,
) -> torch.Tensor:
    """MAE's loss (``forward_loss`` of models_mae.py): the per-patch mean squared error
    (``mae_patch_errors``) averaged over the removed patches, ``mask`` (``B x N``, True or 1 = removed),
    over the whole batch: ``sum(errors * mask) / sum(mask)``. Visible patches do not count."""
    if tuple(mask.shape) != tuple(pred.shape[:2]):
        raise ValueError(f"mask must be B x N = {tuple(pred.shape[:2])} like pred, got {tuple(mask.shape)}")
    return _masked_mean(mae_patch_errors(pred, images, patch_size, norm_pix_loss, eps), mask)


# ----------------------------------------------------------------------------- initialization
@torch.no_grad()
def mae_init_weights(module: nn.Module) -> nn.Module:
    """MAE's ``_init_weights`` (models_mae.py, "following official JAX ViT"), in place: every ``nn.Linear``
    gets a Xavier-uniform weight and a zero bias, every ``nn.LayerNorm`` weight 1 and bias 0. The fused
    query/key/value projection of ``nn.MultiheadAttention`` (torchvision's attention, a ``3D x D`` matrix
    like timm's ``qkv`` linear layer) gets the same. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            nn.init.xavier_uniform_(m.in_proj_weight)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)
    return module


@torch.no_grad()
def _init_encoder(backbone: nn.Module) -> None:
    """MAE's ``initialize_weights`` on the encoder: ``mae_init_weights``, the patch projection initialized
    like a linear layer (Xavier-uniform on its ``D x (p * p * C)`` view; its bias untouched, as the code),
    the class token N(0, 0.02)."""
    mae_init_weights(backbone)
    weight = patch_projection(backbone).weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    inner = backbone.module if isinstance(backbone, PooledBackbone) else backbone
    torchvision_vit = isinstance(inner, torchvision.models.VisionTransformer)
    cls = inner.class_token if torchvision_vit else getattr(inner, "cls_token", None)
    if cls is not None:
        nn.init.normal_(cls, std=0.02)


# ----------------------------------------------------------------------------- the decoder
class MAEDecoder(nn.Module):
    """MAE's decoder (``forward_decoder`` of models_mae.py): a linear embedding from the encoder's width to
    ``dim``, a learned mask token (N(0, 0.02)) at each removed patch, tokens unshuffled to patch order, fixed
    2-D sin-cos position embeddings (zeros at the class token), ``depth`` pre-norm transformer blocks
    (``heads`` heads, MLP ratio ``mlp_ratio``, torchvision's ``EncoderBlock``, LayerNorm eps 1e-6 as the
    code's ``mae_vit_*`` models), a LayerNorm and a linear prediction of the ``p * p * channels`` pixels of
    each patch. The class token, when the encoder has one, goes through the decoder too and its output is
    dropped (as the code). The code's models: ``dim=512``, ``depth=8``, ``heads=16``, ``mlp_ratio=4``.

    The position table follows the patch grid of each call (``sincos_2d`` of that grid, cached in a
    non-persistent buffer: not in the state dict, so a decoder trained at one size loads at any other).
    """

    def __init__(
        self,
        encoder_dim: int,
        patch_size: int,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        channels: int = 3,
    ):
        super().__init__()
        for name, value in (("encoder_dim", encoder_dim), ("patch_size", patch_size), ("channels", channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dim < 4 or dim % 4:
            raise ValueError(f"decoder dim must be a positive multiple of 4 (2-D sin-cos positions), got {dim}")
        if depth < 1:
            raise ValueError(f"decoder depth must be >= 1 (transformer blocks), got {depth}")
        if heads < 1 or dim % heads:
            raise ValueError(f"decoder heads must be >= 1 and divide the decoder dim {dim}, got {heads}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.dim, self.patch_size, self.channels = dim, patch_size, channels
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(
            *(
                torchvision.models.vision_transformer.EncoderBlock(heads, dim, int(dim * mlp_ratio), 0.0, 0.0, norm)
                for _ in range(depth)
            )
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * channels)
        self.register_buffer("positions", torch.zeros(0, dim), persistent=False)
        self._positions_for: tuple[tuple[int, int], bool] | None = None
        mae_init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def position_table(self, grid: tuple[int, int], cls_token: bool, device: torch.device) -> torch.Tensor:
        """``([1 +] rows * cols) x dim``: ``sincos_2d`` of ``grid`` (a zero row first with ``cls_token``)."""
        key = (tuple(grid), cls_token)
        if self._positions_for != key or self.positions.device != device:
            self.positions = sincos_2d(self.dim, key[0], cls_token=cls_token).to(device, self.mask_token.dtype)
            self._positions_for = key
        return self.positions

    def forward(self, tokens: Tokens, restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``B x N x (p * p * channels)`` pixel predictions of every patch, in patch order, from the encoder's
        ``tokens`` of the kept patches (``B x K x D``, in the order of ``RandomMask.keep``) and the
        ``B x N`` unshuffle ``restore`` on the ``rows x cols`` ``grid``."""
        n = grid[0] * grid[1]
        if restore.ndim != 2 or restore.shape[1] != n:
            raise ValueError(
                f"restore must be B x N with N = {n} patches of the {grid} grid, got {tuple(restore.shape)}"
            )
        has_cls = tokens.cls is not None
        x = torch.cat([tokens.cls.unsqueeze(1), tokens.patches], dim=1) if has_cls else tokens.patches
        x = self.embed(x)
        cls, patches = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
        b, k, _ = patches.shape
        if k > n:
            raise ValueError(f"got {k} encoded patches for a grid of {n}")
        filler = self.mask_token.to(patches.dtype).expand(b, n - k, -1)
        x = restore_tokens(torch.cat([patches, filler], dim=1), restore)
        if has_cls:
            x = torch.cat([cls, x], dim=1)
        x = x + self.position_table(grid, has_cls, x.device)
        x = self.pred(self.norm(self.blocks(x)))
        return x[:, 1:] if has_cls else x


# ----------------------------------------------------------------------------- the method
class MAE(SSLMethod):
    """MAE: a ViT encoder on a random subset of the patches and a lightweight decoder that reconstructs the
    pixels of the removed ones (He et al. 2022).

    Paper defaults (sec. 3-4, appendix A.1 table 8, and the paper's code, facebookresearch/mae):
    - masking: 75% of the patches removed per image, uniformly (``mask_ratio=0.75``; ``random_masking`` of
      models_mae.py: argsort of uniform noise, ``int(N * (1 - mask_ratio))`` kept), drawn on the CPU for
      the global batch by the method's ``MaskSampler`` (``masking.random_masking``), so 1 or N processes and
      a resumed run draw the same masks;
    - encoder: the ViT (default ViT-B/16, ``vit_b_16``) on the visible patches and its class token only,
      with fixed 2-D sin-cos position embeddings (``vit.use_sincos_positions``) and, with ``mae_init``, the
      code's ``initialize_weights`` (Xavier-uniform linear layers and patch projection, zero biases, class
      token N(0, 0.02));
    - decoder (``MAEDecoder``): width 512, 8 blocks, 16 heads, MLP ratio 4 (``mae_vit_base_patch16_dec512d8b``);
    - loss: mean squared error on the removed patches only, with per-patch normalized pixel targets
      (``norm_pix_loss=True``, the paper's better target (table 1d) and PRETRAIN.md's flag; the code's
      argparse default is off). The normalization uses the unbiased variance, as the code's ``target.var``;
    - optimization: AdamW with betas (0.9, 0.95), base lr 1.5e-4 x B / 256 (the paper and PRETRAIN.md's
      ``--blr 1.5e-4``; the argparse default is 1e-3), weight decay 0.05, 40 warmup epochs, cosine decay
      to 0, batch 4096, 800 (PRETRAIN.md) or 1600 (the paper's best) epochs, no layer-wise decay. The
      code's ``optim_factory.add_weight_decay`` exempts only 1-d parameters (biases, norms) from weight
      decay, so the class and mask tokens are decayed here too; the frozen position embeddings are not
      trained. No drop path, no gradient clipping (``main_pretrain.py`` uses neither).

    MAE trains on one view of each image (the paper's single random resized crop): the first of a
    batch's views (the configs make one: ``global_crops: 1``); any others are not used. The
    representation (kNN, linear probe, export) is the mean of the encoder's patch tokens on the whole
    image, unmasked (``Tokens.mean_patches``; ``encoder_spec()["pool"] == "mean"``).

    Args (the shared ones are ``SSLMethod``'s):
        mask_ratio: the fraction of patches removed per image, in (0, 1).
        decoder_dim, decoder_depth, decoder_heads: the decoder's width, blocks and attention heads.
        norm_pix_loss: per-patch normalized pixel targets (``norm_pix_target``).
        mae_init: re-initialize the encoder as the code's ``initialize_weights`` (off: keep the backbone's
            own initialization, e.g. a module passed in with weights).
        betas: AdamW's betas (unused by the other optimizers).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_b_16",
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        mae_init: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        optimizer: str = "adamw",
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 40,
        **kwargs,
    ):
        super().__init__(
            backbone,
            optimizer=optimizer,
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            **kwargs,
        )
        require_vit(self.backbone, "MAE")
        if isinstance(mask_ratio, bool) or not 0.0 < mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio must lie in (0, 1), the fraction of patches removed (where the loss is), got {mask_ratio}"
            )
        try:
            beta1, beta2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must both lie in [0, 1), got {betas!r}")
        self.mask_ratio, self.norm_pix_loss, self.betas = float(mask_ratio), norm_pix_loss, (beta1, beta2)
        self.mae_init = mae_init
        self.prepare_backbone(self.backbone)
        self.patch_size = vit_patch_size(self.backbone)
        self.channels = patch_projection(self.backbone).in_channels
        self.decoder = MAEDecoder(
            vit_width(self.backbone), self.patch_size, decoder_dim, decoder_depth, decoder_heads, 4.0, self.channels
        )
        self.mask_sampler = MaskSampler()

    def prepare_backbone(self, module: nn.Module) -> nn.Module:
        """The code's ``initialize_weights`` (with ``mae_init``) and fixed 2-D sin-cos positions, in place."""
        if self.mae_init:
            _init_encoder(module)
        return use_sincos_positions(module)

    # ----------------------------------------------------------------- representation
    def representation(self, images: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """``B x D``: the mean of the encoder's patch tokens (after its final norm) on the whole image."""
        return encode_tokens(self.backbone if backbone is None else backbone, images).mean_patches()

    def encoder_spec(self) -> dict:
        """``SSLMethod.encoder_spec``, evaluated on the mean of the patch tokens."""
        return {**super().encoder_spec(), "pool": "mean"}

    # ----------------------------------------------------------------- the model
    def _check_images(self, images: torch.Tensor) -> tuple[int, int]:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images must be B x {self.channels} x H x W, got shape {tuple(images.shape)}")
        return patch_grid(self.backbone, images.shape[-2], images.shape[-1])

    def predict_pixels(self, images: torch.Tensor, masking: RandomMask) -> torch.Tensor:
        """``B x N x (p * p * C)``: the decoder's pixel predictions of every patch of ``images`` (normalized
        per patch if ``norm_pix_loss``) when the encoder sees the patches ``masking.keep`` only."""
        grid = self._check_images(images)
        keep = masking.keep.to(images.device, non_blocking=True)
        restore = masking.restore.to(images.device, non_blocking=True)
        return self.decoder(encode_tokens(self.backbone, images, keep=keep), restore, grid)

    def draw_masking(self, batch: int, num_patches: int, batch_idx: int | None = None) -> RandomMask:
        """MAE's random masking of ``batch`` images of ``num_patches`` patches (``masking.random_masking``):
        with ``batch_idx`` (training), this process's rows of the global batch's masks from the method's
        ``MaskSampler``; without, from torch's global generator."""
        if batch_idx is None:
            masking = random_masking(batch, num_patches, self.mask_ratio)
        else:
            draw = lambda n, g: random_masking(n, num_patches, self.mask_ratio, generator=g)  # noqa: E731
            masking = self.mask_sampler.sample(draw, batch, self.current_epoch, batch_idx)
        if masking.keep.shape[1] == num_patches:
            raise ValueError(
                f"mask_ratio={self.mask_ratio} removes no patch of {num_patches}; the loss is on removed patches"
            )
        return masking

    def training_step(self, batch, batch_idx):
        views, _ = batch
        if not isinstance(views, (list, tuple)) or not views:
            raise ValueError("MAE expects batches (views, target) with views a non-empty list of B x 3 x H x W tensors")
        images = views[0]  # one view per image, as the paper; the datamodules' other views are not used
        rows, cols = self._check_images(images)
        masking = self.draw_masking(images.shape[0], rows * cols, batch_idx)
        pred = self.predict_pixels(images, masking)
        errors = mae_patch_errors(pred, images, self.patch_size, self.norm_pix_loss)
        mask = masking.mask.to(images.device, non_blocking=True)
        loss = _masked_mean(errors, mask)
        self.log("train/loss", loss)
        self.log("train/visible_error", _masked_mean(errors.detach(), ~mask))  # not trained: a diagnostic
        return loss

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, mask)`` for plotting (the paper's figures 2-4, the code's demo notebook):
        ``B x C x H x W`` images whose visible patches are those of ``images`` and whose removed patches are
        the decoder's predictions, and the ``B x N`` bool patch mask (True = removed; a random one at
        ``mask_ratio`` unless given; each image must remove as many patches as the others and keep at
        least one). With ``norm_pix_loss`` the predictions are per-patch normalized pixels: each is mapped
        back with the mean and standard deviation of the true patch (information the model does not have,
        as usual for such figures; train with ``norm_pix_loss=False`` for an unaided reconstruction). The
        pixels are in the space of ``images`` (normalized as the model saw them). A pixel mask for plotting:
        ``vit.unpatchify(mask[..., None].expand(-1, -1, p * p * C).float(), p, grid)``."""
        rows, cols = self._check_images(images)
        n = rows * cols
        if mask is None:
            masking = self.draw_masking(images.shape[0], n)
        else:
            masking = _masking_of(mask, images.shape[0], n)
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            pred = self.predict_pixels(images, masking).float()
        finally:
            for module, mode in modes:
                module.training = mode
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5
            pred = pred * std + mean
        removed = masking.mask.to(images.device)
        pasted = torch.where(removed.unsqueeze(-1), pred, target)
        return unpatchify(pasted, self.patch_size, (rows, cols), self.channels).to(images.dtype), removed

    # ----------------------------------------------------------------- optimization
    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """``vit_parameter_groups`` with weight decay on every parameter of 2 or more dimensions, class and mask
        tokens included (the code's ``optim_factory.add_weight_decay``: only 1-d parameters are exempt)."""
        return vit_parameter_groups(self, self.backbone, weight_decay, self.layer_decay, decay_tokens=True)

    def optimizer_and_schedule(
        self, global_batch_size: int | None, total_steps: int, warmup_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """``SSLMethod.optimizer_and_schedule``, with MAE's AdamW betas (0.9, 0.95) in every parameter group
        (``main_pretrain.py``; ``optim.build_optimizer`` takes no betas)."""
        optimizer, scheduler = super().optimizer_and_schedule(global_batch_size, total_steps, warmup_steps)
        if isinstance(optimizer, torch.optim.AdamW):
            optimizer.defaults["betas"] = self.betas
            for group in optimizer.param_groups:
                group["betas"] = self.betas
        return optimizer, scheduler


def _masking_of(mask: torch.Tensor, batch: int, num_patches: int) -> RandomMask:
    """The ``RandomMask`` of a given ``B x N`` bool mask (True = removed): kept patches first, in index order."""
    if tuple(mask.shape) != (batch, num_patches) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a {batch} x {num_patches} bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    mask = mask.cpu()
    removed = mask.sum(dim=1)
    if not bool((removed == removed[0]).all()):
        raise ValueError(f"every image's mask must remove as many patches, got {removed.tolist()}")
    keep_count = num_patches - int(removed[0])
    if keep_count < 1:
        raise ValueError("the mask removes every patch: the encoder needs at least one visible patch")
    shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return RandomMask(keep=shuffle[:, :keep_count], restore=torch.argsort(shuffle, dim=1), mask=mask)
