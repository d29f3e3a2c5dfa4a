"""The autoregressive context network g_ar of image CPC (Oord et al. 2018, sec. 3.3).

A PixelCNN-style stack over the patch grid, causal over rows: the context at row ``i`` depends on
the patch vectors of rows ``<= i`` only (every column of those rows may be seen). Each block is a
residual bottleneck ``x + conv1x1(relu(causal_conv(relu(conv1x1(relu(x))))))`` whose middle
convolution covers the current row and the ``kernel_size - 1`` rows above it (zero padding on top,
none below). There is deliberately no normalization layer: batch or layer norm over the grid would
mix statistics of lower rows into upper ones and break causality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RowCausalConv2d", "ContextNetwork"]


class RowCausalConv2d(nn.Conv2d):
    """A ``kernel_size x kernel_size`` convolution whose output at row ``i`` sees input rows
    ``i - kernel_size + 1 .. i`` (and columns ``j - kernel_size//2 .. j + kernel_size//2``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        # (left, right, top, bottom): rows above are padded, nothing below is ever read.
        return super().forward(F.pad(x, (k // 2, k // 2, k - 1, 0)))


class _CausalBlock(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, kernel_size: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden_dim, 1)
        self.causal = RowCausalConv2d(hidden_dim, hidden_dim, kernel_size)
        self.expand = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.reduce(F.relu(x))
        h = self.causal(F.relu(h))
        return x + self.expand(F.relu(h))


class ContextNetwork(nn.Module):
    """g_ar: ``B x dim x rows x cols`` patch vectors to contexts of the same shape, causal over rows.

    Args:
        dim: width of the patch vectors (and of the contexts).
        hidden_dim: width inside each residual block.
        num_blocks: residual blocks; with ``kernel_size = 3`` each adds two rows of receptive field.
        kernel_size: height and width of the causal convolutions (odd).
    """

    def __init__(self, dim: int, hidden_dim: int = 256, num_blocks: int = 5, kernel_size: int = 3):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"the context network needs at least one block, got num_blocks={num_blocks}")
        self.blocks = nn.Sequential(*[_CausalBlock(dim, hidden_dim, kernel_size) for _ in range(num_blocks)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4:
            raise ValueError(f"expected B x D x rows x cols patch vectors, got shape {tuple(z.shape)}")
        return self.blocks(z)
