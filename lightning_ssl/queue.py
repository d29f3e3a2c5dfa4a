"""MoCo's dictionary as a queue (He et al. 2020, sec. 3.2): FIFO of the K most recent keys; NNCLR's
support set is such a queue, read by nearest-neighbour lookup (Dwibedi et al. 2021, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["enqueue_", "nearest_neighbours", "check_queue_size"]


@torch.no_grad()
def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (``N x D``) into ``queue`` (``K x D``) at ``ptr``, wrapping around; advance ``ptr``.

    The oldest entries are overwritten first. ``ptr`` is a 1-element long tensor (a buffer).
    """
    size = queue.shape[0]
    keys = keys.detach().to(queue.dtype)
    if keys.shape[0] > size:  # only the newest K keys can stay
        keys = keys[-size:]
    n = keys.shape[0]
    idx = (torch.arange(n, device=queue.device) + ptr) % size  # stays on the device: no host sync
    queue.index_copy_(0, idx, keys)
    ptr.copy_((ptr + n) % size)


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """For each row of ``queries`` (``N x D``), the row of ``queue`` (``K x D``) with the largest cosine
    similarity (NNCLR's ``NN(z, Q)``, eq. 1), as an ``N x D`` tensor without gradient. Ties go to the
    lowest index. Computed in the queue's precision with autocast off (under mixed precision a
    16-bit similarity could pick another neighbour). The queue's rows are returned as stored (NNCLR
    stores normalized embeddings)."""
    if queries.ndim != 2 or queue.ndim != 2 or queries.shape[1] != queue.shape[1]:
        raise ValueError(f"queries N x D and queue K x D needed, got {tuple(queries.shape)} and {tuple(queue.shape)}")
    with torch.autocast(device_type=queue.device.type, enabled=False):  # similarities in the queue's precision
        similarity = F.normalize(queries.to(queue.dtype), dim=1) @ F.normalize(queue, dim=1).T  # N x K
    return queue[similarity.argmax(dim=1)]


def check_queue_size(method: str, queue_size: int, global_batch: int) -> None:
    """Fail with what to do when the global batch does not divide the queue (each step's keys must fill
    whole slots, so the queue's contents match those of one process with the global batch)."""
    if queue_size % global_batch != 0:
        raise ValueError(
            f"{method} queue_size={queue_size} is not a multiple of the global batch size {global_batch} "
            "(batch x processes x accumulation). Choose a queue_size that the global batch divides, "
            f"e.g. {max(global_batch, queue_size // global_batch * global_batch)}."
        )
