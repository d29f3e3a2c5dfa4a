"""Named, parameterized view augmentation recipes, shared by the CPU and the on-device paths.

A recipe is a list of ``ViewConfig`` (one per view; equal except for BYOL). ``cpu_view_transform``
turns a config into a torchvision pipeline on PIL images (decoded in the loader's workers),
``tensor_view_transform`` into the same pipeline on uint8 tensors (in-memory datasets), and
``lightning_ssl.datamodules.gpu_augment.GPUAugment`` samples the same parameters from the same
distributions on the accelerator. All apply the ops in one fixed order:

    random resized crop -> horizontal flip -> rotation/shear -> color jitter (its four ops in random
    order, with probability p) -> grayscale -> Gaussian blur -> solarize -> normalize.

Presets (``preset(name, image_size, strength, small_image)``):

* ``simclr`` -- Chen et al. 2020 (SimCLR), appendix A: crop scale 0.08-1, flip, jitter
  (0.8s, 0.8s, 0.8s, 0.2s) with p = 0.8, grayscale p = 0.2, blur p = 0.5 with sigma 0.1-2 and a
  kernel of 10% of the image side.
* ``moco_v1`` -- He et al. 2020 (MoCo): crop scale 0.2-1, grayscale p = 0.2, jitter (0.4, 0.4, 0.4,
  0.4) always, flip. (The reference applies grayscale before the jitter; here it comes after, as in
  the other recipes, so one pipeline serves all.)
* ``moco_v2`` -- Chen et al. 2020 (MoCo v2): crop scale 0.2-1, jitter (0.4, 0.4, 0.4, 0.1) p = 0.8,
  grayscale p = 0.2, blur p = 0.5 (sigma 0.1-2), flip.
* ``byol`` -- Grill et al. 2020 (BYOL), table 6: asymmetric views, crop scale 0.08-1, flip, jitter
  (0.4, 0.4, 0.2, 0.1) p = 0.8, grayscale p = 0.2, blur p = 1.0 / 0.1 (sigma 0.1-2, kernel 23 at
  224), solarize p = 0.0 / 0.2.
* ``moco_cifar`` -- the MoCo authors' CIFAR-10 demo (facebookresearch/moco, ``colab/moco_cifar10_demo.ipynb``):
  ``RandomResizedCrop(32)`` (scale 0.08-1), flip, jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale
  p = 0.2, no blur.
* ``cpc`` -- Oord et al. 2018 (CPC), sec. 3.3: a random 256x256 crop of the image resized to 300x300
  (a square crop of (256/300)^2 of the image's area, at a random place), flip, converted to grayscale;
  no color jitter, no blur. (The paper's per-patch 60x60 sub-crops are CPC's ``patch_augment``.)
* ``cpc_v2`` -- Henaff et al. 2019 (CPC v2): the same crop and flip, in color; CPC v2's color
  augmentation is per patch (``patch_augment``: color dropping), none at the image level.
* ``seed`` -- the project's original example: RandomResizedCrop 512 with scale 0.3-1, flip,
  ``ColorJitter(0.4, 0.4, 0.1)`` (brightness, contrast, saturation) with p = 0.8.
* ``digits`` -- the quickstart's handwritten digits: crop scale 0.5-1 (ratio 0.75-1.33), rotation
  +-15 degrees and shear +-10 degrees, brightness and contrast 0.4 with p = 0.8, blur p = 0.5
  (kernel 3, sigma 0.1-1); no flip (a flipped digit is another symbol), no color.
* ``mae`` -- He et al. 2022 (MAE), appendix A.1 (``main_pretrain.py``): one view, random resized crop
  (scale 0.2-1), flip; no color augmentation, no blur.
* ``ijepa`` -- Assran et al. 2023 (I-JEPA), sec. 4 and the paper's configs: one view, random resized crop
  (scale 0.3-1); no flip, no color augmentation, no blur (``use_horizontal_flip: false``).
* ``linear_eval`` -- the training views of linear evaluation and fine-tuning (Chen et al. 2020,
  appendix B.6): random resized crop (scale 0.08-1) and flip, one view.

``strength`` scales the jitter magnitudes (SimCLR's ``s``); ``small_image=True`` drops the blur (as
SimCLR does on CIFAR-10, appendix B.9).

Multi-crop (Caron et al. 2020, SwAV, sec. 3.2; used by DINO): ``multi_crop(views, ...)`` turns a
recipe's views into K global views (the recipe's, cycled, optionally with their own crop scale) and M
local views of their own size and scale, e.g. SwAV's 2 x 224 (scale 0.14-1) + 6 x 96 (0.05-0.14) or
DINO's 2 x 224 (0.4-1) + N x 96 (0.05-0.4). A local view is the first global view with its size and
scale replaced, blur with probability at most 0.5 and no solarization (DINO's local views; SwAV
blurs every crop with p = 0.5). ``global_crops=2, local_crops=0`` returns the recipe unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torchvision.transforms as T
from torchvision.transforms import v2

__all__ = [
    "ViewConfig",
    "preset",
    "multi_crop",
    "PRESETS",
    "cpu_view_transform",
    "tensor_view_transform",
    "eval_transform",
    "tensor_eval_transform",
    "blur_kernel_size",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DIGITS_MEAN, DIGITS_STD = (0.31,) * 3, (0.32,) * 3  # of the upsampled digits, in [0, 1]


def blur_kernel_size(image_size: int, fraction: float = 0.1) -> int:
    """An odd kernel of about ``fraction`` of the image side (SimCLR: 10%; 23 at 224)."""
    k = max(3, int(round(image_size * fraction)))
    return k if k % 2 == 1 else k + 1


@dataclass(frozen=True)
class ViewConfig:
    """The distribution of one view's augmentation; every op's probability and range is a field."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rotation: float = 0.0  # degrees: uniform in [-rotation, rotation]
    shear: float = 0.0  # degrees, along x: uniform in [-shear, shear]
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 23
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on images in [0, 1]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.size < 1:
            raise ValueError(f"output size must be positive, got {self.size}")
        if self.rotation < 0 or self.shear < 0 or self.shear >= 90:
            raise ValueError(
                f"rotation and shear are ranges in degrees (>= 0, shear < 90), got {self.rotation}, {self.shear}"
            )
        if self.blur_kernel % 2 != 1:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        b, c, s, h = self.jitter
        if min(b, c, s, h) < 0 or h > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {self.jitter}")

    def replace(self, **changes) -> ViewConfig:
        return dataclasses.replace(self, **changes)


