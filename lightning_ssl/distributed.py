"""Collective helpers that are no-ops in a single process.

``gather_with_grad`` is an autograd-aware all-gather (as Bolts' ``SyncFunction``): the backward pass
sums the incoming gradients over processes and returns this process's slice, so that with DDP's
gradient averaging the result equals one process holding the whole batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "gather_with_grad", "gather_no_grad"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch = tensor.shape[0]
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every process) over processes along dim 0, with gradients."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` over processes along dim 0, in rank order, without gradients."""
    if not is_distributed() or world_size() == 1:
        return tensor
    chunks = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(chunks, tensor.contiguous())
    return torch.cat(chunks, dim=0)
