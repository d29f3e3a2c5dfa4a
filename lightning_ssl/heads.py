"""Projection and prediction heads, declared as a list of layer widths.

``mlp([in, hidden, out])`` builds ``Linear -> BN -> ReLU -> Linear``; each method's docstring says
which widths its paper uses:

- SimCLR (Chen et al. 2020): ``[D, D, 128]`` with BN.
- MoCo v1 (He et al. 2020): ``[D, 128]`` (linear); MoCo v2 (Chen et al. 2020): ``[D, 2048, 128]`` without BN.
- BYOL (Grill et al. 2020): projector ``[D, 4096, 256]``, predictor ``[256, 4096, 256]``, with BN.
- SwAV (Caron et al. 2020): ``[D, 2048, 128]`` with BN.

``DINOHead`` is DINO's head (Caron et al. 2021, sec. 3.1 and appendix): an MLP with GELU to a
bottleneck, L2 normalization and a weight-normalized linear layer to K outputs.
- SimSiam (Chen & He 2021): projector ``[D, 2048, 2048, 2048]`` with BN on every layer, predictor ``[2048, 512, 2048]``.
- Barlow Twins (Zbontar et al. 2021), VICReg (Bardes et al. 2022): ``[D, 8192, 8192, 8192]``, last layer without bias.
- NNCLR (Dwibedi et al. 2021): projector ``[D, 2048, 2048, 256]`` with BN on every layer, predictor
  ``[256, 4096, 256]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["mlp", "DINOHead"]


def mlp(
    dims: Sequence[int],
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    last_bias: bool = True,
    last_scale: bool = False,
) -> nn.Sequential:
    """A multi-layer perceptron with widths ``dims``; hidden layers get (BN and) ReLU.

    Hidden linear layers have no bias when followed by BN (the BN shift replaces it); ``last_bias=False``
    drops the last layer's bias too (Barlow Twins, VICReg: the loss standardizes or centers it away).
    With ``last_batch_norm`` the output layer has no bias and is followed by a BN without shift, learning
    a scale when ``last_scale`` (SimCLR's reference head: ``center=False``) and nothing otherwise.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        use_bn = batch_norm and (not last or last_batch_norm)
        layers.append(nn.Linear(d_in, d_out, bias=not use_bn and (last_bias or not last)))
        if use_bn:
            bn = nn.BatchNorm1d(d_out, affine=not last or last_scale)
            if last and last_scale:
                bn.register_parameter("bias", None)  # scale, no centering
            layers.append(bn)
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, sec. 3.1, "Architecture"; ``DINOHead`` of the paper's
    code): ``layers`` linear layers ``[D, hidden, ..., bottleneck]`` with GELU (and BN when
    ``batch_norm``), L2 normalization, then a weight-normalized bias-free linear layer to ``out_dim``
    outputs whose norm ``g`` is fixed to 1 when ``norm_last_layer``. Defaults: 3 layers, hidden 2048,
    bottleneck 256, 65,536 outputs, no BN; linear weights truncated-normal (std 0.02), biases 0.

    ``last_layer`` is the layer DINO freezes during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"the DINO head needs at least one layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            blocks.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                if batch_norm:
                    blocks.append(nn.BatchNorm1d(d_out))
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