def _simclr(size: int, s: float) -> list[ViewConfig]:
    v = ViewConfig(
        size=size,
        scale=(0.08, 1.0),
        jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.5,
        blur_kernel=blur_kernel_size(size),
    )
    return [v, v]


def _moco_v1(size: int, s: float) -> list[ViewConfig]:
    v = ViewConfig(
        size=size,
        scale=(0.2, 1.0),
        jitter=(0.4 * s, 0.4 * s, 0.4 * s, min(0.5, 0.4 * s)),
        jitter_p=1.0,
        grayscale_p=0.2,
        blur_p=0.0,
        blur_kernel=blur_kernel_size(size),
    )
    return [v, v]


def _moco_v2(size: int, s: float) -> list[ViewConfig]:
    v = ViewConfig(
        size=size,
        scale=(0.2, 1.0),
        jitter=(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s),
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.5,
        blur_kernel=blur_kernel_size(size),
    )
    return [v, v]


def _byol(size: int, s: float) -> list[ViewConfig]:
    v = ViewConfig(
        size=size,
        scale=(0.08, 1.0),
        jitter=(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s),
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_kernel=blur_kernel_size(size),
    )
    return [v.replace(blur_p=1.0, solarize_p=0.0), v.replace(blur_p=0.1, solarize_p=0.2)]


