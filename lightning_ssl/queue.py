"""MoCo's dictionary as a queue (He et al. 2020, sec. 3.2): FIFO of the K most recent keys."""

from __future__ import annotations

import torch

__all__ = ["enqueue_"]


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
