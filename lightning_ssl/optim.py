"""Optimizers and learning-rate schedules shared by every method.

- ``LARS`` (You et al. 2017), as used by SimCLR and BYOL: layer-wise trust ratio
  ``eta * ||w|| / ||g + wd * w||`` inside the momentum, eta = 0.001 (SimCLR's and BYOL's), optionally
  clipped so that no layer's step exceeds the global lr (solo-learn's ``clip_lr``). Parameter groups with
  ``lars_exclude=True`` (biases and normalization parameters) get neither weight decay nor adaptation.
- ``split_weight_decay``: biases and norm parameters (every parameter with ndim <= 1) in a group
  without weight decay, as in SimCLR/BYOL.
- ``lr_lambda``: linear warmup then cosine decay to 0 (SimCLR, BYOL, MoCo v2) or MoCo v1's step
  decay (x0.1 at 60% and 80% of training, i.e. epochs 120 and 160 of 200).
- ``scaled_lr``: the linear scaling rule lr = base_lr x global_batch / 256 (Goyal et al. 2017), or
  SimCLR's square-root rule lr = base_lr x sqrt(global_batch) (Chen et al. 2020, appendix B.1: 0.075).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "LARS",
    "split_weight_decay",
    "lr_lambda",
    "scaled_lr",
    "build_optimizer",
    "OPTIMIZERS",
    "SCHEDULES",
    "LR_SCALING",
]

OPTIMIZERS = ("lars", "sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
LR_SCALING = ("linear", "sqrt")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (SimCLR's TF implementation).

    ``eta`` is the trust coefficient (SimCLR and BYOL: 0.001; solo-learn's CIFAR BYOL: 0.02). With
    ``clip_lr=True`` (solo-learn's ``clip_lr``) the trust ratio becomes ``min(ratio / lr, 1)``, so a
    layer's effective lr is ``min(eta * ||w|| / ||g + wd * w||, lr)`` (``lr``: the group's current lr).

    Every step is multi-tensor (``torch._foreach_*``), with the trust ratios computed for all layers at
    once and no host synchronization. ``fused=True`` takes the momentum/update part as one fused SGD
    kernel (``torch._fused_sgd_``) after the trust-ratio scaling; the result is the same.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        clip_lr: bool = False,
        lars_exclude: bool = False,
        fused: bool = False,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if eta <= 0:
            raise ValueError(f"LARS eta must be positive, got {eta}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            clip_lr=clip_lr,
            lars_exclude=lars_exclude,
            fused=fused,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"] != 0:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                w_norms = torch.stack(torch._foreach_norm(params))
                g_norms = torch.stack(torch._foreach_norm(grads))
                ratios = torch.where(
                    (w_norms > 0) & (g_norms > 0), group["eta"] * w_norms / g_norms, torch.ones_like(w_norms)
                )
                if group.get("clip_lr", False) and group["lr"] > 0:
                    ratios = torch.clamp(ratios / group["lr"], max=1.0)
                grads = torch._foreach_mul(grads, list(ratios.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            if group.get("fused", False):
                torch._fused_sgd_(
                    params,
                    list(grads),
                    bufs,
                    weight_decay=0.0,
                    momentum=group["momentum"],
                    lr=group["lr"],
                    dampening=0.0,
                    nesterov=False,
                    maximize=False,
                    is_first_step=False,
                )
                continue
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


GROUP_KEYS = ("lars_exclude", "lr_scale", "fixed_lr")
"""Parameter-group keys of ours (see ``SSLMethod.parameter_groups``); the torch optimizers do not see them."""


def split_weight_decay(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two parameter groups: weights with decay; biases and norm parameters without decay or LARS."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def lr_lambda(
    step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine", final: float = 0.0
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based). The cosine goes from 1
    after the warmup to ``final`` (the final lr over the peak lr: SwAV's ``final_lr``, DINO's ``min_lr``)
    at step ``total_steps``, the end of the last optimizer step (the references' ``cosine_scheduler``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        progress = step / max(1, total_steps)
        return 0.1 ** sum(progress >= m for m in (0.6, 0.8))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; use 'cosine', 'step' or 'constant'")


def scaled_lr(base_lr: float, global_batch_size: int, rule: str = "linear") -> float:
    """The peak lr for a global batch: ``linear`` (Goyal et al. 2017), base_lr x global_batch / 256;
    ``sqrt`` (SimCLR, Chen et al. 2020, appendix B.1: 0.075 x sqrt(B)), base_lr x sqrt(global_batch)."""
    if rule == "linear":
        return base_lr * global_batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    raise ValueError(f"unknown lr scaling {rule!r}; use 'linear' or 'sqrt'")


def build_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    momentum: float,
    fused: bool = False,
    lars_eta: float = 0.001,
    lars_clip: bool = False,
) -> torch.optim.Optimizer:
    """``lars``, ``sgd`` or ``adamw`` over parameter groups from ``split_weight_decay``; ``lars_eta`` and
    ``lars_clip`` are LARS's ``eta`` and ``clip_lr``.

    Steps are multi-tensor (``foreach``) by default, on every device; ``fused=True`` uses fused kernels.
    """
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=lars_eta, clip_lr=lars_clip, fused=fused)
    plain = [{k: v for k, v in g.items() if k not in GROUP_KEYS} for g in groups]
    impl = {"fused": True} if fused else {"foreach": True}
    if name == "sgd":
        return torch.optim.SGD(plain, lr=lr, momentum=momentum, **impl)
    if name == "adamw":
        return torch.optim.AdamW(plain, lr=lr, **impl)
    raise ValueError(f"unknown optimizer {name!r}; use 'lars', 'sgd' or 'adamw'")
