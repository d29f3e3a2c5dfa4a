"""Overlapping patch grids for Contrastive Predictive Coding (Oord et al. 2018, sec. 3.3).

A 256x256 image is cut into a 7x7 grid of 64x64 patches with a 32-pixel stride (50% overlap); a
32x32 image gives the same 7x7 grid with 8x8 patches and a 4-pixel stride. ``extract_patches``
does it for a whole batch at once with ``Tensor.unfold`` (a view, no copy, on the input's device).
``augment_patches`` is CPC v2's per-patch augmentation, batched over all patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["extract_patches", "grid_shape", "augment_patches", "encode_patches", "PatchGridEncoder"]


def grid_shape(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """Rows and columns of the grid of ``patch_size`` patches every ``stride`` pixels."""
    if patch_size <= 0 or stride <= 0:
        raise ValueError(f"patch_size and stride must be positive, got {patch_size} and {stride}")
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"images of {height}x{width} are smaller than one {patch_size}x{patch_size} patch; "
            "use larger images or a smaller patch_size"
        )
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def extract_patches(images: torch.Tensor, patch_size: int, stride: int, grid_size: int | None = None) -> torch.Tensor:
    """Cut ``B x C x H x W`` images into a ``B x rows x cols x C x patch_size x patch_size`` grid.

    Patch ``(i, j)`` is ``images[:, :, i*stride : i*stride+patch_size, j*stride : j*stride+patch_size]``.
    ``grid_size`` (optional) is the expected number of rows and of columns: the images must give
    exactly that grid, i.e. have side ``(grid_size - 1) * stride + patch_size`` (extra pixels at the
    bottom/right that do not fill a stride are ignored).
    """
    if images.ndim != 4:
        raise ValueError(f"expected a B x C x H x W batch of images, got shape {tuple(images.shape)}")
    rows, cols = grid_shape(images.shape[2], images.shape[3], patch_size, stride)
    if grid_size is not None and (rows, cols) != (grid_size, grid_size):
        side = (grid_size - 1) * stride + patch_size
        raise ValueError(
            f"images of {images.shape[2]}x{images.shape[3]} give a {rows}x{cols} grid of {patch_size}-pixel "
            f"patches with stride {stride}, not {grid_size}x{grid_size}; resize or crop them to {side}x{side}"
        )
    # B x C x rows x cols x P x P, then channels next to the pixels of each patch.
    grid = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)
    return grid.permute(0, 2, 3, 1, 4, 5)


def encode_patches(patches: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """Backbone features of every patch: ``B x rows x cols x C x P x P`` to ``B x rows x cols x F``."""
    b, rows, cols = patches.shape[:3]
    features = backbone(patches.reshape(b * rows * cols, *patches.shape[3:]))
    return features.view(b, rows, cols, -1)


class PatchGridEncoder(nn.Module):
    """CPC's evaluation encoder (Oord et al. 2018, sec. 3.3; Henaff et al. 2019, sec. 4): the
    backbone's features of every patch of the grid, averaged over the grid (``B x F``)."""

    def __init__(self, backbone: nn.Module, patch_size: int, patch_stride: int, grid_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.patch_size, self.patch_stride, self.grid_size = patch_size, patch_stride, grid_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = extract_patches(images, self.patch_size, self.patch_stride, self.grid_size)
        return encode_patches(patches, self.backbone).mean(dim=(1, 2))


def augment_patches(
    patches: torch.Tensor, crop_fraction: float = 1.0, flip_prob: float = 0.0, color_drop_prob: float = 0.0
) -> torch.Tensor:
    """Independent random augmentation of every patch of ``N x C x P x P`` (CPC v2, Henaff et al. 2019).

    All on the patches' device in a few batched operations:
    - a random crop of side ``crop_fraction * P`` anywhere inside the patch, resized back to ``P``
      (bilinear) and, with probability ``flip_prob``, flipped left-right: one ``affine_grid`` +
      ``grid_sample`` with a per-patch affine map;
    - color dropping (Doersch et al. 2015): with probability ``color_drop_prob`` all channels but
      one, chosen at random, are set to 0 (the mean of normalized images).
    """
    if patches.ndim != 4:
        raise ValueError(f"expected N x C x P x P patches, got shape {tuple(patches.shape)}")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must lie in (0, 1], got {crop_fraction}")
    for name, p in (("flip_prob", flip_prob), ("color_drop_prob", color_drop_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    n, c = patches.shape[:2]
    device, dtype = patches.device, patches.dtype
    if crop_fraction < 1.0 or flip_prob > 0.0:
        flip = torch.where(torch.rand(n, device=device) < flip_prob, -1.0, 1.0).to(dtype)
        shift = (torch.rand(n, 2, device=device, dtype=dtype) * 2 - 1) * (1 - crop_fraction)
        theta = torch.zeros(n, 2, 3, device=device, dtype=dtype)
        theta[:, 0, 0] = crop_fraction * flip
        theta[:, 1, 1] = crop_fraction
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(patches.shape), align_corners=False)
        patches = F.grid_sample(patches, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if color_drop_prob > 0.0:
        keep = F.one_hot(torch.randint(c, (n,), device=device), c).to(dtype)  # N x C
        drop = (torch.rand(n, 1, device=device) < color_drop_prob).to(dtype)
        mask = drop * keep + (1 - drop)
        patches = patches * mask[:, :, None, None]
    return patches
