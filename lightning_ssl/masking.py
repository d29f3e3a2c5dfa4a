"""Patch masks for the masked-image methods on ViTs: MAE, BEiT/iBOT, DINOv2 and I-JEPA.

Every mask lives on a ``rows x cols`` patch grid whose ``N = rows * cols`` patches are numbered
row-major, ``n = r * cols + c`` (the order of a ViT's patch tokens, class token excluded).

- ``random_masking``: MAE's per-image uniform shuffle (He et al. 2022, sec. 3; ``random_masking`` of
  models_mae.py in the paper's code). It keeps ``K = int(N * (1 - mask_ratio))`` patches (the code's
  ``len_keep``); the paper's ``mask_ratio`` is 0.75. ``gather_tokens`` is the encoder's gather of the
  kept tokens, ``restore_tokens`` the decoder's unshuffle.
- ``block_masks``: BEiT's block-wise masking (Bao et al. 2022, alg. 1: blocks of at least 4 patches,
  aspect ratio log-uniform in [0.3, 1/0.3]), as used by iBOT (Zhou et al. 2022, ``ImageFolderMask``
  with ``pred_shape='block'``: ratio 0.3 +- 0.2, i.e. ``ratio_range=(0.1, 0.5)``) and DINOv2
  (Oquab et al. 2023: ``mask_ratio_min_max=(0.1, 0.5)``, ``mask_sample_probability=0.5``). iBOT's
  released ViT runs (``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``) choose per image between no mask
  and a ratio in (0.1, 0.5), which is ``mask_probability=0.5`` too; its argparse default (0.3, no
  variance) masks every image.
- ``multi_block_masks``: I-JEPA's multi-block masking (Assran et al. 2023, sec. 3; ``MaskCollator``
  of src/masks/multiblock.py): 4 target blocks of scale (0.15, 0.2) and aspect ratio (0.75, 1.5), one
  context block of scale (0.85, 1.0) and aspect ratio 1 from which the targets are removed
  (``allow_overlap=False``); the paper's configs use ``min_keep=10`` on a 14x14 grid.

All randomness comes from ``generator`` (a CPU ``torch.Generator``); ``None`` uses torch's global CPU
generator, which ``lightning_ssl.rng`` saves in checkpoints, so a resumed run draws the same masks.
Masks are made and returned on the CPU (move them with ``.to(device, non_blocking=True)``); the
block samplers read their scalar draws from the generator in float64 chunks of 64 uniforms.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "RandomMask",
    "MultiBlockMasks",
    "random_masking",
    "gather_tokens",
    "restore_tokens",
    "block_masks",
    "multi_block_masks",
]

_CHUNK = 64  # uniforms fetched from the generator at a time by the block samplers
_MIN_BLOCK_PATCHES = 4  # BEiT's min_num_patches (DINOv2's MaskingGenerator default too)
_BLOCK_ATTEMPTS = 10  # BEiT / iBOT / DINOv2: attempts per block
_CONTEXT_ATTEMPTS = 20  # I-JEPA's timeout of context placements before it relaxes the constraint


@dataclass(frozen=True)
class RandomMask:
    """MAE's masking of a batch: ``keep`` (B x K, the kept patches in shuffled order), ``restore``
    (B x N, the inverse permutation of the shuffle) and ``mask`` (B x N bool, True = masked/removed)."""

    keep: Tensor
    restore: Tensor
    mask: Tensor


@dataclass(frozen=True)
class MultiBlockMasks:
    """I-JEPA's masks of a batch: ``context`` (B x Kc) and ``num_targets`` ``targets`` (each B x Kt),
    sorted patch indices; ``target_shape`` / ``context_shape`` are the batch's block ``(h, w)``."""

    context: Tensor
    targets: list[Tensor]
    target_shape: tuple[int, int]
    context_shape: tuple[int, int]


