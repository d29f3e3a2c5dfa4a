"""``lightning_ssl.mask_sampling``: the masks of a global batch, the same on 1 or 2 processes, and repeated
on resume from the saved seed."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
import torch
from dist_utils import run_distributed
from torch import nn

from lightning_ssl.datamodules.resumable import ResumableSampler
from lightning_ssl.mask_sampling import MaskSampler, mask_generator, sample_masks, take_rows


@dataclass(frozen=True)
class Drawn:
    keep: torch.Tensor
    targets: list[torch.Tensor]
    shape: tuple[int, int]


def draw(n: int, g: torch.Generator) -> Drawn:
    """Masks of ``n`` images from ``g``: a permutation per image, two target lists, one shape per batch."""
    keep = torch.argsort(torch.rand(n, 16, generator=g), dim=1)[:, :4]
    targets = [torch.randint(0, 16, (n, 3), generator=g) for _ in range(2)]
    side = int(torch.randint(1, 4, (), generator=g))
    return Drawn(keep, targets, (side, side))


def test_take_rows_slices_tensors_lists_and_dataclass_fields():
    masks = draw(6, torch.Generator().manual_seed(0))
    part = take_rows(masks, slice(1, None, 2))
    assert torch.equal(part.keep, masks.keep[1::2]) and part.shape == masks.shape
    assert all(torch.equal(a, b[1::2]) for a, b in zip(part.targets, masks.targets))
    assert torch.equal(take_rows(masks.keep, slice(1, 2)), masks.keep[1:2])


def test_streams_differ_between_steps_and_epochs_and_repeat_for_the_same_step():
    a = sample_masks(draw, 4, 7, 0, 0)
    assert torch.equal(a.keep, sample_masks(draw, 4, 7, 0, 0).keep)
    others = [sample_masks(draw, 4, 7, 0, 1), sample_masks(draw, 4, 7, 1, 0), sample_masks(draw, 4, 8, 0, 0)]
    assert all(not torch.equal(a.keep, o.keep) for o in others)
    # unaffected by the global generators (what a resumed run may not have restored)
    torch.manual_seed(123)
    assert torch.equal(a.keep, sample_masks(draw, 4, 7, 0, 0).keep)
    assert mask_generator(1, 2, 3).initial_seed() == mask_generator(1, 2, 3).initial_seed()


def test_sampler_seed_comes_from_the_global_generator_and_round_trips_the_state_dict():
    torch.manual_seed(0)
    a = nn.Module()
    a.sampler = MaskSampler()
    torch.manual_seed(0)
    assert MaskSampler().seed == a.sampler.seed
    b = nn.Module()
    b.sampler = MaskSampler()
    assert b.sampler.seed != a.sampler.seed
    state = a.state_dict()
    assert set(state) == {"sampler._extra_state"}
    b.load_state_dict(state)
    assert b.sampler.seed == a.sampler.seed
    assert torch.equal(b.sampler.sample(draw, 4, 0, 3).keep, a.sampler.sample(draw, 4, 0, 3).keep)
    loaded = torch.load(_saved(state), weights_only=True)  # checkpoints stay weights_only-loadable
    assert int(loaded["sampler._extra_state"]) == a.sampler.seed


def _saved(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def _worker(rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # different global streams per process, as without seed_everything
    sampler = MaskSampler()
    before = sampler.seed
    sampler.broadcast()
    samples = _sampler_batch(11, 2, 5, 3)  # this process's batch 5 of epoch 2, 3 images per process
    return {"before": before, "seed": sampler.seed, "masks": sampler.sample(draw, 3, 2, 5), "samples": samples}


def _sampler_batch(seed: int, epoch: int, batch_idx: int, batch: int) -> list[int]:
    """The dataset indices of batch ``batch_idx`` of ``epoch`` under the library's sampler, in this process."""
    sampler = ResumableSampler(range(36), shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return [index for index, _ in sampler][batch_idx * batch : (batch_idx + 1) * batch]


@pytest.mark.distributed
def test_each_image_gets_the_mask_one_process_gives_it_on_two_processes():
    """Under the library's sampler the two processes' batches interleave the one-process batch (rank r
    holds rows r, r + 2, ...); each image's mask is the one it has in one process."""
    out = run_distributed(_worker, 2)
    assert out[0]["before"] != out[1]["before"]  # the broadcast is what makes them agree
    assert out[0]["seed"] == out[1]["seed"] == out[0]["before"]
    whole = sample_masks(draw, 6, out[0]["seed"], 2, 5)
    one_process = _sampler_batch(11, 2, 5, 6)
    assert sorted(out[0]["samples"] + out[1]["samples"]) == sorted(one_process)
    for r in range(2):
        masks, rows = out[r]["masks"], [one_process.index(i) for i in out[r]["samples"]]
        assert rows == list(range(r, 6, 2))
        assert torch.equal(masks.keep, whole.keep[rows])
        assert all(torch.equal(a, b[rows]) for a, b in zip(masks.targets, whole.targets))
        assert masks.shape == whole.shape
