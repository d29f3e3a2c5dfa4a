"""A training loader that a killed run resumes exactly, mid-epoch included.

``ResumableDataLoader`` shuffles with ``ResumableSampler`` (a ``DistributedSampler``: each process
takes its shard; in one process, all of it) and reports through ``state_dict()`` how many batches of
which epoch it has delivered; Lightning stores that in every checkpoint and hands it back through
``load_state_dict()`` before the loader is iterated again, and the sampler skips what was delivered.
The order of an epoch depends only on the seed and the epoch.

Augmentation randomness depends only on the sample too: the sampler yields ``(index, seed)`` keys,
with ``seed`` a function of the base seed, the epoch and the index, and the datasets of this package
draw each sample's views from a generator seeded with it. The views of an image in an epoch are then
the same whatever the number of workers, whichever worker makes them, and after a resume.

The iterator is created lazily, at the first batch, so that the epoch Lightning sets just before
(``set_epoch``) is the one the workers start on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_ssl.distributed import rank, world_size

__all__ = ["ResumableSampler", "ResumableDataLoader", "sample_seed", "common_seed", "SampleKey"]

SampleKey = tuple[int, int]  # (index into the dataset, seed of this sample's augmentation in this epoch)
_MASK63 = (1 << 63) - 1


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (SplitMix64 of the three numbers)."""
    x = (base_seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK63
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & _MASK63
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK63
    return x ^ (x >> 31)


def common_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every process. The ranks must shuffle with one permutation to take disjoint
    shards that together cover the epoch; processes seeded differently (``seed_everything`` without a
    fixed value seeds each rank at random) would otherwise read overlapping samples and miss others."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


class ResumableSampler(DistributedSampler):
    """This process's shard of a (shuffled) epoch as ``(index, seed)`` keys, from ``start`` on.

    ``seed`` fixes the order of every epoch (``seed + epoch``, as ``DistributedSampler``) and the
    per-sample augmentation seeds; ``start`` (set by ``ResumableDataLoader.load_state_dict``) skips the
    keys of this epoch that were already delivered, and is cleared when another epoch is set.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        super().__init__(
            dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        indices = list(super().__iter__())[self.start :]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a dataset that accepts ``(index, seed)`` keys, shuffled by a
    ``ResumableSampler``, whose position in the epoch checkpoints save and restore (see the module
    docstring). ``seed`` defaults to rank 0's ``torch.initial_seed()``, i.e. follows ``seed_everything``
    and is the same on every process (``common_seed``)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        seed = common_seed(torch.initial_seed() % 2**31) if seed is None else seed
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
        # its own generator: creating an iterator draws no number from the global RNG
        generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
        super().__init__(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, generator=generator, **kwargs
        )
        self._delivered = 0  # batches of the current epoch delivered so far

    def __iter__(self) -> Iterator:
        return self._batches()

    def _batches(self) -> Iterator:
        self._delivered = self.sampler.start // self.batch_size
        for batch in super().__iter__():  # created here, at the first batch (see the module docstring)
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.sampler.epoch,
            "batches": self._delivered,
            "length": len(self),
            "batch_size": self.batch_size,
            "world_size": self.sampler.num_replicas,
            "seed": self.sampler.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` stopped. Mid-epoch, the position only means the same samples with the
        same number of processes and batch size, so other numbers stop with an error; a checkpoint taken
        at the end of an epoch resumes with any (the next epoch is dealt out to the new processes)."""
        saved = (state.get("world_size"), state.get("batch_size"))
        finished = "length" in state and state["batches"] >= state["length"]
        if saved != (self.sampler.num_replicas, self.batch_size) and not finished:
            raise ValueError(
                f"the checkpoint was taken mid-epoch with {saved[0]} process(es) x batch {saved[1]}, this run "
                f"has {self.sampler.num_replicas} x {self.batch_size}: resume with the same numbers, or from a "
                "checkpoint taken at the end of an epoch"
            )
        self.sampler.seed = state.get("seed", self.sampler.seed)
        self.sampler.set_epoch(state["epoch"])
        batches = state["batches"] if state["batches"] < len(self) and not finished else 0
        self.sampler.start = batches * self.batch_size
