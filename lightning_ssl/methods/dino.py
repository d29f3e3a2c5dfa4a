"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers")."""

from __future__ import annotations

import torch
from torch import nn

from lightning_ssl.backbones import set_drop_path, vit_depth, vit_parameter_groups
from lightning_ssl.callbacks import EMAUpdate
from lightning_ssl.ema import cosine_tau, ema_copy
from lightning_ssl.heads import DINOHead
from lightning_ssl.losses import dino_center, dino_loss, teacher_temperature
from lightning_ssl.methods.base import SSLMethod

__all__ = ["DINO"]


class DINO(SSLMethod):
    """DINO: self-distillation with no labels; a student matches a momentum teacher's centered, sharpened
    output distribution on other views of the image.

    Paper defaults (sec. 3.1, 4.1, appendix and the paper's code for ViT-S/16): ``DINOHead`` (3 layers,
    hidden 2048, bottleneck 256, 65,536 outputs, last layer weight-normalized with its norm fixed and
    frozen during the first epoch); teacher = EMA of the student (backbone and head), tau 0.996 -> 1 on
    a cosine over all optimizer steps (``EMAUpdate``, as BYOL); teacher outputs centered with a center
    updated at momentum 0.9 over the global batch; teacher temperature 0.04 -> 0.07 linearly over the
    first 30 epochs, student temperature 0.1; multi-crop: 2 global views (scale 0.4-1 for ViTs) seen by
    both networks and N local views (96 px, scale 0.05-0.4) seen by the student only (the datamodule's
    ``local_crops``); AdamW, lr 0.0005 x B / 256 after 10 warmup epochs, cosine; weight decay 0.04 ->
    0.4 on a cosine over all optimizer steps (weights only: biases and norm parameters get none);
    per-parameter gradient-norm clipping at 3.0 (the paper's ``clip_gradients``). ViT backbones by name
    (``vit_b_16``, ``timm:vit_small_patch16_224``) or ResNets (the paper's ResNet-50 uses SGD, lr 0.03,
    weight decay 1e-4 constant, head with BN).

    Args (the shared ones are ``SSLMethod``'s):
        out_dim, head_hidden_dim, head_bottleneck_dim, head_layers, head_batch_norm, norm_last_layer:
            the head (``DINOHead``).
        student_temperature: tau_s.
        teacher_temperature: tau_t after the warm-up.
        warmup_teacher_temperature, warmup_teacher_temperature_epochs: tau_t at epoch 0 and the
            warm-up length (``losses.teacher_temperature``).
        center_momentum: m of the center update.
        ema_tau, ema_tau_final: the teacher's EMA rate at the first and last step (cosine between).
        global_crops: how many of the views (the first ones) are global, i.e. seen by the teacher.
        freeze_last_layer_epochs: epochs during which the head's last layer gets no update.
        clip_grad: per-parameter gradient-norm limit (0: none).
        weight_decay_final: the weight decay at the last step (cosine from ``weight_decay``).
        drop_path: stochastic depth of the student's ViT blocks (``backbones.set_drop_path``; DINO's
            ``drop_path_rate`` 0.1; the teacher has none). No effect on other backbones.
        evaluate: which backbone is the representation (kNN monitor, final report, ``validate``,
            ``predict``, ``export``, ``load_encoder``): ``"teacher"``, as the paper's code evaluates
            (``eval_knn.py``/``eval_linear.py --checkpoint_key teacher``), or ``"student"``.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_b_16",
        out_dim: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        head_batch_norm: bool = False,
        norm_last_layer: bool = True,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 30,
        center_momentum: float = 0.9,
        ema_tau: float = 0.996,
        ema_tau_final: float = 1.0,
        global_crops: int = 2,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float = 3.0,
        optimizer: str = "adamw",
        base_lr: float = 0.0005,
        weight_decay: float = 0.04,
        weight_decay_final: float = 0.4,
        warmup_epochs: float = 10,
        drop_path: float = 0.1,
        evaluate: str = "teacher",
        **kwargs,
    ):
        super().__init__(
            backbone,
            optimizer=optimizer,
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            **kwargs,
        )
        if not 0.0 <= ema_tau <= ema_tau_final <= 1.0:
            raise ValueError(f"need 0 <= ema_tau <= ema_tau_final <= 1, got {ema_tau} and {ema_tau_final}")
        if evaluate not in ("teacher", "student"):
            raise ValueError(f"evaluate must be 'teacher' or 'student', got {evaluate!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must lie in [0, 1), got {drop_path}")
        if global_crops < 1 or clip_grad < 0:
            raise ValueError(f"need global_crops >= 1 and clip_grad >= 0, got {global_crops} and {clip_grad}")
        self.student_temperature = student_temperature
        self.teacher_temperature_range = (warmup_teacher_temperature, teacher_temperature)
        self.warmup_teacher_temperature_epochs = warmup_teacher_temperature_epochs
        self.center_momentum, self.global_crops = center_momentum, global_crops
        self.ema_tau, self.ema_tau_final = ema_tau, ema_tau_final
        self.freeze_last_layer_epochs, self.clip_grad = freeze_last_layer_epochs, clip_grad
        self.weight_decay_range = (weight_decay, weight_decay_final)
        self.head = DINOHead(
            self.feature_dim,
            out_dim,
            head_hidden_dim,
            head_bottleneck_dim,
            head_layers,
            head_batch_norm,
            norm_last_layer,
        )
        self.backbone_ema = ema_copy(self.backbone)
        self.head_ema = ema_copy(self.head)
        set_drop_path(self.backbone, drop_path)  # after the copy: the teacher keeps every block
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._decay_groups: list[int] = []
        self.evaluate = evaluate

    def representation(self, images: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """Features of the teacher's backbone (``evaluate="student"``: the student's), or of ``backbone``."""
        if backbone is None:
            backbone = self.backbone_ema if self.evaluate == "teacher" else self.backbone
        return backbone(images)

    def encoder_spec(self) -> dict:
        """``SSLMethod.encoder_spec``, with the checkpoint entries of the evaluated backbone."""
        prefix = "backbone_ema." if self.evaluate == "teacher" else "backbone."
        return {**super().encoder_spec(), "state_prefix": prefix}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_ema), (self.head, self.head_ema)]

    def configure_callbacks(self):
        return [*super().configure_callbacks(), EMAUpdate(tau=self.ema_tau, tau_final=self.ema_tau_final)]

    def teacher_temperature(self, epoch: int | None = None) -> float:
        """tau_t at ``epoch`` (default: the current one)."""
        epoch = self.current_epoch if epoch is None else epoch
        start, end = self.teacher_temperature_range
        return teacher_temperature(epoch, start, end, self.warmup_teacher_temperature_epochs)

    def training_step(self, batch, batch_idx):
        views, _ = batch
        if len(views) < max(2, self.global_crops):
            raise ValueError(f"DINO needs at least 2 and global_crops={self.global_crops} views, got {len(views)}")
        student = self.forward_crops(self.backbone, self.head, views)
        with torch.no_grad():
            teacher = self.forward_crops(self.backbone_ema, self.head_ema, views[: self.global_crops])
        temperature = self.teacher_temperature()
        loss = dino_loss(student, teacher, self.center, self.student_temperature, temperature)
        self.center.copy_(dino_center(self.center, teacher, self.center_momentum))
        self.log("train/loss", loss)
        self.log("train/teacher_temperature", temperature)
        return loss

    # ----------------------------------------------------------------- optimization
    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """``SSLMethod.parameter_groups``; with a ViT, the position embedding and class token are decayed
        too (the reference's ``get_params_groups`` exempts only biases and 1-d parameters)."""
        if vit_depth(self.backbone) is not None:
            return vit_parameter_groups(self, self.backbone, weight_decay, self.layer_decay, decay_tokens=True)
        return super().parameter_groups(weight_decay)

    def configure_optimizers(self):
        config = super().configure_optimizers()
        groups = config["optimizer"].param_groups
        self._decay_groups = [i for i, g in enumerate(groups) if g["weight_decay"] > 0]
        return config

    def weight_decay_at(self, step: int, total_steps: int) -> float:
        """Weight decay after ``step`` of ``total_steps``: cosine from ``weight_decay`` to ``weight_decay_final``."""
        return cosine_tau(step, total_steps, *self.weight_decay_range)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Sets this step's weight decay on the decayed groups (derived from the trainer's step: exact on resume)."""
        wd = self.weight_decay_at(self.global_step, int(self.trainer.estimated_stepping_batches))
        optimizer = self.trainer.optimizers[0]
        for i in self._decay_groups:
            optimizer.param_groups[i]["weight_decay"] = wd

    def on_after_backward(self) -> None:
        """The head's last layer gets no update during the first ``freeze_last_layer_epochs`` epochs."""
        if self.current_epoch < self.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """DINO's per-parameter clipping: each gradient whose norm exceeds ``clip_grad`` is scaled to that
        norm (on the device, no host read); then the Trainer's own ``gradient_clip_val``, if set."""
        if self.clip_grad > 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                scales = [torch.clamp(self.clip_grad / (n + 1e-6), max=1.0) for n in norms]
                torch._foreach_mul_(grads, scales)
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
