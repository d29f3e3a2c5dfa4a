"""The contracts between methods, callbacks and datamodules, declared once.

A callback needs something of the module or the datamodule it works on; what it needs is a
``typing.Protocol`` here, checked with ``isinstance`` where the callback starts:

- ``HasEMATargets``: ``ema_pairs()`` returns the ``(online, target)`` module pairs that ``EMAUpdate``
  averages after every optimizer step (MoCo's key encoder, BYOL's target network).
- ``HasQueue``: ``enqueue(keys)`` writes the keys of a step into the module's queue (``QueueUpdate``).
- ``HasRepresentation``: ``representation(images, backbone=None)`` gives the features evaluation uses
  (``KNNMonitor``, ``OnlineLinearProbe``).
- ``HasRandomInit``: ``random_init_backbone()`` gives the baseline encoder of the final report.
- ``LabeledDataModule``: ``labeled_dataloader(split)`` yields un-augmented ``(images, labels)`` of
  ``"train"`` or ``"val"`` (kNN monitor, online probe, final report).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["HasEMATargets", "HasQueue", "HasRepresentation", "HasRandomInit", "LabeledDataModule", "require"]


@runtime_checkable
class HasEMATargets(Protocol):
    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, target)`` pairs; ``target <- tau * target + (1 - tau) * online`` after each step."""
        ...


@runtime_checkable
class HasQueue(Protocol):
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (``N x D``, gathered over processes) into the queue, oldest first out."""
        ...


@runtime_checkable
class HasRepresentation(Protocol):
    def representation(self, images: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """``B x D`` evaluation features of ``images`` (from ``backbone`` when given)."""
        ...


@runtime_checkable
class HasRandomInit(Protocol):
    def random_init_backbone(self, seed: int = 0) -> nn.Module:
        """A freshly initialized backbone of the same architecture."""
        ...


@runtime_checkable
class LabeledDataModule(Protocol):
    def labeled_dataloader(self, split: str) -> DataLoader:
        """Un-augmented ``(images, labels)`` batches of ``split`` (``"train"`` or ``"val"``)."""
        ...


def require(obj: object, contract: type, user: str, what: str) -> None:
    """Raise ``TypeError`` naming ``user``, the missing ``what`` and the object's type unless ``obj`` fulfils
    ``contract``."""
    if not isinstance(obj, contract):
        name = "None" if obj is None else type(obj).__name__
        raise TypeError(f"{user} needs {what}; got {name}")
