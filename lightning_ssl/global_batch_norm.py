"""Global batch norm on any backend: statistics of the whole batch across processes, CPU (gloo) included.

SimCLR (Chen et al. 2020, sec. 3, "global BN"), BYOL, SimSiam, Barlow Twins, VICReg, SwAV and DINO's
ResNets normalize with the mean and variance of the global batch. ``torch.nn.SyncBatchNorm`` does so
only on GPUs; ``GlobalBatchNorm`` does the same with two autograd-aware all-reduces (``all_reduce_with_grad``:
the sums of the features, then of their squared deviations), so a multi-process CPU run computes what
one process computes on the global batch, gradients included (``tests/test_global_batch_norm.py``).

``GlobalBatchNormSync`` is the Lightning ``LayerSync`` plugin that converts a model's ``BatchNorm1d/2d/3d``
(``Trainer(plugins=[GlobalBatchNormSync()])``); the ``lightning-ssl`` command uses it for
``--trainer.sync_batchnorm true`` when the run is not on GPUs (on GPUs, Lightning's ``SyncBatchNorm``).
State-dict keys do not change. In one process, and in evaluation mode, it is plain batch norm.
"""

from __future__ import annotations

import torch
from pytorch_lightning.plugins import LayerSync
from torch import nn

from lightning_ssl.distributed import all_reduce_with_grad, world_size

__all__ = ["GlobalBatchNorm", "convert_global_batch_norm", "revert_global_batch_norm", "GlobalBatchNormSync"]

_CONVERTED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training-mode statistics are those of the batch of every process together."""

    original_class: type[nn.Module] = nn.BatchNorm2d  # what ``revert_global_batch_norm`` rebuilds

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N x C x ...), got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        local = torch.cat([input.sum(dims), input.new_tensor([input.numel() // input.shape[1]])])
        total = all_reduce_with_grad(local)
        count = total[-1].detach()
        if count < 2:
            raise ValueError(f"batch norm needs more than one value per channel over all processes, got {int(count)}")
        mean = total[:-1] / count
        centered = input - mean.view(shape)
        var = all_reduce_with_grad((centered * centered).sum(dims)) / count
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1), factor)
        return out


def convert_global_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm1d/2d/3d`` replaced by a ``GlobalBatchNorm`` sharing its parameters
    and buffers (other norms, e.g. MoCo's ``SplitBatchNorm``, are left alone)."""
    if type(module) in _CONVERTED:
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.original_class = type(module)
        _move_state(module, converted)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_global_batch_norm(child))
    return module


def revert_global_batch_norm(module: nn.Module) -> nn.Module:
    """The inverse of ``convert_global_batch_norm``."""
    if isinstance(module, GlobalBatchNorm):
        original = module.original_class(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        _move_state(module, original)
        return original
    for name, child in module.named_children():
        module.add_module(name, revert_global_batch_norm(child))
    return module


def _move_state(source: nn.Module, target: nn.Module) -> None:
    if source.affine:
        target.weight, target.bias = source.weight, source.bias
    if source.track_running_stats:
        target.running_mean, target.running_var = source.running_mean, source.running_var
        target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)


class GlobalBatchNormSync(LayerSync):
    """Lightning plugin: global batch norm on every backend (``Trainer(plugins=[GlobalBatchNormSync()])``)."""

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_global_batch_norm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_global_batch_norm(model)