class _Uniforms:
    """Scalar draws from ``generator`` (None: torch's global CPU generator), 64 float64 uniforms at a time."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self.buffer: list[float] = []
        self.position = 0

    def random(self) -> float:
        """A uniform in [0, 1)."""
        if self.position == len(self.buffer):
            chunk = torch.rand(_CHUNK, dtype=torch.float64, device="cpu", generator=self.generator)
            self.buffer, self.position = chunk.tolist(), 0
        value = self.buffer[self.position]
        self.position += 1
        return value

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def randint(self, low: int, high: int) -> int:
        """An integer uniform in [low, high], both included."""
        return low + min(int(self.random() * (high - low + 1)), high - low)


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (masks are generated on the CPU), got one on {generator.device}"
        )


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_grid(grid: Sequence[int], minimum: int, why: str = "") -> tuple[int, int]:
    try:
        rows, cols = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (rows, cols), got {grid!r}") from None
    for side in (rows, cols):
        if isinstance(side, bool) or not isinstance(side, int) or side < minimum:
            raise ValueError(f"grid must be (rows, cols) with both at least {minimum}{why}, got {grid!r}")
    return rows, cols


def _check_interval(
    name: str, value: Sequence[float], low: float, high: float, low_open: bool = False
) -> tuple[float, float]:
    """``value`` as a pair ``(a, b)`` with ``low <= a <= b <= high`` (``low < a`` when ``low_open``)."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    lower_ok = a > low if low_open else a >= low
    if not (lower_ok and a <= b <= high):
        sign = "<" if low_open else "<="
        raise ValueError(f"{name} must satisfy {low} {sign} low <= high <= {high}, got {value!r}")
    return a, b


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None
) -> RandomMask:
    """MAE's random masking (He et al. 2022; paper's ``mask_ratio`` 0.75): per image, shuffle the
    ``num_patches`` patches by uniform noise and keep the first ``K = int(num_patches * (1 - mask_ratio))``.

    As in models_mae.py: ``shuffle = argsort(noise)``, ``restore = argsort(shuffle)``,
    ``keep = shuffle[:, :K]``; ``mask`` is True at the ``N - K`` removed patches.
    """
    _check_count("batch", batch)
    _check_count("num_patches", num_patches)
    _check_generator(generator)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep_count = int(num_patches * (1 - mask_ratio))
    if keep_count < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps int({num_patches} * (1 - mask_ratio)) = {keep_count} of "
            f"num_patches={num_patches} patches; at least one must be kept: lower mask_ratio"
        )
    noise = torch.rand(batch, num_patches, device="cpu", generator=generator)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    keep = shuffle[:, :keep_count]
    mask = torch.ones(batch, num_patches, dtype=torch.bool, device="cpu")
    mask.scatter_(1, keep, False)
    return RandomMask(keep=keep, restore=restore, mask=mask)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``B x N x D`` tokens at the ``B x K`` patch indices ``index``: ``B x K x D`` (MAE's ``x_masked``)."""
    if x.ndim != 3:
        raise ValueError(f"x must be B x N x D tokens, got shape {tuple(x.shape)}")
    if index.ndim != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"index must be B x K with B = {x.shape[0]}, got shape {tuple(index.shape)}")
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x_kept_plus_mask_tokens: Tensor, restore: Tensor) -> Tensor:
    """MAE decoder's unshuffle: ``B x N x D`` tokens in shuffled order (the K kept tokens, then N - K
    mask tokens; class token excluded) back to patch order with ``RandomMask.restore``."""
    x = x_kept_plus_mask_tokens
    if x.ndim != 3:
        raise ValueError(f"x_kept_plus_mask_tokens must be B x N x D tokens, got shape {tuple(x.shape)}")
    if tuple(restore.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"restore must be B x N = {tuple(x.shape[:2])} (one index per token), got shape {tuple(restore.shape)}"
        )
    return torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _add_block(mask: Tensor, remaining: int, log_aspect: tuple[float, float], draws: _Uniforms) -> int:
    """One block of BEiT's loop on the ``rows x cols`` bool ``mask``, in place: the patches it added (0: none)."""
    rows, cols = mask.shape
    low = min(_MIN_BLOCK_PATCHES, remaining)
    for _ in range(_BLOCK_ATTEMPTS):
        area = draws.uniform(low, remaining)
        aspect = math.exp(draws.uniform(*log_aspect))
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if 1 <= h <= rows and 1 <= w <= cols:
            top = draws.randint(0, rows - h)
            left = draws.randint(0, cols - w)
            region = mask[top : top + h, left : left + w]
            added = h * w - int(region.sum())
            if 0 < added <= remaining:
                region.fill_(True)
                return added
    return 0


