"""Token-level access to ViT backbones, for the masked-image and joint-embedding methods (MAE, iBOT,
DINOv2-style, I-JEPA) and MoCo v3's ViT recipe.

``encode_tokens(backbone, images, keep=..., mask=..., mask_token=...)`` runs a torchvision or timm ViT
made by ``build_backbone`` and returns its class token and patch tokens after the final norm:

- ``keep`` (``B x K`` patch indices) drops every other patch before the transformer (MAE's encoder on the
  visible patches only, He et al. 2022; I-JEPA's context encoder, Assran et al. 2023);
- ``mask`` (``B x N`` bool) replaces the masked patches' embeddings by ``mask_token`` before the position
  embeddings are added, and every token goes through (iBOT's masked student, Zhou et al. 2022, the
  ``masked_embed`` of the iBOT code; SimMIM).

Position embeddings follow the input: a grid other than the one the ViT was built for gets them resized
bicubically (``backbones.interpolate_positions``), so 96-pixel local crops work. ``sincos_2d`` is MAE's
fixed 2-D sin-cos table (``get_2d_sincos_pos_embed`` of the MAE code: the first half of the channels
encodes the column, the second the row), which ``use_sincos_positions`` writes into a ViT and freezes (MAE,
MoCo v3, I-JEPA). ``freeze_patch_projection`` is MoCo v3's stability trick (Chen et al. 2021, sec. 5.3):
a random patch projection that is never trained.

Patches are numbered row-major over the ``rows x cols`` grid, as ``lightning_ssl.masking`` numbers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from lightning_ssl.backbones import PooledBackbone, interpolate_positions

__all__ = [
    "Tokens",
    "encode_tokens",
    "is_vit",
    "require_vit",
    "vit_patch_size",
    "vit_width",
    "patch_grid",
    "patchify",
    "unpatchify",
    "sincos_1d",
    "sincos_2d",
    "use_sincos_positions",
    "freeze_patch_projection",
    "patch_projection",
]


@dataclass(frozen=True)
class Tokens:
    """A ViT's output after its final norm: ``cls`` (``B x D``; ``None`` for a ViT without class token)
    and ``patches`` (``B x N x D``, or ``B x K x D`` for the kept patches, in the order of ``keep``)."""

    cls: torch.Tensor | None
    patches: torch.Tensor

    def mean_patches(self) -> torch.Tensor:
        """``B x D``: the average of the patch tokens (MAE's ``global_pool``, I-JEPA's evaluation)."""
        return self.patches.mean(dim=1)


def _inner(backbone: nn.Module) -> nn.Module:
    return backbone.module if isinstance(backbone, PooledBackbone) else backbone


def _is_timm_vit(module: nn.Module) -> bool:
    return hasattr(module, "patch_embed") and hasattr(module, "num_prefix_tokens") and hasattr(module, "blocks")


def is_vit(backbone: nn.Module) -> bool:
    """Whether ``encode_tokens`` can run ``backbone``: a torchvision ``VisionTransformer`` or a timm ViT."""
    inner = _inner(backbone)
    return isinstance(inner, torchvision.models.VisionTransformer) or _is_timm_vit(inner)


def require_vit(backbone: nn.Module, user: str = "this method") -> nn.Module:
    """The torchvision or timm ViT inside ``backbone``; a ValueError naming ``user`` and the ViTs to use if there
    is none."""
    if not is_vit(backbone):
        raise ValueError(
            f"{user} needs a ViT backbone (a torchvision ViT such as 'vit_s_16' or 'vit_b_16', 'vit_ti_16' with "
            "small_image=True for 32x32 images, or 'timm:vit_small_patch16_224'), "
            f"got {type(_inner(backbone)).__name__}"
        )
    return _inner(backbone)


def patch_projection(backbone: nn.Module) -> nn.Conv2d:
    """The convolution that embeds the patches."""
    inner = require_vit(backbone)
    return inner.conv_proj if isinstance(inner, torchvision.models.VisionTransformer) else inner.patch_embed.proj


def vit_patch_size(backbone: nn.Module) -> int:
    """The side of the ViT's square patches in pixels."""
    size = patch_projection(backbone).kernel_size
    if size[0] != size[1]:
        raise ValueError(f"only square patches are supported, got {tuple(size)}")
    return int(size[0])


def vit_width(backbone: nn.Module) -> int:
    """The token width D."""
    return int(patch_projection(backbone).out_channels)


