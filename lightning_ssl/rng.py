"""Random-number-generator states saved in checkpoints, so a resumed run draws what the
uninterrupted run would have drawn (augmentations on the device, CPC's per-patch crops, MoCo's
shuffle): the global torch CPU and CUDA generators, Python's ``random`` and NumPy's legacy global
generator. In a distributed run every process has its own states; ``capture_rng_states`` gathers
them all (a collective: every process must call it) and ``restore_rng_states`` sets this process's.
Everything is stored as tensors and builtin types, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lightning_ssl.distributed import is_distributed, rank, world_size

__all__ = ["capture_rng_states", "restore_rng_states"]


def _local_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def capture_rng_states() -> list[dict[str, Any]]:
    """The states of every process, by rank (one entry outside a distributed run)."""
    local = _local_states()
    if not is_distributed() or world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def restore_rng_states(states: list[dict[str, Any]]) -> None:
    """Set this process's generators from ``capture_rng_states``'s output (the entry of this rank; a
    run resumed on a different number of processes uses rank 0's entry for the extra ranks)."""
    if not states:
        return
    own = states[rank()] if rank() < len(states) else states[0]
    torch.set_rng_state(own["torch"])
    random.setstate(own["python"])
    kind, keys, pos, has_gauss, cached = own["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in own and torch.cuda.is_available():
        cuda = own["cuda"]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
