"""Patch masks of lightning_ssl.masking against plain reimplementations of MAE's, BEiT's and I-JEPA's loops."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ssl.masking import (
    MultiBlockMasks,
    block_masks,
    gather_tokens,
    multi_block_masks,
    random_masking,
    restore_tokens,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- MAE


@pytest.mark.parametrize("num_patches, mask_ratio", [(49, 0.75), (16, 0.0), (16, 0.9), (196, 0.75), (10, 0.55)])
def test_random_masking_counts_and_keep(num_patches, mask_ratio):
    batch = 6
    out = random_masking(batch, num_patches, mask_ratio, generator=gen(0))
    keep_count = int(num_patches * (1 - mask_ratio))
    assert out.keep.shape == (batch, keep_count) and out.keep.dtype == torch.long
    assert out.restore.shape == (batch, num_patches) and out.restore.dtype == torch.long
    assert out.mask.shape == (batch, num_patches) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [num_patches - keep_count] * batch
    for b in range(batch):
        kept = set(out.keep[b].tolist())
        assert len(kept) == keep_count
        for n in range(num_patches):
            assert bool(out.mask[b, n]) == (n not in kept)


def test_random_masking_matches_mae_code():
    batch, num_patches, mask_ratio = 5, 49, 0.75
    out = random_masking(batch, num_patches, mask_ratio, generator=gen(3))
    # models_mae.py's random_masking, written out
    len_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, generator=gen(3))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    assert torch.equal(out.keep, ids_shuffle[:, :len_keep])
    assert torch.equal(out.restore, ids_restore)
    assert torch.equal(out.mask, mask.bool())
    # restore is the inverse permutation of the shuffle
    for b in range(batch):
        assert sorted(out.restore[b].tolist()) == list(range(num_patches))
        for i in range(num_patches):
            assert int(out.restore[b, ids_shuffle[b, i]]) == i


def test_gather_then_restore_gives_back_the_tokens():
    batch, num_patches, dim = 4, 16, 8
    x = torch.randn(batch, num_patches, dim, generator=gen(1))
    out = random_masking(batch, num_patches, 0.75, generator=gen(2))
    keep_count = out.keep.shape[1]
    kept = gather_tokens(x, out.keep)
    for b in range(batch):
        for k in range(keep_count):
            assert torch.equal(kept[b, k], x[b, out.keep[b, k]])
    shuffle = torch.argsort(out.restore, dim=1)  # the inverse of the inverse
    assert torch.equal(shuffle[:, :keep_count], out.keep)
    removed = gather_tokens(x, shuffle[:, keep_count:])
    assert torch.equal(restore_tokens(torch.cat([kept, removed], 1), out.restore), x)
    # MAE's decoder input: kept tokens then mask tokens, unshuffled
    mask_token = torch.full((1, 1, dim), 7.0)
    decoded = restore_tokens(torch.cat([kept, mask_token.expand(batch, num_patches - keep_count, dim)], 1), out.restore)
    assert torch.equal(decoded[~out.mask], x[~out.mask])
    assert bool((decoded[out.mask] == 7.0).all())


def test_random_masking_bad_inputs():
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            random_masking(2, 16, ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 3, 0.7)  # keeps int(0.9) = 0 patches
    with pytest.raises(ValueError, match="batch"):
        random_masking(0, 16, 0.5)
    with pytest.raises(ValueError, match="num_patches"):
        random_masking(2, 0, 0.5)
    with pytest.raises(ValueError, match="x must be"):
        gather_tokens(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="index"):
        gather_tokens(torch.zeros(2, 4, 3), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="restore"):
        restore_tokens(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))


# ---------------------------------------------------------------- BEiT / iBOT / DINOv2


class ReferenceDraws:
    """The library's draw protocol: float64 uniforms fetched 64 at a time from the generator."""

    def __init__(self, generator):
        self.generator, self.values = generator, []

    def random(self):
        if not self.values:
            self.values = torch.rand(64, dtype=torch.float64, generator=self.generator).tolist()
        return self.values.pop(0)

    def uniform(self, a, b):
        return a + (b - a) * self.random()

    def randint(self, a, b):
        return a + min(int(self.random() * (b - a + 1)), b - a)