def patch_grid(backbone: nn.Module, height: int, width: int) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid of ``height x width`` images; both must be multiples of the patch."""
    p = vit_patch_size(backbone)
    if height % p or width % p:
        raise ValueError(f"images of {height}x{width} are not a whole number of {p}x{p} patches")
    return height // p, width // p


def _positions(pos: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    return interpolate_positions(pos, grid, prefix) if pos.shape[1] - prefix != grid[0] * grid[1] else pos


def _embed_torchvision(
    vit: torchvision.models.VisionTransformer, images: torch.Tensor, mask, mask_token
) -> tuple[torch.Tensor, torch.Tensor]:
    x = vit.conv_proj(images)
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    pos = _positions(vit.encoder.pos_embedding, grid, 1)
    prefix = (vit.class_token + pos[:, :1]).expand(x.shape[0], -1, -1)
    return prefix, x + pos[:, 1:]


def _embed_timm(vit: nn.Module, images: torch.Tensor, mask, mask_token) -> tuple[torch.Tensor, torch.Tensor]:
    x = vit.patch_embed(images)
    if mask is not None:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x).reshape(shape)
    x = vit._pos_embed(x)  # timm's own: prefix tokens, position embeddings (resized for dynamic sizes), dropout
    prefix = int(vit.num_prefix_tokens)
    return x[:, :prefix], x[:, prefix:]


def encode_tokens(
    backbone: nn.Module,
    images: torch.Tensor,
    keep: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> Tokens:
    """Class and patch tokens of a torchvision or timm ViT ``backbone`` on ``images`` (``B x 3 x H x W``).

    Args:
        keep: ``B x K`` long indices of the patches to keep (the rest never enter the transformer); the
            returned patches are in this order.
        mask: ``B x N`` bool, True where a patch's embedding is replaced by ``mask_token`` (a ``D`` tensor)
            before its position embedding is added; every token is processed.
    """
    vit = require_vit(backbone)
    n = images.shape[0]
    if mask is not None:
        if mask_token is None:
            raise ValueError("mask needs a mask_token (a learned D-vector) to put in place of the masked patches")
        rows, cols = patch_grid(backbone, images.shape[-2], images.shape[-1])
        if tuple(mask.shape) != (n, rows * cols) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a {n} x {rows * cols} bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        mask = mask.to(images.device, non_blocking=True)
    torchvision_vit = isinstance(vit, torchvision.models.VisionTransformer)
    embed = _embed_torchvision if torchvision_vit else _embed_timm
    prefix, patches = embed(vit, images, mask, mask_token)
    if keep is not None:
        if keep.ndim != 2 or keep.shape[0] != n:
            raise ValueError(f"keep must be a {n} x K tensor of patch indices, got shape {tuple(keep.shape)}")
        keep = keep.to(images.device, non_blocking=True)
        patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    x = torch.cat([prefix, patches], dim=1)
    if torchvision_vit:
        x = vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(x)))
        num_prefix = 1
    else:
        x = vit.norm(vit.blocks(vit.norm_pre(x)))
        num_prefix = int(vit.num_prefix_tokens)
    cls = x[:, 0] if num_prefix > 0 and (torchvision_vit or getattr(vit, "cls_token", None) is not None) else None
    return Tokens(cls, x[:, num_prefix:])


# ----------------------------------------------------------------------------- pixels and patches
def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``B x C x H x W`` -> ``B x N x (p * p * C)``, patches row-major, each patch's pixels ``(p, p, C)`` in that
    order (MAE's ``patchify``)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"images of {h}x{w} are not a whole number of {p}x{p} patches")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of ``patchify``."""
    b = patches.shape[0]
    rows, cols = grid
    p = patch_size
    x = patches.reshape(b, rows, cols, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, rows * p, cols * p)


# ----------------------------------------------------------------------------- sin-cos positions
def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``len(positions) x dim``: ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000^(-2i/dim)``
    (MAE's ``get_1d_sincos_pos_embed_from_grid``)."""
    if dim % 2:
        raise ValueError(f"a sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """``(rows * cols) x dim`` fixed 2-D sin-cos position embeddings (MAE's ``get_2d_sincos_pos_embed``, used by
    MAE, MoCo v3 and I-JEPA): half the channels encode the column, half the row; with ``cls_token`` a first row
    of zeros for the class token. Float32; computed for any grid, so other image sizes need no resizing."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid
    row_pos, col_pos = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, col_pos), sincos_1d(dim // 2, row_pos)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


@torch.no_grad()
def use_sincos_positions(backbone: nn.Module) -> nn.Module:
    """Replace a ViT's learned position embeddings by ``sincos_2d`` of its grid (zeros at the class token) and
    freeze them, in place (MAE, MoCo v3, I-JEPA). The parameter keeps its name and shape, so exported state
    dicts load into the plain model."""
    vit = require_vit(backbone)
    if isinstance(vit, torchvision.models.VisionTransformer):
        pos, prefix = vit.encoder.pos_embedding, 1
    else:
        pos = vit.pos_embed
        prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    n = pos.shape[1] - prefix
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    table = sincos_2d(pos.shape[-1], (side, side))
    pos[:, prefix:].copy_(table.unsqueeze(0))
    pos[:, :prefix].zero_()
    pos.requires_grad_(False)
    return backbone


def freeze_patch_projection(backbone: nn.Module) -> nn.Module:
    """MoCo v3's random patch projection (Chen et al. 2021, sec. 5.3, "random patch projection"): the patch
    embedding keeps its random initialization and is never trained, in place."""
    patch_projection(backbone).requires_grad_(False)
    return backbone
