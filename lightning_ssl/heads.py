"""Projection and prediction heads, declared as a list of layer widths.

``mlp([in, hidden, out])`` builds ``Linear -> BN -> ReLU -> Linear``; each method's docstring says
which widths its paper uses:

- SimCLR (Chen et al. 2020): ``[D, D, 128]`` with BN.
- MoCo v1 (He et al. 2020): ``[D, 128]`` (linear); MoCo v2 (Chen et al. 2020): ``[D, 2048, 128]`` without BN.
- BYOL (Grill et al. 2020): projector ``[D, 4096, 256]``, predictor ``[256, 4096, 256]``, with BN.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mlp"]


def mlp(
    dims: Sequence[int], batch_norm: bool = True, last_batch_norm: bool = False, last_scale: bool = False
) -> nn.Sequential:
    """A multi-layer perceptron with widths ``dims``; hidden layers get (BN and) ReLU.

    Hidden linear layers have no bias when followed by BN (the BN shift replaces it). With
    ``last_batch_norm`` the output layer has no bias and is followed by a BN without shift, learning a
    scale when ``last_scale`` (SimCLR's reference head: ``center=False``) and nothing otherwise.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        use_bn = batch_norm and (not last or last_batch_norm)
        layers.append(nn.Linear(d_in, d_out, bias=not use_bn))
        if use_bn:
            bn = nn.BatchNorm1d(d_out, affine=not last or last_scale)
            if last and last_scale:
                bn.register_parameter("bias", None)  # scale, no centering
            layers.append(bn)
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