def _moco_cifar(size: int, s: float) -> list[ViewConfig]:
    v = ViewConfig(
        size=size,
        scale=(0.08, 1.0),
        jitter=(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s),
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.0,
        blur_kernel=blur_kernel_size(size),
    )
    return [v, v]


CPC_CROP_SCALE = (256 / 300) ** 2
"""Area fraction of CPC's 256x256 crop of a 300x300 image (Oord et al. 2018, sec. 3.3)."""


def _cpc(size: int, s: float) -> list[ViewConfig]:
    v = ViewConfig(
        size=size,
        scale=(CPC_CROP_SCALE, CPC_CROP_SCALE),
        ratio=(1.0, 1.0),
        jitter_p=0.0,
        grayscale_p=1.0,
        blur_p=0.0,
        blur_kernel=blur_kernel_size(size),
    )
    return [v]


def _cpc_v2(size: int, s: float) -> list[ViewConfig]:
    return [_cpc(size, s)[0].replace(grayscale_p=0.0)]


def _seed(size: int, s: float) -> list[ViewConfig]:
    v = ViewConfig(
        size=size,
        scale=(0.3, 1.0),
        jitter=(0.4 * s, 0.4 * s, 0.1 * s, 0.0),
        jitter_p=0.8,
        grayscale_p=0.0,
        blur_p=0.0,
        blur_kernel=blur_kernel_size(size),
    )
    return [v, v]


def _digits(size: int, s: float) -> list[ViewConfig]:
    v = ViewConfig(
        size=size,
        scale=(0.5, 1.0),
        ratio=(0.75, 1.33),
        flip_p=0.0,
        rotation=15.0,
        shear=10.0,
        jitter=(0.4 * s, 0.4 * s, 0.0, 0.0),
        jitter_p=0.8,
        grayscale_p=0.0,
        blur_p=0.5,
        blur_sigma=(0.1, 1.0),
        blur_kernel=3,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
    )
    return [v, v]


def _mae(size: int, s: float) -> list[ViewConfig]:
    return [ViewConfig(size=size, scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)]


