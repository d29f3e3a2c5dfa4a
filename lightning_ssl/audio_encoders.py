"""CPC's audio encoder (Oord et al. 2018, sec. 3.1): a strided 1-D convolutional network on the raw
16 kHz waveform and a GRU context network over its outputs.

Paper: five convolutions with strides 5, 4, 2, 2, 2, kernel sizes 10, 8, 4, 4, 4, 512 channels and
ReLU give one 512-d vector z_t every 160 samples (10 ms at 16 kHz); a GRU with a 256-d state gives the
contexts c_t. Padding ``ceil((k - s) / 2)`` on both sides of each convolution makes a waveform of
``160 n`` samples give exactly ``n`` vectors. The paper names no normalization; ``norm="batch"``
(the default here) puts a ``BatchNorm1d`` after each convolution, as common re-implementations do,
and ``norm="none"`` is the paper's text (convolutions with biases, ReLU).

``CPCAudioEncoder`` is what a ``CPCAudio`` model calls its ``backbone``: ``frames(waveforms)`` gives
z (``B x T x C``), ``contexts(z)`` gives c (``B x T x H``), and ``forward(waveforms)`` the utterance
embedding: c (``embedding="context"``, the paper's speaker-classification features) or z
(``embedding="frames"``) averaged over time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConvWaveformEncoder", "CPCAudioEncoder", "build_audio_encoder", "AUDIO_ENCODERS", "as_waveform_batch"]

PAPER_STRIDES = (5, 4, 2, 2, 2)
PAPER_KERNELS = (10, 8, 4, 4, 4)
AUDIO_ENCODERS = {"cpc": {"strides": PAPER_STRIDES, "kernel_sizes": PAPER_KERNELS}}
EMBEDDINGS = ("context", "frames")
NORMS = ("batch", "none")


def as_waveform_batch(waveforms: torch.Tensor) -> torch.Tensor:
    """``B x L`` or ``B x 1 x L`` mono waveforms as ``B x 1 x L``; anything else raises."""
    if waveforms.ndim == 2:
        return waveforms.unsqueeze(1)
    if waveforms.ndim == 3 and waveforms.shape[1] == 1:
        return waveforms
    raise ValueError(
        f"expected mono waveforms of shape B x L or B x 1 x L, got {tuple(waveforms.shape)}; "
        "mix multi-channel audio down to one channel first"
    )


class ConvWaveformEncoder(nn.Sequential):
    """Strided 1-D convolutions with ReLU: ``B x 1 x L`` waveforms to ``B x channels x L / hop``."""

    def __init__(
        self,
        channels: int = 512,
        strides: Sequence[int] = PAPER_STRIDES,
        kernel_sizes: Sequence[int] = PAPER_KERNELS,
        norm: str = "batch",
    ):
        if len(strides) != len(kernel_sizes) or not strides:
            raise ValueError(f"need one kernel size per stride, got strides {strides} and kernels {kernel_sizes}")
        if any(k < s or s < 1 for k, s in zip(kernel_sizes, strides)):
            raise ValueError(f"every kernel must be at least its stride, got kernels {kernel_sizes}, strides {strides}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        layers: list[nn.Module] = []
        in_channels = 1
        for k, s in zip(kernel_sizes, strides):
            padding = math.ceil((k - s) / 2)
            layers.append(nn.Conv1d(in_channels, channels, k, stride=s, padding=padding, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = channels
        super().__init__(*layers)
        self.channels = channels
        self.hop = math.prod(strides)


class CPCAudioEncoder(nn.Module):
    """The encoder g_enc (``ConvWaveformEncoder``) and the context network g_ar (a one-layer GRU).

    Args:
        channels: width of z (paper: 512).
        context_dim: GRU state, the width of c (paper: 256).
        strides, kernel_sizes: the convolutions (paper: 5, 4, 2, 2, 2 and 10, 8, 4, 4, 4).
        norm: ``"batch"`` (BatchNorm1d after each convolution) or ``"none"`` (the paper's text).
        embedding: what ``forward`` averages over time: ``"context"`` (c) or ``"frames"`` (z).
    """

    def __init__(
        self,
        channels: int = 512,
        context_dim: int = 256,
        strides: Sequence[int] = PAPER_STRIDES,
        kernel_sizes: Sequence[int] = PAPER_KERNELS,
        norm: str = "batch",
        embedding: str = "context",
    ):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}; got {embedding!r}")
        self.encoder = ConvWaveformEncoder(channels, strides, kernel_sizes, norm)
        self.context = nn.GRU(channels, context_dim, batch_first=True)
        self.embedding = embedding
        self.config = {
            "channels": channels,
            "context_dim": context_dim,
            "strides": list(strides),
            "kernel_sizes": list(kernel_sizes),
            "norm": norm,
            "embedding": embedding,
        }

    @property
    def hop(self) -> int:
        """Waveform samples per vector (160 for the paper's strides)."""
        return self.encoder.hop

    @property
    def frame_dim(self) -> int:
        return self.encoder.channels

    @property
    def context_dim(self) -> int:
        return self.context.hidden_size

    @property
    def feature_dim(self) -> int:
        """Width of the utterance embedding of ``forward``."""
        return self.context_dim if self.embedding == "context" else self.frame_dim

    def frames(self, waveforms: torch.Tensor) -> torch.Tensor:
        """z: ``B x T x channels`` for ``B x L`` or ``B x 1 x L`` waveforms."""
        return self.encoder(as_waveform_batch(waveforms)).transpose(1, 2)

    def contexts(self, z: torch.Tensor) -> torch.Tensor:
        """c: ``B x T x context_dim``; c_t depends on ``z_1 .. z_t`` only (a unidirectional GRU)."""
        return self.context(z)[0]

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Utterance embeddings ``B x feature_dim``: c or z averaged over time."""
        z = self.frames(waveforms)
        return (self.contexts(z) if self.embedding == "context" else z).mean(dim=1)


def build_audio_encoder(
    backbone: str | nn.Module = "cpc",
    channels: int = 512,
    context_dim: int = 256,
    norm: str = "batch",
    embedding: str = "context",
) -> CPCAudioEncoder:
    """The audio encoder named ``backbone`` (``"cpc"``: the paper's strides and kernels) with the given
    widths, or ``backbone`` itself when it is a ``CPCAudioEncoder`` (its own widths then apply)."""
    if isinstance(backbone, CPCAudioEncoder):
        return backbone
    if isinstance(backbone, nn.Module):
        raise TypeError(
            f"an audio backbone module must be a CPCAudioEncoder (frames(), contexts(), hop), got "
            f"{type(backbone).__name__}; build one with lightning_ssl.audio_encoders.CPCAudioEncoder(...)"
        )
    if backbone not in AUDIO_ENCODERS:
        raise ValueError(
            f"unknown audio backbone {backbone!r}; use one of {', '.join(AUDIO_ENCODERS)} or pass a CPCAudioEncoder"
        )
    return CPCAudioEncoder(channels, context_dim, norm=norm, embedding=embedding, **AUDIO_ENCODERS[backbone])