def block_masks(
    batch: int,
    grid: tuple[int, int],
    ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 1.0,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
    exact: bool = False,
) -> Tensor:
    """BEiT/iBOT/DINOv2 block-wise masks: ``B x rows*cols`` bool, True = masked.

    Each image is masked with probability ``mask_probability`` (DINOv2: 0.5; iBOT's argparse
    default: 1.0). A masked image gets a ratio uniform in ``ratio_range`` and a target of
    ``round(ratio * N)`` patches, reached by BEiT's alg. 1: each block has an area uniform in
    ``[min(4, remaining), remaining]`` (BEiT's and DINOv2's min_num_patches=4; iBOT's code uses
    ``(min(rows, cols) // 3) ** 2``, 16 at 14x14), an aspect ratio log-uniform in
    ``[min_aspect, 1 / min_aspect]``, ``h = round(sqrt(area * aspect))``,
    ``w = round(sqrt(area / aspect))``, and a uniform position inside the grid; it is accepted if it
    adds between 1 and ``remaining`` new patches, with up to 10 attempts a block; the loop stops when
    no attempt adds anything. Blocks may span the whole grid (``h <= rows``, ``w <= cols``; the
    reference codes require ``h < rows`` and ``w < cols``).

    The loop never overshoots the target but can fall short of it (often on tiny grids, where few
    block shapes fit). ``exact=True`` tops each masked image up with random single patches to exactly
    ``round(ratio * N)``; DINOv2's collate does not. DINOv2 also masks exactly ``int(B * 0.5)`` images
    with ratios stratified over the range, where here each image is masked independently.
    """
    _check_count("batch", batch)
    rows, cols = _check_grid(grid, minimum=1)
    low_ratio, high_ratio = _check_interval("ratio_range", ratio_range, 0.0, 1.0)
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(
            f"min_aspect must be in (0, 1] (aspect ratios span [min_aspect, 1 / min_aspect]), got {min_aspect}"
        )
    _check_generator(generator)
    num_patches = rows * cols
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    draws = _Uniforms(generator)
    masks = torch.zeros(batch, rows, cols, dtype=torch.bool, device="cpu")
    for b in range(batch):
        if draws.random() >= mask_probability:
            continue
        target = round(draws.uniform(low_ratio, high_ratio) * num_patches)
        mask = masks[b]
        count = 0
        while count < target:
            added = _add_block(mask, target - count, log_aspect, draws)
            if added == 0:
                break
            count += added
        if exact and count < target:
            flat = mask.view(-1)
            free = (~flat).nonzero().flatten().tolist()
            for _ in range(target - count):
                flat[free.pop(draws.randint(0, len(free) - 1))] = True
    return masks.flatten(1)


def _block_shape(max_keep: int, aspect: float, rows: int, cols: int) -> tuple[int, int]:
    """I-JEPA's ``_sample_block_size``: sides of a ``max_keep``-patch block of ``aspect`` (h / w),
    clamped to ``[1, rows - 1]`` and ``[1, cols - 1]``."""
    h = round(math.sqrt(max_keep * aspect))
    w = round(math.sqrt(max_keep / aspect))
    return min(max(h, 1), rows - 1), min(max(w, 1), cols - 1)


@functools.lru_cache(maxsize=128)
def _max_block_area(rows: int, cols: int, scale: tuple[float, float], aspect: tuple[float, float]) -> int:
    """The largest ``h * w`` that ``_block_shape`` gives for a scale in ``scale`` and an aspect ratio in ``aspect``.

    For each ``max_keep = int(N * scale)`` the shape only changes where ``sqrt(max_keep * a)`` or
    ``sqrt(max_keep / a)`` crosses a half-integer, so the shapes at those points, at the ends of
    ``aspect`` and between consecutive points are all the shapes there are.
    """
    num_patches = rows * cols
    best = 0
    for max_keep in range(int(num_patches * scale[0]), int(num_patches * scale[1]) + 1):
        points = {aspect[0], aspect[1]}
        if max_keep > 0:
            k_max = math.ceil(math.sqrt(max_keep * max(aspect[1], 1 / aspect[0]))) + 1
            for k in range(k_max + 1):
                for a in ((k + 0.5) ** 2 / max_keep, max_keep / (k + 0.5) ** 2):
                    if aspect[0] < a < aspect[1]:
                        points.add(a)
        ordered = sorted(points)
        candidates = ordered + [(x + y) / 2 for x, y in zip(ordered, ordered[1:])]
        for a in candidates:
            h, w = _block_shape(max_keep, a, rows, cols)
            best = max(best, h * w)
    return best


def _block_indices(top: int, left: int, h: int, w: int, cols: int) -> Tensor:
    """Row-major (sorted) patch indices of the ``h x w`` block at ``(top, left)``."""
    rows_idx = torch.arange(top, top + h, device="cpu").unsqueeze(1)
    cols_idx = torch.arange(left, left + w, device="cpu").unsqueeze(0)
    return (rows_idx * cols + cols_idx).flatten()


