"""Helpers for multi-process tests on CPU: gloo process groups over 127.0.0.1, tiny random data.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes (``torch.multiprocessing``,
spawn), each with the environment a launcher would give it (``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), optionally initializes a gloo process
group, calls ``fn(rank, world_size, *args)`` and returns the list of the values the ranks returned
(saved with ``torch.save``, so tensors come back exactly). ``fn`` must be a module-level function of
an importable module (the test module itself is fine). A ``Trainer(strategy="ddp", devices=N)``
built inside ``fn`` sees ``LOCAL_RANK`` and joins these processes instead of launching its own.

A distributed test of another method (e.g. CPC) needs only a worker and one call, e.g.::

    def _cpc_worker(rank, world):
        torch.manual_seed(0)
        x = torch.randn(2 * 4, 3, 8, 8)[rank * 4:(rank + 1) * 4]
        return my_loss(x, gather=True).detach()

    def test_cpc_loss_gathers():
        losses = run_distributed(_cpc_worker, 2)
        ...compare with the one-process loss on the whole batch...

and the full DDP ``Trainer`` fit, checkpoint and resume of ``tests/test_distributed.py`` covers a
new method once its factory is added to ``FACTORIES`` there (a tiny model taking 8x8 images).
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from lightning_ssl.datamodules import MultiViewDataset, TensorImageDataset

__all__ = ["free_port", "run_distributed", "RandomTwoViewDataModule", "LOOPBACK"]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, init_group: bool, fn: Callable, args: tuple) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": LOOPBACK,
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "NODE_RANK": "0",
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    if init_group:
        dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        # The parent re-raises with this traceback (mp.spawn's own message is truncated).
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, *args, init_group: bool = True, timeout: float = 240.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return their results by rank.

    ``init_group=False`` leaves the process group to the code under test (e.g. a Lightning
    ``Trainer``, which reads the same environment). Fails with the worker's traceback if a rank
    raises, and kills the ranks if they run longer than ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="lssl-dist-") as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(world_size, free_port(), out_dir, init_group, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            import time

            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"distributed test did not finish within {timeout} s")
        except Exception as exc:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            errors = sorted(Path(out_dir).glob("rank*.err"))
            if errors:
                details = "\n".join(f"--- {e.name} ---\n{e.read_text()}" for e in errors)
                raise AssertionError(f"a worker failed:\n{details}") from exc
            raise
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


class RandomTwoViewDataModule(pl.LightningDataModule):
    """``size`` random ``3 x image_size x image_size`` images (fixed seed) as two-view batches.

    Views are the image and a random horizontal flip of it; ``labeled_dataloader`` gives the
    un-augmented images with random labels, so kNN callbacks can run on it too.
    """

    def __init__(self, size: int = 64, image_size: int = 8, batch_size: int = 4, num_classes: int = 4, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        to_float = v2.ToDtype(torch.float32, scale=True)
        flip = v2.Compose([v2.RandomHorizontalFlip(), to_float])
        dataset = MultiViewDataset(TensorImageDataset(self.images, self.labels), [to_float, flip])
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def labeled_dataloader(self, split: str) -> DataLoader:
        dataset = TensorImageDataset(self.images, self.labels, transform=v2.ToDtype(torch.float32, scale=True))
        return DataLoader(dataset, batch_size=64, shuffle=False)
