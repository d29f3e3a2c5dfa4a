"""Collective helpers that are no-ops in a single process.

``gather_with_grad`` is an autograd-aware all-gather (as Bolts' ``SyncFunction``): the backward pass
sums the incoming gradients over processes and returns this process's slice, so that with DDP's
gradient averaging the result equals one process holding the whole batch. ``all_reduce_with_grad``
is the same for a sum over processes (Barlow Twins' cross-correlation): its backward pass sums the
incoming gradients over processes too.

``batch_shuffle`` / ``batch_unshuffle`` implement MoCo's shuffling BN (He et al. 2020, sec. 3.3):
the key batch is shuffled across processes before the key encoder and restored after, so batch
statistics never mix a query with its own key. ``split_shuffle`` is its one-process form, for a
key encoder with ``SplitBatchNorm`` simulating several devices (MoCo's CIFAR-10 demo).

``launcher_trainer_flags`` reads the ``Trainer`` flags (devices, nodes) implied by the launcher
(``torchrun``, ``fabric run``, SLURM ``srun``) from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "gather_with_grad",
    "gather_no_grad",
    "all_reduce_sum",
    "all_reduce_with_grad",
    "batch_shuffle",
    "batch_unshuffle",
    "split_shuffle",
    "launcher_trainer_flags",
]


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


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every process's loss depends on the sum, so the gradient of the sum of the losses with
        # respect to this process's term is the sum of the incoming gradients of all processes.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` (same shape on every process) over processes, with gradients.

    Each process computes the same loss from the sum; with DDP's gradient averaging, the gradients
    equal those of one process computing the loss on the global batch. The identity in one process.
    """
    if not is_distributed() or world_size() == 1:
        return tensor
    return _AllReduceWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` over processes along dim 0, in rank order, without gradients."""
    if not is_distributed() or world_size() == 1:
        return tensor
    chunks = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(chunks, tensor.contiguous())
    return torch.cat(chunks, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the batch across processes (MoCo's shuffling BN); returns ``(x_shuffled_local, unshuffle_idx)``.

    Every process must hold the same batch size. The batches of all processes are gathered in rank
    order, permuted by one permutation drawn on rank 0 (and broadcast), and this process keeps its
    slice. ``unshuffle_idx`` (the inverse permutation of the global batch) lets ``batch_unshuffle``
    put the encoder's outputs back in the original order. In one process this is the identity.
    """
    n = x.shape[0]
    if not is_distributed() or world_size() == 1:
        return x, torch.arange(n, device=x.device)
    x_all = gather_no_grad(x)
    total = x_all.shape[0]
    if rank() == 0:
        perm = torch.randperm(total, device=x.device)
    else:
        perm = torch.empty(total, dtype=torch.long, device=x.device)
    dist.broadcast(perm, src=0)
    start = rank() * n
    return x_all[perm[start : start + n]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle_idx: torch.Tensor) -> torch.Tensor:
    """Undo ``batch_shuffle`` on the encoder outputs ``x`` of this process's shuffled slice.

    Gathers the outputs of all processes and returns the rows of this process's original samples,
    in their original order.
    """
    if not is_distributed() or world_size() == 1:
        return x[unshuffle_idx]
    n = x.shape[0]
    x_all = gather_no_grad(x)
    if unshuffle_idx.shape[0] != x_all.shape[0]:
        raise ValueError(
            f"unshuffle_idx has {unshuffle_idx.shape[0]} entries but the gathered batch has {x_all.shape[0]} rows; "
            "pass the index returned by batch_shuffle for this same batch"
        )
    start = rank() * n
    return x_all[unshuffle_idx[start : start + n]]


@torch.no_grad()
def split_shuffle(n: int, groups: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation ``perm`` of ``n`` samples in ``groups`` interleaved sub-batches (sample ``i`` is
    in sub-batch ``i % groups``, as ``SplitBatchNorm`` cuts it) such that the sample put at position ``p``,
    ``perm[p]``, comes from another sub-batch than ``p``'s: ``x[perm]`` through a ``SplitBatchNorm``
    normalizes every key with statistics of a sub-batch that does not hold its query's image.

    Each sub-batch of the shuffled batch draws one sample from each row of ``groups`` consecutive
    samples, from a sub-batch chosen by a random non-zero cyclic offset per row, and the members of each
    sub-batch are visited in random order: a mix of every other sub-batch, never its own. Drawn on
    ``device`` from the global generator (no host synchronization); ``argsort(perm)`` undoes it.
    """
    if groups < 2:
        raise ValueError(f"split_shuffle needs at least 2 sub-batches, got {groups}")
    if n % groups != 0:
        raise ValueError(f"a batch of {n} cannot be cut into {groups} equal sub-batches; use a multiple of {groups}")
    rows = n // groups
    offsets = torch.randint(1, groups, (rows, 1), device=device)  # never 0: never the slot's own sub-batch
    source = (torch.arange(groups, device=device) + offsets) % groups  # rows x groups: sub-batch of the sample
    members = torch.argsort(torch.rand(groups, rows, device=device), dim=1)  # random order inside each sub-batch
    row_of = members[source, torch.arange(rows, device=device)[:, None]]  # rows x groups
    return (row_of * groups + source).flatten()


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def launcher_trainer_flags(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``Trainer`` flags implied by the launcher that started this process, read from ``env``.

    - ``torchrun`` and ``fabric run`` (which calls torchrun): ``devices = LOCAL_WORLD_SIZE`` and
      ``num_nodes = WORLD_SIZE / LOCAL_WORLD_SIZE``; ``fabric run`` also passes ``--accelerator``,
      ``--strategy`` and ``--precision`` as ``LT_ACCELERATOR``, ``LT_STRATEGY``, ``LT_PRECISION``.
    - SLURM ``srun`` (one task per device, ``SLURM_NTASKS`` set, job name not ``bash``/``interactive``,
      as Lightning's ``SLURMEnvironment`` detects it): ``devices = SLURM_NTASKS / SLURM_NNODES``,
      ``num_nodes = SLURM_NNODES``.

    Returns ``{}`` for a process that no launcher started (Lightning then launches the processes itself).
    """
    env = os.environ if env is None else env
    flags: dict[str, Any] = {}
    local, world = _int(env, "LOCAL_WORLD_SIZE"), _int(env, "WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" in env and local and world:
        if world % local != 0:
            raise ValueError(
                f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}: "
                "launch the same number of processes on every node"
            )
        flags = {"devices": local, "num_nodes": world // local}
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        ntasks = _int(env, "SLURM_NTASKS")
        nnodes = _int(env, "SLURM_NNODES") or _int(env, "SLURM_JOB_NUM_NODES") or 1
        if ntasks:
            if ntasks % nnodes != 0:
                raise ValueError(
                    f"SLURM_NTASKS={ntasks} is not a multiple of SLURM_NNODES={nnodes}: use --ntasks-per-node"
                )
            flags = {"devices": ntasks // nnodes, "num_nodes": nnodes}
    for key, flag in (("LT_ACCELERATOR", "accelerator"), ("LT_STRATEGY", "strategy"), ("LT_PRECISION", "precision")):
        if env.get(key):
            flags[flag] = env[key]
    return flags


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over processes (a new tensor; no gradient); ``tensor`` itself in one process."""
    if not is_distributed() or world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