def multi_block_masks(
    batch: int,
    grid: tuple[int, int],
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect: tuple[float, float] = (1.0, 1.0),
    min_keep: int = 4,
    allow_overlap: bool = False,
    generator: torch.Generator | None = None,
) -> MultiBlockMasks:
    """I-JEPA's multi-block masks (Assran et al. 2023; ``MaskCollator`` of src/masks/multiblock.py).

    As in that code, one target block shape and one context block shape are drawn per batch:
    ``max_keep = int(N * scale)``, ``h = round(sqrt(max_keep * aspect))``,
    ``w = round(sqrt(max_keep / aspect))``, clamped to ``[1, rows - 1]`` and ``[1, cols - 1]``. Per
    image, ``num_targets`` target blocks go at uniform positions (they may overlap each other), then
    one context block, from which every target patch is removed unless ``allow_overlap``. The context
    must keep at least ``min_keep`` patches: its placement is retried up to 20 times, after which it
    falls back to every patch outside the targets (``min_keep=4`` is ``MaskCollator``'s default; the
    paper's configs use 10 on a 14x14 grid). The arguments are rejected up front where targets
    of the largest possible shape could leave fewer than ``min_keep`` patches outside them.

    Each image's indices are sorted; targets all have ``h * w`` patches, and contexts are truncated to
    the batch's smallest context by keeping their first indices in sorted order (the code's
    ``min_keep_enc`` truncation, which drops the bottom-right patches of the larger contexts).

    Differences from the code: the target scale and aspect ratio are drawn independently (the code
    uses one uniform for both); blocks may touch the bottom and right edges (the code's
    ``randint(0, rows - h)`` excludes the last position); ``min_keep`` bounds the context only, with
    ``>=`` (the code requires more than ``min_keep`` patches in every block); and the fallback is
    the complement of the targets (the code drops the constraint of one target at a time).
    """
    _check_count("batch", batch)
    rows, cols = _check_grid(grid, minimum=2, why=" (blocks are at most rows - 1 by cols - 1, as in I-JEPA's code)")
    _check_count("num_targets", num_targets)
    target_scale = _check_interval("target_scale", target_scale, 0.0, 1.0, low_open=True)
    target_aspect = _check_interval("target_aspect", target_aspect, 0.0, math.inf, low_open=True)
    context_scale = _check_interval("context_scale", context_scale, 0.0, 1.0, low_open=True)
    context_aspect = _check_interval("context_aspect", context_aspect, 0.0, math.inf, low_open=True)
    _check_count("min_keep", min_keep)
    _check_generator(generator)
    num_patches = rows * cols
    largest = _max_block_area(rows, cols, target_scale, target_aspect)
    if num_patches - num_targets * largest < min_keep:
        raise ValueError(
            f"grid {rows}x{cols} is too small for min_keep={min_keep}: num_targets={num_targets} target blocks of up "
            f"to {largest} patches (target_scale={target_scale}, target_aspect={target_aspect}) can leave "
            f"{max(num_patches - num_targets * largest, 0)} context patches; use a larger grid, fewer or smaller "
            "targets, or a smaller min_keep"
        )

    draws = _Uniforms(generator)
    th, tw = _block_shape(int(num_patches * draws.uniform(*target_scale)), draws.uniform(*target_aspect), rows, cols)
    ch, cw = _block_shape(int(num_patches * draws.uniform(*context_scale)), draws.uniform(*context_aspect), rows, cols)

    image_targets: list[list[Tensor]] = []
    contexts: list[Tensor] = []
    for _ in range(batch):
        covered = torch.zeros(num_patches, dtype=torch.bool, device="cpu")
        blocks = []
        for _ in range(num_targets):
            block = _block_indices(draws.randint(0, rows - th), draws.randint(0, cols - tw), th, tw, cols)
            covered[block] = True
            blocks.append(block)
        image_targets.append(blocks)
        context = None
        for _ in range(_CONTEXT_ATTEMPTS):
            block = _block_indices(draws.randint(0, rows - ch), draws.randint(0, cols - cw), ch, cw, cols)
            if not allow_overlap:
                block = block[~covered[block]]
            if block.numel() >= min_keep:
                context = block
                break
        if context is None:
            context = (~covered).nonzero().flatten()
        contexts.append(context)

    keep_context = min(c.numel() for c in contexts)
    return MultiBlockMasks(
        context=torch.stack([c[:keep_context] for c in contexts]),
        targets=[torch.stack([blocks[i] for blocks in image_targets]) for i in range(num_targets)],
        target_shape=(th, tw),
        context_shape=(ch, cw),
    )
