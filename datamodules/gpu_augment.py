"""Two-view augmentation on the accelerator: batched ops with per-sample random parameters.

The loader ships fixed-size uint8 images (decoded and resized in the workers) and each image's
original height and width; ``GPUAugment`` then makes every view on the device. It samples each
op's parameters per sample from the same distributions as ``augmentations.cpu_view_transform``
(torchvision's ``RandomResizedCrop.get_params``, ``ColorJitter.get_params`` with the four ops in a
random order, and the ``RandomApply`` probabilities), and applies the same formulas as torchvision's
functional ops:

* crop-and-resize + flip + rotation/shear: one ``affine_grid``/``grid_sample`` (bilinear) per batch.
  The crop box is drawn in the *original* image's pixels, so squashing the image to a square for
  shipping does not change the crop distribution (only the resolution available to small crops).
  Rotation and shear use torchvision's inverse affine matrix about the view's center; pixels that
  fall outside the crop are filled with 0, as ``RandomAffine`` does;
* brightness, contrast, saturation, hue (RGB -> HSV -> RGB), grayscale, solarize: element-wise on
  the samples that draw them;
* Gaussian blur: separable, one grouped convolution with each sample's own sigma, reflect padding.

Written with plain vectorized torch ops instead of kornia (not a dependency of this project; see
``benchmarks/data_throughput.py`` for measured throughput). Differences from the CPU path: no
antialiasing when a crop is shrunk (crops are mostly enlarged), one bilinear resampling for crop
and rotation together (the CPU path resamples twice), and jitter works on float images rather than
PIL's 8-bit ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ssl.datamodules.augmentations import ViewConfig

__all__ = ["GPUAugment", "ViewAugment", "sample_crop_boxes", "rgb_to_grayscale", "adjust_hue", "inverse_affine_2x2"]

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _uniform(n: int, low: float, high: float, device, generator) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` for a batch: ``N x 4`` boxes ``(top, left, height, width)``
    in pixels of images of the given sizes (10 attempts, then torchvision's central fallback)."""
    device = heights.device
    n = heights.shape[0]
    H, W = heights.double(), widths.double()
    area = (H * W).unsqueeze(1)
    target = area * (
        torch.rand(n, attempts, device=device, generator=generator, dtype=torch.float64) * (scale[1] - scale[0])
        + scale[0]
    )
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(
        torch.rand(n, attempts, device=device, generator=generator, dtype=torch.float64) * (log_r[1] - log_r[0])
        + log_r[0]
    )
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W.unsqueeze(1)) & (h > 0) & (h <= H.unsqueeze(1))
    first = ok.float().argmax(1)  # the first accepted attempt (0 when none is)
    any_ok = ok.any(1)
    w = w.gather(1, first.view(-1, 1)).squeeze(1)
    h = h.gather(1, first.view(-1, 1)).squeeze(1)
    # fallback: the whole image, cropped to the nearest allowed aspect ratio, centered
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    w, h = torch.where(any_ok, w, fw), torch.where(any_ok, h, fh)
    u_top = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
    top = torch.where(any_ok, torch.floor(u_top * (H - h + 1)), torch.floor((H - h) / 2))
    left = torch.where(any_ok, torch.floor(u_left * (W - w + 1)), torch.floor((W - w) / 2))
    return torch.stack([top, left, h, w], dim=1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """``N x 3 x H x W`` -> ``N x 1 x H x W`` luma (ITU-R 601-2, as torchvision)."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def _brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(x, f):
    return _blend(x, rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x, f):
    return _blend(x, rgb_to_grayscale(x), f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of ``N x 3 x H x W`` images in [0, 1] by ``shift`` (in turns, per sample).

    RGB -> HSV as torchvision; HSV -> RGB with the closed form ``c_n = V - V S clamp(min(k, 4 - k),
    0, 1)``, ``k = (n + 6H) mod 6`` for ``n = 5, 3, 1`` (equal to the six-sector formula, no masks)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    minc = x.amin(1)
    delta = maxc - minc
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h6 = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    h6 = torch.remainder(h6 + 6.0 * shift.view(-1, 1, 1), 6.0)
    vs = maxc * sat
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=1)


_JITTER_OPS = (_brightness, _contrast, _saturation, adjust_hue)


def inverse_affine_2x2(angle: torch.Tensor, shear_x: torch.Tensor) -> torch.Tensor:
    """``N x 2 x 2`` inverse of rotation by ``angle`` and x-shear by ``shear_x`` (degrees, per sample),
    about the image center, in normalized coordinates of a square image: the linear part of
    torchvision's ``_get_inverse_affine_matrix`` (scale 1, no translation, no y-shear)."""
    rot, sx = torch.deg2rad(angle), torch.deg2rad(shear_x)
    a, c = torch.cos(rot), torch.sin(rot)
    b = -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    d = -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    return torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    n, c, hh, ww = x.shape
    half = (kernel - 1) * 0.5
    pos = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (pos.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c) x kernel
    pad = kernel // 2
    mode = "reflect" if pad < min(hh, ww) else "replicate"
    y = F.pad(x.reshape(1, n * c, hh, ww), (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, hh, ww)


class ViewAugment(nn.Module):
    """One view's augmentation (a ``ViewConfig``) on a batch of float images in [0, 1]."""

    def __init__(self, cfg: ViewConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def sample_params(
        self, heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample parameters for images whose original sizes are ``heights`` x ``widths``."""
        cfg, n, dev = self.cfg, heights.shape[0], heights.device

        def coin(p):
            return torch.rand(n, device=dev, generator=generator) < p

        b, c, s, h = cfg.jitter
        affine = {}
        if cfg.rotation > 0 or cfg.shear > 0:  # drawn only when used, so other recipes keep their streams
            affine = {
                "angle": _uniform(n, -cfg.rotation, cfg.rotation, dev, generator),
                "shear": _uniform(n, -cfg.shear, cfg.shear, dev, generator),
            }
        return {
            "box": sample_crop_boxes(heights, widths, cfg.scale, cfg.ratio, generator),
            "flip": coin(cfg.flip_p),
            **affine,
            "jitter": coin(cfg.jitter_p),
            "order": torch.rand(n, 4, device=dev, generator=generator).argsort(1),  # a random permutation each
            "brightness": _uniform(n, max(0.0, 1 - b), 1 + b, dev, generator),
            "contrast": _uniform(n, max(0.0, 1 - c), 1 + c, dev, generator),
            "saturation": _uniform(n, max(0.0, 1 - s), 1 + s, dev, generator),
            "hue": _uniform(n, -h, h, dev, generator),
            "grayscale": coin(cfg.grayscale_p),
            "blur": coin(cfg.blur_p),
            "sigma": _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], dev, generator),
            "solarize": coin(cfg.solarize_p),
        }

    @torch.no_grad()
    def apply(
        self, x: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Apply ``params`` to ``x`` (``N x 3 x S x S`` in [0, 1], resized from ``heights x widths``);
        returns normalized ``N x 3 x size x size`` views."""
        cfg = self.cfg
        n = x.shape[0]
        # crop + resize + flip: output pixel centers mapped into the box, in normalized coordinates
        box = params["box"].to(x.dtype)
        top, left, bh, bw = box.unbind(1)
        H, W = heights.to(x.dtype), widths.to(x.dtype)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        sx = bw / W
        theta[:, 0, 0] = torch.where(params["flip"], -sx, sx)
        theta[:, 0, 2] = (2 * left + bw) / W - 1
        theta[:, 1, 1] = bh / H
        theta[:, 1, 2] = (2 * top + bh) / H - 1
        outside = None
        if cfg.rotation > 0 or cfg.shear > 0:
            # view pixel p -> q = A^-1 p in the flipped crop (zero outside it) -> the crop's map above
            inverse = inverse_affine_2x2(params["angle"], params["shear"]).to(x.dtype)
            q = F.affine_grid(F.pad(inverse, (0, 1)), [n, 3, cfg.size, cfg.size], align_corners=False)
            outside = (q.abs() > 1).any(dim=-1).unsqueeze(1)  # N x 1 x size x size
            theta = torch.cat([theta[:, :, :2] @ inverse, theta[:, :, 2:]], dim=2)
        grid = F.affine_grid(theta, [n, 3, cfg.size, cfg.size], align_corners=False)
        # sample only inside the box (as crop-then-resize does): clamp to its outermost pixel centers
        half_x, half_y = 1.0 / x.shape[3], 1.0 / x.shape[2]
        x0, x1 = 2 * left / W - 1 + half_x, 2 * (left + bw) / W - 1 - half_x
        y0, y1 = 2 * top / H - 1 + half_y, 2 * (top + bh) / H - 1 - half_y
        x1, y1 = torch.maximum(x0, x1), torch.maximum(y0, y1)
        lo = torch.stack([x0, y0], 1).view(n, 1, 1, 2)
        hi = torch.stack([x1, y1], 1).view(n, 1, 1, 2)
        grid = torch.maximum(torch.minimum(grid, hi), lo)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if outside is not None:
            x = x.masked_fill(outside, 0.0)

        strengths = cfg.jitter
        factors = (params["brightness"], params["contrast"], params["saturation"], params["hue"])
        jitter, order = params["jitter"], params["order"]
        if jitter.any():
            for pos in range(4):
                for k, op in enumerate(_JITTER_OPS):
                    if strengths[k] <= 0:
                        continue
                    idx = (jitter & (order[:, pos] == k)).nonzero().squeeze(1)
                    if idx.numel():
                        x[idx] = op(x[idx], factors[k][idx])
        idx = params["grayscale"].nonzero().squeeze(1)
        if idx.numel():
            x[idx] = rgb_to_grayscale(x[idx]).expand(-1, 3, -1, -1)
        idx = params["blur"].nonzero().squeeze(1)
        if idx.numel():
            x[idx] = _gaussian_blur(x[idx], params["sigma"][idx], cfg.blur_kernel)
        idx = params["solarize"].nonzero().squeeze(1)
        if idx.numel():
            xs = x[idx]
            x[idx] = torch.where(xs >= cfg.solarize_threshold, 1.0 - xs, xs)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        return self.apply(x, heights, widths, self.sample_params(heights, widths))


class GPUAugment(nn.Module):
    """Makes one view per ``ViewConfig`` from a uint8 batch, on whatever device the batch is on.

    ``forward(images, sizes, generator)``: ``images`` is ``N x 3 x S x S`` uint8; ``sizes`` is ``N x 2``
    with each image's original ``(height, width)`` (``None``: the images are their original size);
    ``generator`` (on the images' device) draws the parameters, default the global RNG.

    ``group_identical=True`` makes a run of consecutive equal configs (multi-crop's local views) in one
    batched call over ``k x N`` images, one resolution at a time; each view still gets its own
    parameters, from the same distributions. Off (the default), each view is made by its own call.
    """

    def __init__(self, views: Sequence[ViewConfig], group_identical: bool = False):
        super().__init__()
        if len(views) < 1:
            raise ValueError("GPUAugment needs at least one ViewConfig")
        runs: list[list] = []  # [config, count]
        for v in views:
            if group_identical and runs and runs[-1][0] == v:
                runs[-1][1] += 1
            else:
                runs.append([v, 1])
        self.views = nn.ModuleList(ViewAugment(v) for v, _ in runs)
        self.counts = [k for _, k in runs]

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, sizes: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(images.shape)}")
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        if sizes is None:
            heights = torch.full((x.shape[0],), x.shape[2], device=x.device)
            widths = torch.full((x.shape[0],), x.shape[3], device=x.device)
        else:
            sizes = sizes.to(x.device)
            heights, widths = sizes[:, 0], sizes[:, 1]
        out: list[torch.Tensor] = []
        for view, k in zip(self.views, self.counts):
            if k == 1:
                out.append(view.apply(x, heights, widths, view.sample_params(heights, widths, generator)))
                continue
            xs, hs, ws = x.repeat(k, 1, 1, 1), heights.repeat(k), widths.repeat(k)
            out.extend(view.apply(xs, hs, ws, view.sample_params(hs, ws, generator)).chunk(k))
        return out
