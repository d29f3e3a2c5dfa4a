"""Masks that do not depend on how many processes share the batch, and that repeat on resume.

A masked method (MAE, iBOT, DINOv2, I-JEPA) draws its patch masks in ``training_step``. Drawn from each
process's own generator, the masks of a 2-process run differ from those of one process on the same global
batch, and a resumed run depends on restoring every generator. ``MaskSampler.sample`` (``sample_masks``)
instead draws the masks of the whole global batch (``local batch x world size`` images) from a generator
seeded by the sampler's seed, the epoch and the batch index, and returns this process's rows: the same images get the
same masks on 1 or N processes, and a resumed run (or a rerun from the same checkpoint) draws exactly what
the uninterrupted run drew, whatever the other random streams did. With gradient accumulation each
micro-batch has its own batch index, hence its own masks.

The cost is drawing ``world size`` times more masks on the CPU than a process uses (microseconds per image
for ``masking``'s generators).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lightning_ssl.distributed import is_distributed, rank, world_size

__all__ = ["MaskSampler", "sample_masks", "mask_generator", "take_rows"]

T = TypeVar("T")

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def mask_generator(seed: int, epoch: int, batch_idx: int) -> torch.Generator:
    """A CPU generator seeded by a mix of ``seed``, ``epoch`` and ``batch_idx`` (SplitMix64-style, so nearby
    steps get unrelated streams)."""
    value = int(seed) & (2**64 - 1)
    for part, mult in zip((epoch, batch_idx), _MIX[1:]):
        value = ((value ^ (int(part) + _MIX[0])) * mult) & (2**64 - 1)
        value ^= value >> 31
    return torch.Generator().manual_seed(value & (2**63 - 1))


def take_rows(masks: T, rows: slice) -> T:
    """Rows ``rows`` of every batch-first tensor in ``masks``: a tensor, a list/tuple of them, or a
    dataclass whose fields are such (other fields, e.g. shapes drawn once per batch, are kept)."""
    if isinstance(masks, torch.Tensor):
        return masks[rows]
    if isinstance(masks, (list, tuple)) and not hasattr(masks, "_fields"):
        return type(masks)(take_rows(m, rows) for m in masks)
    if dataclasses.is_dataclass(masks) and not isinstance(masks, type):
        changes = {
            f.name: take_rows(getattr(masks, f.name), rows)
            for f in dataclasses.fields(masks)
            if isinstance(getattr(masks, f.name), (torch.Tensor, list, tuple))
        }
        return dataclasses.replace(masks, **changes)
    if hasattr(masks, "_fields"):  # a NamedTuple
        return type(masks)(*(take_rows(v, rows) for v in masks))
    return masks


def sample_masks(
    draw: Callable[[int, torch.Generator], T], local_batch: int, seed: int, epoch: int, batch_idx: int
) -> T:
    """This process's rows of ``draw(local_batch * world_size, generator)``, the masks of the global batch.

    ``draw(n, generator)`` makes the masks of ``n`` images (e.g.
    ``lambda n, g: masking.random_masking(n, 196, 0.75, generator=g)``); process ``r`` gets rows
    ``r, r + world, r + 2 * world, ...``: ``DistributedSampler`` deals the shuffled samples out in turn, so
    row ``j`` of process ``r``'s batch is row ``j * world + r`` of the batch one process would hold.
    """
    world, r = world_size(), rank()
    masks = draw(local_batch * world, mask_generator(seed, epoch, batch_idx))
    return masks if world == 1 else take_rows(masks, slice(r, None, world))


class MaskSampler(nn.Module):
    """A method's mask stream: a seed drawn from torch's global generator when the method is built (so
    ``seed_everything`` fixes it), kept on the host (no device read per step) and saved in the state dict
    (as ``<name>._extra_state``), so a checkpoint restores it. ``broadcast()`` gives every process rank 0's
    seed (``SSLMethod.setup`` calls it for every sampler of a method)."""

    def __init__(self):
        super().__init__()
        self.seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))

    def sample(self, draw: Callable[[int, torch.Generator], T], local_batch: int, epoch: int, batch_idx: int) -> T:
        """``sample_masks`` with this sampler's seed."""
        return sample_masks(draw, local_batch, self.seed, epoch, batch_idx)

    def broadcast(self) -> None:
        """Rank 0's seed on every process (a collective; nothing outside a distributed run)."""
        if is_distributed():
            seed = [self.seed]
            dist.broadcast_object_list(seed, src=0)
            self.seed = int(seed[0])

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.seed, dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        self.seed = int(state)

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