def reference_block_masks(batch, grid, ratio_range, mask_probability, min_aspect, generator, exact):
    """BEiT's / iBOT's masking loop on nested lists; also returns every accepted block and each target."""
    rows, cols = grid
    draws = ReferenceDraws(generator)
    masks, blocks, targets = [], [], []
    for _ in range(batch):
        mask = [[False] * cols for _ in range(rows)]
        image_blocks, target = [], None
        if draws.random() < mask_probability:
            target = round(draws.uniform(*ratio_range) * rows * cols)
            count = 0
            while count < target:
                remaining = target - count
                delta = 0
                for _attempt in range(10):
                    area = draws.uniform(min(4, remaining), remaining)
                    aspect = math.exp(draws.uniform(math.log(min_aspect), math.log(1 / min_aspect)))
                    h = int(round(math.sqrt(area * aspect)))
                    w = int(round(math.sqrt(area / aspect)))
                    if 1 <= h <= rows and 1 <= w <= cols:
                        top = draws.randint(0, rows - h)
                        left = draws.randint(0, cols - w)
                        already = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                        if 0 < h * w - already <= remaining:
                            for i in range(top, top + h):
                                for j in range(left, left + w):
                                    mask[i][j] = True
                            delta = h * w - already
                            image_blocks.append((top, left, h, w, area, aspect))
                            break
                if delta == 0:
                    break
                count += delta
            if exact and count < target:
                free = [i * cols + j for i in range(rows) for j in range(cols) if not mask[i][j]]
                for _ in range(target - count):
                    n = free.pop(draws.randint(0, len(free) - 1))
                    mask[n // cols][n % cols] = True
        masks.append([v for row in mask for v in row])
        blocks.append(image_blocks)
        targets.append(target)
    return torch.tensor(masks, dtype=torch.bool), blocks, targets


@pytest.mark.parametrize(
    "grid, ratio_range, mask_probability, min_aspect, exact",
    [
        ((14, 14), (0.1, 0.5), 1.0, 0.3, False),
        ((14, 14), (0.1, 0.5), 0.5, 0.3, True),
        ((5, 7), (0.2, 0.6), 1.0, 0.5, False),
        ((4, 4), (0.1, 0.5), 1.0, 0.3, True),
        ((2, 3), (0.3, 0.9), 1.0, 0.3, False),
        ((1, 9), (0.2, 0.4), 1.0, 0.3, True),
    ],
)
def test_block_masks_match_beit_loop(grid, ratio_range, mask_probability, min_aspect, exact):
    batch = 8
    for seed in range(3):
        got = block_masks(batch, grid, ratio_range, mask_probability, min_aspect, generator=gen(seed), exact=exact)
        want, blocks, targets = reference_block_masks(
            batch, grid, ratio_range, mask_probability, min_aspect, gen(seed), exact
        )
        assert got.shape == (batch, grid[0] * grid[1]) and got.dtype == torch.bool
        assert torch.equal(got, want)
        for image_blocks, target, row in zip(blocks, targets, got):
            if target is None:
                assert not bool(row.any())
                continue
            assert int(row.sum()) == target if exact else int(row.sum()) <= target
            for top, left, h, w, area, aspect in image_blocks:
                assert top >= 0 and top + h <= grid[0] and left >= 0 and left + w <= grid[1]
                assert min_aspect - 1e-9 <= aspect <= 1 / min_aspect + 1e-9
                # the sides are the rounded sides of a block of that area and aspect ratio
                assert abs(h - math.sqrt(area * aspect)) <= 0.5 and abs(w - math.sqrt(area / aspect)) <= 0.5
                hull = [row.view(grid)[i, j] for i in range(top, top + h) for j in range(left, left + w)]
                assert all(bool(v) for v in hull)


@pytest.mark.parametrize("grid", [(14, 14), (4, 4), (3, 3), (2, 5), (1, 7)])
def test_block_masks_exact_counts(grid):
    num_patches = grid[0] * grid[1]
    fixed = block_masks(16, grid, ratio_range=(0.3, 0.3), exact=True, generator=gen(0))
    assert fixed.sum(1).tolist() == [round(0.3 * num_patches)] * 16
    ranged = block_masks(32, grid, ratio_range=(0.1, 0.5), exact=True, generator=gen(1)).sum(1)
    assert bool((ranged >= round(0.1 * num_patches)).all()) and bool((ranged <= round(0.5 * num_patches)).all())
    assert len(set(ranged.tolist())) > 1 or num_patches < 10  # the ratio varies by image
    full = block_masks(4, grid, ratio_range=(1.0, 1.0), exact=True, generator=gen(2))
    assert bool(full.all())


def test_block_masks_without_exact_never_overshoot():
    for grid in [(14, 14), (3, 3), (2, 2)]:
        counts = block_masks(64, grid, ratio_range=(0.4, 0.4), generator=gen(5)).sum(1)
        assert bool((counts <= round(0.4 * grid[0] * grid[1])).all())


def test_block_masks_mask_probability():
    batch = 1000
    masked = block_masks(batch, (6, 6), mask_probability=0.5, exact=True, generator=gen(0)).any(1)
    # binomial(1000, 0.5): standard deviation 15.8, so +-80 is a 5-sigma band
    assert abs(int(masked.sum()) - batch // 2) <= 80
    assert not bool(block_masks(200, (6, 6), mask_probability=0.0, generator=gen(1)).any())
    assert bool(block_masks(200, (6, 6), mask_probability=1.0, exact=True, generator=gen(2)).any(1).all())


def test_block_masks_bad_inputs():
    for ratio_range in [(0.5, 0.1), (-0.1, 0.2), (0.2, 1.2), (0.3,)]:
        with pytest.raises(ValueError, match="ratio_range"):
            block_masks(2, (4, 4), ratio_range=ratio_range)
    for probability in (-0.1, 1.5):
        with pytest.raises(ValueError, match="mask_probability"):
            block_masks(2, (4, 4), mask_probability=probability)
    for min_aspect in (0.0, 1.5):
        with pytest.raises(ValueError, match="min_aspect"):
            block_masks(2, (4, 4), min_aspect=min_aspect)
    for grid in [(0, 4), (4,), (2.0, 3)]:
        with pytest.raises(ValueError, match="grid"):
            block_masks(2, grid)
    with pytest.raises(ValueError, match="batch"):
        block_masks(0, (4, 4))


# ---------------------------------------------------------------- I-JEPA


def feasible_shapes(grid, scale, aspect):
    """Every clamped (h, w) of I-JEPA's size rule for a scale in ``scale`` and an aspect ratio in ``aspect``:
    h = round(sqrt(m a)) and w = round(sqrt(m / a)) with m = int(N s) hold on closed intervals of a."""
    rows, cols = grid
    shapes = set()
    for m in range(int(rows * cols * scale[0]), int(rows * cols * scale[1]) + 1):
        assert m > 0
        for h in range(0, math.ceil(math.sqrt(m * aspect[1])) + 2):
            for w in range(0, math.ceil(math.sqrt(m / aspect[0])) + 2):
                low = max(aspect[0], max(h - 0.5, 0) ** 2 / m, m / (w + 0.5) ** 2)
                high = min(aspect[1], (h + 0.5) ** 2 / m, m / (w - 0.5) ** 2 if w > 0 else math.inf)
                if low <= high:
                    shapes.add((min(max(h, 1), rows - 1), min(max(w, 1), cols - 1)))
    return shapes


def check_multi_block(out: MultiBlockMasks, batch, grid, num_targets, min_keep, allow_overlap=False):
    rows, cols = grid
    num_patches = rows * cols
    th, tw = out.target_shape
    assert len(out.targets) == num_targets
    assert out.context.dtype == torch.long and out.context.shape[0] == batch
    assert out.context.shape[1] >= min_keep
    for target in out.targets:
        assert target.dtype == torch.long and target.shape == (batch, th * tw)
    for b in range(batch):
        context = out.context[b].tolist()
        assert context == sorted(set(context)) and context[0] >= 0 and context[-1] < num_patches
        target_patches = set()
        for target in out.targets:
            indices = target[b].tolist()
            assert indices == sorted(set(indices)) and indices[0] >= 0 and indices[-1] < num_patches
            top, left = indices[0] // cols, indices[0] % cols
            rectangle = [(top + i) * cols + left + j for i in range(th) for j in range(tw)]
            assert top + th <= rows and left + tw <= cols and indices == rectangle
            target_patches.update(indices)
        if not allow_overlap:
            assert not target_patches & set(context)


def test_multi_block_masks_defaults_at_14x14():
    grid, batch = (14, 14), 8
    target_shapes = feasible_shapes(grid, (0.15, 0.2), (0.75, 1.5))
    context_shapes = feasible_shapes(grid, (0.85, 1.0), (1.0, 1.0))
    assert context_shapes == {(13, 13)}  # 166..196 patches of aspect 1, clamped to 13 as the code does
    seen = set()
    for seed in range(12):
        out = multi_block_masks(batch, grid, min_keep=10, generator=gen(seed))
        check_multi_block(out, batch, grid, 4, 10)
        assert out.target_shape in target_shapes and out.context_shape in context_shapes
        th, tw = out.target_shape
        # unrounded sides sqrt(m a) and sqrt(m / a) lie within 0.5 of th and tw, with m = int(196 * scale) in
        # [29, 39] their product and a in [0.75, 1.5] their ratio
        assert (th - 0.5) * (tw - 0.5) <= 39 and (th + 0.5) * (tw + 0.5) >= 29
        assert (th - 0.5) / (tw + 0.5) <= 1.5 and (th + 0.5) / (tw - 0.5) >= 0.75
        seen.add(out.target_shape)
    assert len(seen) > 1  # the target shape is drawn per batch


def test_multi_block_masks_small_grids_and_ranges():
    cases = [
        ((8, 8), dict()),
        ((6, 9), dict(num_targets=2, target_aspect=(0.5, 2.0), context_scale=(0.6, 0.9), context_aspect=(0.8, 1.25))),
        ((2, 6), dict(num_targets=1, target_scale=(0.2, 0.3), min_keep=2)),
    ]
    for grid, kwargs in cases:
        defaults = dict(num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0))
        defaults.update(context_aspect=(1.0, 1.0), min_keep=4)
        defaults.update(kwargs)
        shapes = feasible_shapes(grid, defaults["target_scale"], defaults["target_aspect"])
        context_shapes = feasible_shapes(grid, defaults["context_scale"], defaults["context_aspect"])
        for seed in range(6):
            out = multi_block_masks(6, grid, **kwargs, generator=gen(seed))
            check_multi_block(out, 6, grid, defaults["num_targets"], defaults["min_keep"])
            assert out.target_shape in shapes and out.context_shape in context_shapes


def test_multi_block_context_lies_in_its_block_without_fallback():
    # one target of <= 42 patches leaves >= 127 of the 13x13 context block, so the block is always kept
    grid = (14, 14)
    for seed in range(4):
        out = multi_block_masks(8, grid, num_targets=1, min_keep=10, generator=gen(seed))
        ch, cw = out.context_shape
        for b in range(8):
            rows = [n // 14 for n in out.context[b].tolist()]
            cols = [n % 14 for n in out.context[b].tolist()]
            assert max(rows) - min(rows) < ch and max(cols) - min(cols) < cw


def test_multi_block_fallback_and_truncation():
    # a 1x1 context block never keeps min_keep=5 patches, so each context is the complement of its targets,
    # and contexts are cut to the batch's smallest one by keeping their first (sorted) indices
    grid, batch = (6, 6), 16
    out = multi_block_masks(
        batch,
        grid,
        num_targets=2,
        target_scale=(0.25, 0.25),
        target_aspect=(1.0, 1.0),
        context_scale=(0.03, 0.03),
        min_keep=5,
        generator=gen(0),
    )
    assert out.target_shape == (3, 3) and out.context_shape == (1, 1)
    complements = []
    for b in range(batch):
        covered = set(out.targets[0][b].tolist()) | set(out.targets[1][b].tolist())
        complements.append([n for n in range(36) if n not in covered])
    sizes = [len(c) for c in complements]
    assert len(set(sizes)) > 1  # overlapping targets, so truncation happens
    assert out.context.shape == (batch, min(sizes))
    for b in range(batch):
        assert out.context[b].tolist() == complements[b][: min(sizes)]


def test_multi_block_allow_overlap_keeps_the_whole_context_block():
    out = multi_block_masks(8, (14, 14), allow_overlap=True, min_keep=10, generator=gen(0))
    check_multi_block(out, 8, (14, 14), 4, 10, allow_overlap=True)
    ch, cw = out.context_shape
    assert out.context.shape == (8, ch * cw)
    overlaps = [set(out.context[b].tolist()) & set(out.targets[0][b].tolist()) for b in range(8)]
    assert any(overlaps)


@pytest.mark.parametrize("grid, num_targets", [((8, 8), 4), ((14, 14), 4), ((6, 10), 2), ((5, 5), 3)])
def test_multi_block_min_keep_bound_is_the_largest_target(grid, num_targets):
    # the up-front check allows exactly what targets of the largest feasible shape always leave
    largest = max(h * w for h, w in feasible_shapes(grid, (0.15, 0.2), (0.75, 1.5)))
    bound = grid[0] * grid[1] - num_targets * largest
    out = multi_block_masks(4, grid, num_targets=num_targets, min_keep=bound, generator=gen(0))
    check_multi_block(out, 4, grid, num_targets, bound)
    with pytest.raises(ValueError, match="min_keep"):
        multi_block_masks(4, grid, num_targets=num_targets, min_keep=bound + 1)


def test_multi_block_bad_inputs():
    with pytest.raises(ValueError, match="num_targets"):
        multi_block_masks(2, (8, 8), num_targets=0)
    with pytest.raises(ValueError, match="min_keep"):
        multi_block_masks(2, (4, 4))  # four 2x2 targets can cover the whole 4x4 grid
    with pytest.raises(ValueError, match="min_keep"):
        multi_block_masks(2, (8, 8), min_keep=40)
    with pytest.raises(ValueError, match="min_keep"):
        multi_block_masks(2, (8, 8), min_keep=0)
    for grid in [(1, 5), (5, 1), (5,)]:
        with pytest.raises(ValueError, match="grid"):
            multi_block_masks(2, grid)
    for name, bad in [
        ("target_scale", (0.3, 0.2)),
        ("target_scale", (0.0, 0.2)),
        ("context_scale", (0.9, 1.1)),
        ("target_aspect", (-1.0, 1.0)),
        ("context_aspect", (2.0, 1.0)),
    ]:
        with pytest.raises(ValueError, match=name):
            multi_block_masks(2, (8, 8), **{name: bad})
    with pytest.raises(ValueError, match="batch"):
        multi_block_masks(0, (8, 8))


# ---------------------------------------------------------------- randomness and devices


def all_masks(generator):
    return [
        random_masking(4, 49, 0.75, generator=generator).keep,
        block_masks(4, (7, 7), mask_probability=0.5, generator=generator),
        block_masks(4, (7, 7), exact=True, generator=generator),
        multi_block_masks(4, (8, 8), generator=generator).context,
        *multi_block_masks(4, (8, 8), generator=generator).targets,
    ]


def test_seeds_repeat_and_differ():
    first, again, other = all_masks(gen(0)), all_masks(gen(0)), all_masks(gen(1))
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert a.shape != c.shape or not torch.equal(a, c)


def test_global_generator_repeats_after_manual_seed():
    # the resume case: restoring the global CPU generator's state gives the same masks
    state = torch.get_rng_state()
    try:
        torch.manual_seed(123)
        first = all_masks(None)
        torch.manual_seed(123)
        again = all_masks(None)
        mid = torch.get_rng_state()
        later = all_masks(None)
        torch.set_rng_state(mid)
        resumed = all_masks(None)
    finally:
        torch.set_rng_state(state)
    explicit = all_masks(gen(123))
    for a, b, c, d, e in zip(first, again, explicit, later, resumed):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(d, e)


def test_masks_are_made_on_the_cpu_whatever_the_default_device():
    with torch.device("meta"):
        out = random_masking(2, 16, 0.5, generator=gen(0))
        block = block_masks(2, (4, 4), exact=True, generator=gen(0))
        multi = multi_block_masks(2, (8, 8), generator=gen(0))
    for tensor in (out.keep, out.restore, out.mask, block, multi.context, *multi.targets):
        assert tensor.device.type == "cpu"
