"""Contrastive Predictive Coding on raw audio (Oord et al. 2018, "Representation Learning with
Contrastive Predictive Coding", sec. 3.1)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lightning_ssl.audio_encoders import CPCAudioEncoder, build_audio_encoder
from lightning_ssl.backbones import reset_parameters
from lightning_ssl.evaluation.baselines import calibrate_norm_statistics
from lightning_ssl.losses import NEGATIVES, cpc_sequence_info_nce
from lightning_ssl.methods.base import SSLMethod

__all__ = ["CPCAudio"]


class CPCAudio(SSLMethod):
    """CPC on 16 kHz waveforms: a strided 1-D convolutional encoder gives z_t every 10 ms, a GRU gives
    contexts c_t, and ``W_k c_t`` predicts ``z_{t+k}`` for k = 1..12 with InfoNCE (eq. 4).

    Paper defaults (sec. 3.1): encoder strides 5, 4, 2, 2, 2, kernels 10, 8, 4, 4, 4, 512 channels,
    ReLU; a 256-d GRU; 12 prediction steps; negatives from the minibatch (its Table 2 compares
    negatives from the same or mixed speakers; here ``negatives="batch"`` takes every z of the batch,
    the same sequence's other positions and the other sequences', gathered across processes);
    windows of 20,480 samples (128 vectors; the datamodule's ``crop_samples``); Adam, lr 2e-4 with 8
    GPUs x 8 windows. Defaults here: AdamW without weight decay (= Adam) and ``base_lr`` 8e-4 for a
    global batch of 256, i.e. the paper's 2e-4 at its global batch of 64 (``lr=`` fixes the rate),
    constant schedule. Not from the paper: ``BatchNorm1d`` after each convolution (``encoder_norm``;
    ``"none"`` is the paper's text).

    ``backbone`` is the audio encoder: ``"cpc"`` (the paper's convolutions, widths from
    ``encoder_dim`` and ``context_dim``) or a ``lightning_ssl.audio_encoders.CPCAudioEncoder`` (a
    module is not a hyperparameter: pass it again to ``load_from_checkpoint``). It holds the
    convolutions and the GRU, so ``representation`` (the utterance embedding: ``embedding="context"``
    averages c over time, the paper's speaker-classification features; ``"frames"`` averages z),
    ``random_init_backbone`` and export cover both. Batches are ``([waveforms, ...], speaker)``
    with ``B x 1 x L`` (or ``B x L``) waveforms; the first view is used.

    Args beyond ``SSLMethod``'s (``small_image`` and ``channels_last`` do not apply to audio):
        encoder_dim: width of z (paper: 512). context_dim: width of c (paper: 256).
        prediction_steps: the largest k (paper: 12). negatives: ``"batch"`` or ``"same_sequence"``.
        embedding: ``"context"`` or ``"frames"``. encoder_norm: ``"batch"`` or ``"none"``.
        gather_distributed: negatives from every process in a distributed run.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "cpc",
        encoder_dim: int = 512,
        context_dim: int = 256,
        prediction_steps: int = 12,
        negatives: str = "batch",
        embedding: str = "context",
        encoder_norm: str = "batch",
        gather_distributed: bool = True,
        optimizer: str = "adamw",
        base_lr: float = 8e-4,
        schedule: str = "constant",
        **kwargs,
    ):
        if kwargs.get("small_image"):
            raise ValueError("small_image=True changes a ResNet's stem; CPCAudio encodes waveforms, leave it False")
        if kwargs.get("channels_last"):
            raise ValueError("channels_last is a memory format of 2-d convolutions; CPCAudio's are 1-d, leave it False")
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}; got {negatives!r}")
        if prediction_steps < 1:
            raise ValueError(f"prediction_steps must be at least 1, got {prediction_steps}")
        super().__init__(backbone, optimizer=optimizer, base_lr=base_lr, schedule=schedule, **kwargs)
        self.steps = list(range(1, prediction_steps + 1))
        self.negatives, self.gather_distributed = negatives, gather_distributed
        # W_k for every k at once: one linear map with len(steps) x C outputs, no bias (W_k c_t).
        self.predictor = nn.Linear(self.backbone.context_dim, len(self.steps) * self.backbone.frame_dim, bias=False)

    def build_encoder(self, backbone: str | nn.Module, small_image: bool) -> tuple[nn.Module, int]:
        hp = self.hparams
        module = build_audio_encoder(backbone, hp.encoder_dim, hp.context_dim, hp.encoder_norm, hp.embedding)
        return module, module.feature_dim

    # ----------------------------------------------------------------- representation
    def encoder_spec(self) -> dict:
        spec = super().encoder_spec()
        spec.update(modality="audio", audio_encoder=dict(self.backbone.config))
        return spec

    def random_init_backbone(
        self, seed: int = 0, calibrate_on: Iterable | None = None, max_images: int | None = 5000
    ) -> CPCAudioEncoder:
        """The same encoder and GRU freshly initialized; with ``calibrate_on`` (``(waveforms, speakers)``
        batches of training audio) its batch-norm statistics are re-estimated on up to ``max_images``
        waveforms (``calibrate_norm_statistics``), the honest baseline."""
        module = reset_parameters(self.backbone, seed)
        if calibrate_on is not None:
            calibrate_norm_statistics(module, calibrate_on, module, max_images, self.device)
        return module

    # ----------------------------------------------------------------------- training
    def loss(self, waveforms: torch.Tensor) -> torch.Tensor:
        """The CPC loss of a batch of waveforms (``B x 1 x L`` or ``B x L``)."""
        z = self.backbone.frames(waveforms)  # B x T x C
        b, t, c = z.shape
        if t <= self.steps[-1]:
            raise ValueError(
                f"waveforms of {waveforms.shape[-1]} samples give {t} vectors (one per {self.backbone.hop} samples), "
                f"too few to predict {self.steps[-1]} steps ahead; use windows of at least "
                f"{(self.steps[-1] + 1) * self.backbone.hop} samples or fewer prediction_steps"
            )
        contexts = self.backbone.contexts(z)  # B x T x H
        predictions = self.predictor(contexts).view(b, t, len(self.steps), c).permute(0, 2, 1, 3)
        return cpc_sequence_info_nce(predictions, z, self.steps, self.negatives, self.gather_distributed)

    def training_step(self, batch, batch_idx):
        views, _ = batch
        waveforms = views[0] if isinstance(views, (list, tuple)) else views
        loss = self.loss(waveforms)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return loss
