"""Exponential-moving-average (EMA) copies of networks: MoCo's key encoder (He et al. 2020, eq. 2)
and BYOL's target network (Grill et al. 2020, sec. 3.1).

``target = tau * target + (1 - tau) * online`` for every parameter after each optimizer step. BYOL's
schedule is ``tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2`` over the K optimizer steps of
training; MoCo keeps tau constant (0.999).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["cosine_tau", "linear_ema_tau", "ema_update_", "ema_copy", "EMA_SCHEDULES"]

EMA_SCHEDULES = ("cosine", "linear")


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float = 1.0) -> float:
    """BYOL's cosine increase of tau from ``tau_base`` (step 0) to ``tau_final`` (step ``total_steps``)."""
    progress = min(max(step, 0), total_steps) / max(1, total_steps)
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * progress) + 1) / 2


def linear_ema_tau(step: int, total_steps: int, tau_base: float, tau_final: float = 1.0) -> float:
    """I-JEPA's momentum for the EMA update after optimizer step ``step`` (1-based: ``trainer.global_step``
    after the step) of ``total_steps``: linear from ``tau_base`` at the first update, ``tau_base + (k - 1) *
    (tau_final - tau_base) / total_steps`` at the k-th (the ``momentum_scheduler`` generator of I-JEPA's
    src/train.py, which yields ``ema[0] + i * (ema[1] - ema[0]) / (ipe * epochs)`` for update ``i = 0, 1, ...``)."""
    k = min(max(step - 1, 0), total_steps)
    return tau_base + (tau_final - tau_base) * k / max(1, total_steps)


@torch.no_grad()
def ema_update_(pairs: Iterable[tuple[nn.Module, nn.Module]], tau: float) -> None:
    """In place, for every ``(online, target)`` pair: ``target <- tau * target + (1 - tau) * online``.

    Parameters are averaged; buffers (BN running statistics) are left to the target's own forward.
    """
    targets, onlines = [], []
    for online, target in pairs:
        online_params = list(online.parameters())
        target_params = list(target.parameters())
        if len(online_params) != len(target_params):
            raise ValueError("EMA pair has different architectures: online and target parameter counts differ")
        onlines.extend(online_params)
        targets.extend(target_params)
    if targets:
        torch._foreach_lerp_(targets, [p.detach() for p in onlines], 1.0 - tau)


def ema_copy(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online`` (no gradients): the EMA target at step 0."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
