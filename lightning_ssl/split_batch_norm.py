"""Split batch norm: one process simulating the per-device batch norm of several devices.

MoCo's CIFAR-10 demo (facebookresearch/moco, ``colab/moco_cifar10_demo.ipynb``) trains on one GPU
and simulates 8 with ``SplitBatchNorm``: in training mode the batch is cut into ``num_splits``
sub-batches, each normalized with its own statistics, and the running statistics are the mean of the
sub-batches' updates. With ``distributed.split_shuffle`` on the keys this is MoCo's shuffling BN
(He et al. 2020, sec. 3.3) in one process; without it, MoCo loses about 4 points of kNN accuracy
at 800 epochs (the demo's note).

Sub-batch ``s`` holds the samples ``i`` with ``i % num_splits == s`` (the demo's reshape of
``N x C`` into ``N / S x S*C``). ``num_splits = 1`` is plain batch norm, as is evaluation mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitBatchNorm", "convert_split_batch_norm", "split_batch_norms"]


class SplitBatchNorm(nn.BatchNorm2d):
    """``BatchNorm1d``/``2d`` whose training-mode statistics are those of ``num_splits`` interleaved
    sub-batches (the demo's ``SplitBatchNorm``); the parameters and buffers are batch norm's, so
    state_dict keys do not change."""

    num_splits: int = 1

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2-d, 3-d or 4-d input, got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        splits = self.num_splits
        if splits == 1 or not self.training or not self.track_running_stats:
            return super().forward(input)
        self._check_input_dim(input)
        n, c = input.shape[:2]
        if n % splits != 0:
            raise ValueError(f"split batch norm: a batch of {n} cannot be cut into {splits} equal sub-batches")
        if self.momentum is None:
            raise ValueError("split batch norm needs a momentum (cumulative averaging is not supported)")
        self.num_batches_tracked.add_(1)
        mean = self.running_mean.repeat(splits)
        var = self.running_var.repeat(splits)
        weight = None if self.weight is None else self.weight.repeat(splits)
        bias = None if self.bias is None else self.bias.repeat(splits)
        # sample i = m * splits + s becomes row m, channels s*C..(s+1)*C-1: sub-batch s is i % splits == s
        out = F.batch_norm(
            input.reshape(n // splits, splits * c, *input.shape[2:]),
            mean,
            var,
            weight,
            bias,
            True,
            self.momentum,
            self.eps,
        )
        self.running_mean.copy_(mean.view(splits, c).mean(0))
        self.running_var.copy_(var.view(splits, c).mean(0))
        return out.view_as(input)


def convert_split_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d``/``2d`` of ``module`` (in place, and ``module`` itself if it is one) by a
    ``SplitBatchNorm`` holding the same parameters and buffers; returns the module."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, SplitBatchNorm):
        split = SplitBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        split.weight, split.bias = module.weight, module.bias
        split.running_mean, split.running_var = module.running_mean, module.running_var
        split.num_batches_tracked = module.num_batches_tracked
        split.train(module.training)
        return split
    for name, child in module.named_children():
        setattr(module, name, convert_split_batch_norm(child))
    return module


def split_batch_norms(module: nn.Module) -> list[SplitBatchNorm]:
    """The ``SplitBatchNorm`` layers of ``module``."""
    return [m for m in module.modules() if isinstance(m, SplitBatchNorm)]