def _ijepa(size: int, s: float) -> list[ViewConfig]:
    return [ViewConfig(size=size, scale=(0.3, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)]


def _linear_eval(size: int, s: float) -> list[ViewConfig]:
    return [ViewConfig(size=size, scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)]


PRESETS = {
    "simclr": _simclr,
    "moco_v1": _moco_v1,
    "moco_v2": _moco_v2,
    "byol": _byol,
    "moco_cifar": _moco_cifar,
    "cpc": _cpc,
    "cpc_v2": _cpc_v2,
    "seed": _seed,
    "digits": _digits,
    "mae": _mae,
    "ijepa": _ijepa,
    "linear_eval": _linear_eval,
}
_DEFAULT_SIZE = {"seed": 512, "digits": 32, "moco_cifar": 32, "cpc": 256, "cpc_v2": 256}


def preset(
    name: str,
    image_size: int | None = None,
    strength: float = 1.0,
    small_image: bool = False,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> list[ViewConfig]:
    """The view configs of recipe ``name`` (see the module docstring) at ``image_size`` (224; 512 for
    ``seed``, 32 for ``digits``), jitter scaled by ``strength``; ``small_image`` drops the blur;
    ``mean``/``std`` replace the recipe's normalization (ImageNet's by default)."""
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(PRESETS)}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    size = image_size or _DEFAULT_SIZE.get(name, 224)
    views = PRESETS[name](size, strength)
    if mean is not None:
        views = [v.replace(mean=tuple(mean)) for v in views]
    if std is not None:
        views = [v.replace(std=tuple(std)) for v in views]
    if small_image:
        views = [v.replace(blur_p=0.0) for v in views]
    return views


def multi_crop(
    views: list[ViewConfig],
    global_crops: int = 2,
    local_crops: int = 0,
    local_size: int = 96,
    global_scale: tuple[float, float] | None = None,
    local_scale: tuple[float, float] = (0.05, 0.4),
) -> list[ViewConfig]:
    """``global_crops`` global views (``views`` cycled: BYOL's asymmetric pair stays a pair; crop scale
    ``global_scale`` when given) followed by ``local_crops`` local views of side ``local_size`` and crop
    scale ``local_scale`` (see the module docstring). The defaults return a two-view recipe unchanged;
    ``global_crops=1`` gives one view (MAE, I-JEPA: each method checks how many views it needs)."""
    if global_crops < 1 or local_crops < 0:
        raise ValueError(f"need global_crops >= 1 and local_crops >= 0, got {global_crops} and {local_crops}")
    globals_ = [views[i % len(views)] for i in range(global_crops)]
    if global_scale is not None:
        globals_ = [v.replace(scale=tuple(global_scale)) for v in globals_]
    if local_crops == 0:
        return globals_
    first = views[0]
    blur_p = min(first.blur_p, 0.5)
    local = first.replace(
        size=local_size,
        scale=tuple(local_scale),
        blur_p=blur_p,
        blur_kernel=blur_kernel_size(local_size) if blur_p > 0 else first.blur_kernel,
        solarize_p=0.0,
    )
    return globals_ + [local] * local_crops


def cpu_view_transform(cfg: ViewConfig) -> T.Compose:
    """A torchvision pipeline on one PIL image drawing from ``cfg``'s distribution.

    Built from ``torchvision.transforms`` (v1): on PIL images it measured 10-20% faster than the
    same ops from ``transforms.v2`` at 32x32, with the same parameter sampling."""
    b, c, s, h = cfg.jitter
    ops: list = [T.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio, antialias=True)]
    if cfg.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(cfg.flip_p))
    if cfg.rotation > 0 or cfg.shear > 0:
        ops.append(T.RandomAffine(degrees=cfg.rotation, shear=cfg.shear or None))
    if cfg.jitter_p > 0 and max(cfg.jitter) > 0:
        ops.append(T.RandomApply([T.ColorJitter(b, c, s, h)], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        ops.append(T.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)], p=cfg.blur_p))
    if cfg.solarize_p > 0:  # on the 8-bit PIL image: pixels >= threshold are inverted
        ops.append(T.RandomSolarize(threshold=round(cfg.solarize_threshold * 255), p=cfg.solarize_p))
    ops += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(ops)


def eval_transform(
    resize: int | None = 256,
    crop: int | None = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> T.Compose:
    """Evaluation views: resize the shorter side to ``resize``, center crop ``crop`` (either may be
    None to skip), normalize. ImageNet convention 256/224; CIFAR-10 uses the 32x32 image as is."""
    ops: list = []
    if resize:
        ops.append(T.Resize(resize, antialias=True))
    if crop:
        ops.append(T.CenterCrop(crop))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def tensor_view_transform(cfg: ViewConfig) -> v2.Compose:
    """The pipeline of ``cpu_view_transform`` on one ``3 x H x W`` uint8 tensor (``transforms.v2``
    ops), for datasets held in memory as tensors."""
    b, c, s, h = cfg.jitter
    ops: list = [v2.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio, antialias=True)]
    if cfg.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.flip_p))
    if cfg.rotation > 0 or cfg.shear > 0:
        ops.append(v2.RandomAffine(degrees=cfg.rotation, shear=cfg.shear or None))
    if cfg.jitter_p > 0 and max(cfg.jitter) > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)], p=cfg.blur_p))
    if cfg.solarize_p > 0:  # on the uint8 tensor: pixels >= threshold are inverted
        ops.append(v2.RandomSolarize(threshold=round(cfg.solarize_threshold * 255), p=cfg.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(ops)


def tensor_eval_transform(
    resize: int | None = None,
    crop: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """``eval_transform`` on a uint8 tensor."""
    ops: list = []
    if resize:
        ops.append(v2.Resize(resize, antialias=True))
    if crop:
        ops.append(v2.CenterCrop(crop))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)
