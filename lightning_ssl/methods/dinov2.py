"""DINOv2-style pretraining (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision").

iBOT's two self-distillation losses with untied heads, Sinkhorn-Knopp centering of the teacher and the
KoLeo regularizer, with DINOv2's schedules (``dinov2/train/ssl_meta_arch.py``, ``dinov2/loss/`` and
``ssl_default_config.yaml`` of the paper's code):

- ``sinkhorn_knopp_teacher``: the teacher's targets by 3 Sinkhorn-Knopp iterations over the global batch
  (``DINOLoss.sinkhorn_knopp_teacher``, and ``iBOTPatchLoss.sinkhorn_knopp_teacher`` for the masked patches,
  whose count differs between processes and is all-reduced).
- ``dino_targets_loss``: DINO's cross entropy against given teacher targets (``DINOLoss.forward``).
- ``koleo_loss``: the Kozachenko-Leonenko entropy estimator's regularizer (``KoLeoLoss``).
- ``masked_center``: the EMA center of the masked patches' teacher logits (``centering="center"``).
- ``stratified_block_masks``: DINOv2's masks of a batch (``collate_data_and_cast``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from lightning_ssl.backbones import PooledBackbone, vit_depth
from lightning_ssl.distributed import all_reduce_sum, gather_no_grad
from lightning_ssl.heads import DINOHead
from lightning_ssl.losses import at_least_float32, dino_center, float32_loss
from lightning_ssl.masking import block_masks
from lightning_ssl.methods.ibot import IBOT, masked_patch_loss
from lightning_ssl.vit import patch_projection

__all__ = [
    "DINOv2",
    "CENTERING",
    "sinkhorn_knopp_teacher",
    "dino_targets_loss",
    "koleo_loss",
    "masked_center",
    "stratified_block_masks",
    "uniform_drop_path",
]

CENTERING = ("sinkhorn_knopp", "center")


@torch.no_grad()
@float32_loss
def sinkhorn_knopp_teacher(teacher: torch.Tensor, temperature: float = 0.07, iterations: int = 3) -> torch.Tensor:
    """DINOv2's teacher targets (Oquab et al. 2023, sec. 4, "Sinkhorn-Knopp centering"; the code's
    ``sinkhorn_knopp_teacher``): ``Q = exp(teacher / temperature)`` normalized ``iterations`` times so that
    every prototype gets ``1 / K`` of the mass and every sample ``1 / S``, over the *global* set of ``S``
    samples: every sum over samples is all-reduced across processes, and so is ``S``, the number of rows,
    which may differ between processes (the masked patches: the code's all-reduced
    ``n_masked_patches_tensor``; for class tokens it is ``rows x processes``). Ends on the per-sample
    normalization, so each row of the result sums to 1.

    ``exp`` is taken after subtracting the global maximum (a constant factor that the first normalization
    removes; the code subtracts nothing and can overflow). A process with no rows takes part in the sums.

    Args:
        teacher: ``S_local x K`` teacher logits of this process.
    Returns ``S_local x K`` targets (no gradient).
    """
    if teacher.ndim != 2:
        raise ValueError(f"teacher must be S x K, got shape {tuple(teacher.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    floor = teacher.new_full((1,), float("-inf"))
    peak = gather_no_grad(torch.cat([teacher.flatten(), floor]).amax().reshape(1)).amax()
    q = torch.exp((teacher - peak) / temperature).t()  # K x S
    k = q.shape[0]
    samples = all_reduce_sum(teacher.new_full((), float(teacher.shape[0])))
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)) / k  # each prototype: 1 / K of the mass
        q = q / q.sum(dim=0, keepdim=True) / samples  # each sample: 1 / S
    return (q * samples).t()


@float32_loss
def dino_targets_loss(
    student: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], student_temperature: float = 0.1
) -> torch.Tensor:
    """DINO's loss against ready teacher targets (DINOv2's ``DINOLoss.forward``, whose global and local terms
    are divided by the number of pairs): for every global crop ``i`` with targets ``targets[i]`` and every
    student crop ``v != i``, ``-sum_k targets_k log softmax(student_v / student_temperature)_k``, averaged
    over samples and over the pairs. With ``targets = softmax((t - center) / tau_t)`` it is ``dino_loss``.

    Args:
        student: one ``B x K`` tensor of student logits per crop (global crops first).
        targets: the ``B x K`` targets of the global crops (no gradient).
    """
    if len(targets) < 1 or len(student) < 2 or len(targets) > len(student):
        raise ValueError(
            f"need >= 2 student crops and 1..len(student) target crops, got {len(student)}, {len(targets)}"
        )
    log_p = [F.log_softmax(s / student_temperature, dim=-1) for s in student]
    total, pairs = student[0].new_zeros(()), 0
    for i, q in enumerate(targets):
        for v in range(len(student)):
            if v != i:
                total = total - (q.detach() * log_p[v]).sum(dim=-1).mean()
                pairs += 1
    return total / pairs


@float32_loss
def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The KoLeo regularizer (Sablayrolles et al. 2019; Oquab et al. 2023, sec. 4; ``KoLeoLoss`` of the code):
    ``-mean_i log(||x_i - x_j(i)|| + eps)`` over the L2-normalized rows ``x_i`` of ``features``, ``j(i)`` the
    nearest other row (largest dot product). As the code: the distance is ``nn.PairwiseDistance(2, eps)``'s,
    ``||x_i - x_j + eps||``; the neighbour choice has no gradient, the distance does (to both rows). It spreads
    the features of a batch apart: DINOv2 applies it per process to the student's class tokens of each
    global crop."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"KoLeo needs B x D features with B >= 2 (a nearest neighbour), got {tuple(features.shape)}")
    x = F.normalize(features, p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any dot product of unit vectors: never one's own neighbour
        neighbour = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[neighbour], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


@torch.no_grad()
@float32_loss
def masked_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """The EMA center of the masked patches' teacher logits (DINOv2's ``centering="center"``):
    ``momentum * center + (1 - momentum) * mean`` over the masked tokens of every process (sum and count
    all-reduced, so it is the same on every process although the counts differ); unchanged when no process
    has a masked token. DINOv2's ``iBOTPatchLoss.update_center`` averages the processes' own means instead
    (equal when the counts are). Returns the new ``1 x K`` center."""
    total = all_reduce_sum(teacher.sum(dim=0, keepdim=True))
    count = all_reduce_sum(teacher.new_full((), float(teacher.shape[0])))
    updated = center.reshape(1, -1) * momentum + total / count.clamp(min=1.0) * (1 - momentum)
    return torch.where(count > 0, updated, center.reshape(1, -1))


def stratified_block_masks(
    num_images: int,
    grid: tuple[int, int],
    ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    min_aspect: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DINOv2's masks of a batch (``collate_data_and_cast``): exactly ``int(num_images * mask_probability)``
    images are masked, image ``i`` of them at a ratio uniform in the ``i``-th of as many equal slices of
    ``ratio_range`` (the code's ``linspace(*mask_ratio_tuple, n_samples_masked + 1)``), with BEiT's blocks
    (``masking.block_masks``); then the images are shuffled. ``num_images x N`` bool on the CPU, from
    ``generator`` (default: torch's global generator)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must lie in [0, 1], got {mask_probability}")
    low, high = ratio_range
    rows, cols = grid
    masked = int(num_images * mask_probability)
    masks = torch.zeros(num_images, rows * cols, dtype=torch.bool)
    for i in range(masked):
        a, b = low + (high - low) * i / masked, low + (high - low) * (i + 1) / masked
        masks[i] = block_masks(1, grid, (a, b), 1.0, min_aspect, generator=generator)[0]
    return masks[torch.randperm(num_images, generator=generator)]


def uniform_drop_path(backbone: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth at the same ``rate`` on every block of a torchvision or timm ViT, in place (DINOv2's
    ``drop_path_uniform: true``; ``backbones.set_drop_path`` increases the rate linearly with depth)."""
    if vit_depth(backbone) is None:
        return backbone
    inner = backbone.module if isinstance(backbone, PooledBackbone) else backbone
    if isinstance(inner, torchvision.models.VisionTransformer):
        for block in inner.encoder.layers:
            if isinstance(getattr(block, "drop_path", None), StochasticDepth):
                block.drop_path = StochasticDepth(rate, "row")
    else:
        for block in inner.blocks:
            for name in ("drop_path1", "drop_path2"):
                if hasattr(block, name):
                    setattr(block, name, StochasticDepth(rate, "row") if rate > 0 else nn.Identity())
    return backbone


class DINOv2(IBOT):
    """DINOv2-style pretraining (Oquab et al. 2023, sec. 4 and appendix; the paper's code
    ``dinov2/train/ssl_meta_arch.py``, ``dinov2/loss/`` and ``ssl_default_config.yaml``): iBOT
    (``IBOT``) with DINOv2's changes.

    Included: DINO's class-token loss over multi-crop (``dino_targets_loss``; every student crop against the
    teacher's other global crops) and iBOT's masked-patch loss (``ibot.masked_patch_loss``, DINOv2's
    ``forward_masked``: the same per-image normalization as iBOT; the heads run on the masked tokens only),
    both weighted 1.0; untied heads (``shared_head=False``: a second ``DINOHead`` for the patches, the
    paper's "untying head weights" and the ViT-L/14 and g/14 configs' ``ibot.separate_head: true``;
    ``ssl_default_config.yaml`` ties them); Sinkhorn-Knopp centering of both teacher outputs, 3
    iterations over the global batch (``sinkhorn_knopp_teacher``; the patch head's over the masked patches of
    all processes; ``centering="center"`` is the EMA centering of DINO/iBOT, the default config's
    ``train.centering``); KoLeo on the student's class tokens of each global crop, per process, weight 0.1
    (``koleo_loss``); masks on half of the global crops at stratified ratios in (0.1, 0.5)
    (``stratified_block_masks``; ``mask_sample_probability``, ``mask_ratio_min_max``), the teacher on the
    unmasked global crops, the student's mask token initialized to 0; the schedules: teacher temperature
    0.04 -> 0.07, linear per step over the first 30 epochs (the code's ``CosineScheduler`` warm-up), for both
    heads; EMA 0.992 -> 1 (``momentum_teacher``, cosine); AdamW, lr ``0.004 x sqrt(B / 1024)``
    (``scaling_rule: sqrt_wrt_1024``; here ``base_lr=1.25e-4`` with ``lr_scaling="sqrt"``:
    ``1.25e-4 x sqrt(B)``), 10 warm-up epochs then cosine; weight decay 0.04 -> 0.4 (cosine;
    ``weight_decay_end``, 0.2 in the ViT-L/14 and g/14 configs) on every parameter but biases and norms
    (position embedding, class and mask tokens included); layer-wise lr decay 0.9, the patch embedding's lr
    x 0.2 (``patch_embed_lr_mult``), the mask token at layer 0; the last layers frozen for 1 epoch; gradient
    norm clipped at 3.0 per network (backbone with mask token, class head, patch head: the code's
    ``clip_grad_norm_`` of each student module; DINO and iBOT clip each parameter); uniform drop path 0.3
    on the student (ViT-L's ``drop_path_rate``, ``drop_path_uniform``; 0.4 in the ViT-L/14 and g/14
    configs); weight-normalized last layers with a learned norm (DINOv2's ``DINOHead`` has no
    ``norm_last_layer``); the teacher's class token as the representation.

    Not included: the LVD-142M data curation (retrieval-based deduplication and selection); the ViT-g/14
    architecture and DINOv2's ViT details (SwiGLU feed-forward, LayerScale 1e-5, registers of the later
    "Vision Transformers Need Registers", the antialiased position interpolation); xFormers memory-efficient
    attention, sequence packing of the crops, FSDP and its mixed-precision policy, the efficient stochastic
    depth that skips dropped samples; the high-resolution adaptation phase (518 px at the end); the
    distillation into smaller models; DINOv2's evaluation protocol (linear heads on the class token and
    pooled patch tokens). Epochs are the data loader's: DINOv2's "epochs" are 1250 iterations
    (``OFFICIAL_EPOCH_LENGTH``), so its 100-epoch ImageNet schedule at batch 2048 is 200 ImageNet epochs
    (configs/dinov2_imagenet.yaml converts every epoch count).

    Args (the shared ones are ``IBOT``'s, ``DINO``'s and ``SSLMethod``'s):
        centering: ``"sinkhorn_knopp"`` or ``"center"`` (DINO/iBOT's EMA centers; the patch center over
            the masked tokens, ``masked_center``).
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        koleo_weight: weight of the KoLeo term (0: off).
        patch_embed_lr_scale: lr multiplier of the patch embedding.
        drop_path_uniform: the same drop-path rate on every block (``False``: DINO's linear rule).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_l_14",
        out_dim: int = 65536,
        patch_out_dim: int | None = None,
        shared_head: bool = False,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        head_batch_norm: bool = False,
        norm_last_layer: bool = False,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        teacher_patch_temperature: float = 0.07,
        warmup_teacher_patch_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 30,
        centering: str = "sinkhorn_knopp",
        sinkhorn_iterations: int = 3,
        center_momentum: float = 0.9,
        patch_center_momentum: float = 0.9,
        cls_loss_weight: float = 1.0,
        patch_loss_weight: float = 1.0,
        koleo_weight: float = 0.1,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_min_aspect: float = 0.3,
        ema_tau: float = 0.992,
        ema_tau_final: float = 1.0,
        global_crops: int = 2,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float = 3.0,
        optimizer: str = "adamw",
        base_lr: float = 0.000125,
        lr_scaling: str = "sqrt",
        weight_decay: float = 0.04,
        weight_decay_final: float = 0.4,
        warmup_epochs: float = 10,
        layer_decay: float = 0.9,
        patch_embed_lr_scale: float = 0.2,
        drop_path: float = 0.3,
        drop_path_uniform: bool = True,
        evaluate: str = "teacher",
        **kwargs,
    ):
        if centering not in CENTERING:
            raise ValueError(f"centering must be one of {', '.join(CENTERING)}; got {centering!r}")
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
        if koleo_weight < 0:
            raise ValueError(f"koleo_weight must be >= 0, got {koleo_weight}")
        if not patch_embed_lr_scale >= 0:
            raise ValueError(f"patch_embed_lr_scale must be >= 0, got {patch_embed_lr_scale}")
        super().__init__(
            backbone,
            out_dim=out_dim,
            patch_out_dim=patch_out_dim,
            shared_head=shared_head,
            head_hidden_dim=head_hidden_dim,
            head_bottleneck_dim=head_bottleneck_dim,
            head_layers=head_layers,
            head_batch_norm=head_batch_norm,
            norm_last_layer=norm_last_layer,
            student_temperature=student_temperature,
            teacher_temperature=teacher_temperature,
            warmup_teacher_temperature=warmup_teacher_temperature,
            teacher_patch_temperature=teacher_patch_temperature,
            warmup_teacher_patch_temperature=warmup_teacher_patch_temperature,
            warmup_teacher_temperature_epochs=warmup_teacher_temperature_epochs,
            center_momentum=center_momentum,
            patch_center_momentum=patch_center_momentum,
            cls_loss_weight=cls_loss_weight,
            patch_loss_weight=patch_loss_weight,
            mask_probability=mask_probability,
            mask_ratio=mask_ratio,
            mask_min_aspect=mask_min_aspect,
            ema_tau=ema_tau,
            ema_tau_final=ema_tau_final,
            global_crops=global_crops,
            freeze_last_layer_epochs=freeze_last_layer_epochs,
            clip_grad=clip_grad,
            optimizer=optimizer,
            base_lr=base_lr,
            lr_scaling=lr_scaling,
            weight_decay=weight_decay,
            weight_decay_final=weight_decay_final,
            warmup_epochs=warmup_epochs,
            layer_decay=layer_decay,
            drop_path=drop_path,
            evaluate=evaluate,
            **kwargs,
        )
        self.centering, self.sinkhorn_iterations = centering, sinkhorn_iterations
        self.koleo_weight, self.patch_embed_lr_scale = koleo_weight, patch_embed_lr_scale
        if drop_path_uniform:
            uniform_drop_path(self.backbone, drop_path)

    # ----------------------------------------------------------------- heads
    def build_patch_head(
        self,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        layers: int,
        batch_norm: bool,
        norm_last_layer: bool,
    ) -> nn.Module:
        """DINOv2's ``ibot_head``: a second ``DINOHead`` of its own (MLP, bottleneck and last layer)."""
        return DINOHead(self.feature_dim, out_dim, hidden_dim, bottleneck_dim, layers, batch_norm, norm_last_layer)

    def patch_last_layer(self) -> nn.Module | None:
        return None if self.patch_head is None else self.patch_head.last_layer

    def patch_parts(self, teacher: bool) -> tuple[nn.Module, nn.Module]:
        if self.patch_head is None:
            return super().patch_parts(teacher)
        head = self.patch_head_ema if teacher else self.patch_head
        return head.mlp, head.last_layer

    # ----------------------------------------------------------------- masks and schedules
    def draw_masks(
        self, batch: int, grids: list[tuple[int, int]], generator: torch.Generator | None
    ) -> list[torch.Tensor]:
        """``stratified_block_masks`` over the ``batch x views`` images of all global views together (the code
        collates the global crops before masking), split back into one ``batch x N`` CPU mask per view."""
        if any(grid != grids[0] for grid in grids):
            raise ValueError(f"the global views must share one shape, got patch grids {grids}")
        masks = stratified_block_masks(
            batch * len(grids), grids[0], self.mask_ratio, self.mask_probability, self.mask_min_aspect, generator
        )
        return list(masks.split(batch))

    def _warmup(self, epoch: float | None, start: float, end: float) -> float:
        """DINOv2's ``CosineScheduler`` warm-up of a constant: ``np.linspace(start, end, W)`` over the ``W``
        steps of ``warmup_teacher_temperature_epochs``, then ``end``; at optimizer step ``global_step`` during
        a fit (exact on resume), else at the start of ``epoch`` (default: the current epoch; outside a fit,
        one step per epoch, i.e. DINO's per-epoch schedule)."""
        steps_per_epoch = 1
        if self._trainer is not None and self.trainer.num_training_batches:
            steps_per_epoch = self.steps_per_epoch()
            step = self.global_step if epoch is None else round(epoch * steps_per_epoch)
        else:
            step = round(self.current_epoch if epoch is None else epoch)
        warmup_steps = round(self.warmup_teacher_temperature_epochs * steps_per_epoch)
        if step >= warmup_steps:
            return end
        if warmup_steps == 1:
            return start
        return start + (end - start) * step / (warmup_steps - 1)

    def teacher_temperature(self, epoch: float | None = None) -> float:
        """tau_t at ``epoch`` (default: now), linear per step over the warm-up epochs (DINOv2)."""
        return self._warmup(epoch, *self.teacher_temperature_range)

    def teacher_patch_temperature(self, epoch: float | None = None) -> float:
        """The patch head's tau_t at ``epoch`` (default: now), linear per step as ``teacher_temperature``."""
        return self._warmup(epoch, *self.teacher_patch_temperature_range)

    # ----------------------------------------------------------------- training
    def teacher_targets(
        self, cls: list[torch.Tensor], patches: torch.Tensor, temperature: float, patch_temperature: float
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Targets of the teacher's class logits (one ``B x K`` per global crop) and of its ``M x K`` masked-patch
        logits: Sinkhorn-Knopp over the global batch, or softmax after the EMA centers (updated here)."""
        if self.centering == "sinkhorn_knopp":
            cls_targets = sinkhorn_knopp_teacher(torch.cat(cls), temperature, self.sinkhorn_iterations)
            patch_targets = sinkhorn_knopp_teacher(patches, patch_temperature, self.sinkhorn_iterations)
            return list(cls_targets.split([c.shape[0] for c in cls])), patch_targets
        cls_targets = [F.softmax((c - self.center) / temperature, dim=-1) for c in cls]
        patch_targets = F.softmax((patches - self.patch_center) / patch_temperature, dim=-1)
        self.center.copy_(dino_center(self.center, cls, self.center_momentum))
        self.patch_center.copy_(masked_center(self.patch_center, patches, self.patch_center_momentum))
        return cls_targets, patch_targets

    def training_step(self, batch, batch_idx):
        views, _ = batch
        self.check_views(views)
        global_views, local_views = views[: self.global_crops], views[self.global_crops :]
        masks, index, weights = self.mask_layout(self.sample_masks(global_views, batch_idx), global_views[0].device)
        student = self.encode_global(self.backbone, global_views, masks)
        student_cls = self.apply_head(self.head, self.student_cls(student, local_views))
        student_patches = self.patch_network(teacher=False)(self.masked_tokens(student, index))
        with torch.no_grad():  # the teacher's heads on its class tokens and on the masked patches only
            teacher = self.encode_global(self.backbone_ema, global_views)
            teacher_cls = at_least_float32(self.apply_head(self.head_ema, [t.cls for t in teacher]))
            teacher_patches = at_least_float32(self.patch_network(teacher=True)(self.masked_tokens(teacher, index)))
            temperature, patch_temperature = self.teacher_temperature(), self.teacher_patch_temperature()
            cls_targets, patch_targets = self.teacher_targets(
                teacher_cls, teacher_patches, temperature, patch_temperature
            )
        cls_loss = dino_targets_loss(student_cls, cls_targets, self.student_temperature)
        patch_loss = masked_patch_loss(
            student_patches, patch_targets, torch.cat(masks), self.student_temperature, weights=weights
        )
        loss = self.cls_loss_weight * cls_loss + self.patch_loss_weight * patch_loss
        if self.koleo_weight > 0:
            koleo = sum(koleo_loss(t.cls) for t in student)  # per global crop, as the code (summed)
            loss = loss + self.koleo_weight * koleo
            self.log("train/koleo_loss", koleo)
        self.log("train/loss", loss)
        self.log("train/cls_loss", cls_loss)
        self.log("train/patch_loss", patch_loss)
        self.log("train/teacher_temperature", temperature)
        self.log("train/teacher_patch_temperature", patch_temperature)
        return loss

    # ----------------------------------------------------------------- optimization
    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """DINO's ViT groups (layer-wise lr decay, weight decay on everything but biases and norms), with
        DINOv2's two exceptions: the patch embedding's lr x ``patch_embed_lr_scale`` and the mask token at
        layer 0 (``get_vit_lr_decay_rate``)."""
        groups = super().parameter_groups(weight_decay)
        patch = {id(p) for p in patch_projection(self.backbone).parameters()}
        bottom = self.layer_decay ** (vit_depth(self.backbone) + 1)
        out = []
        for group in groups:
            plain = [p for p in group["params"] if id(p) not in patch and p is not self.mask_token]
            embed = [p for p in group["params"] if id(p) in patch]
            token = [p for p in group["params"] if p is self.mask_token]
            scale = group.get("lr_scale", 1.0)
            out += [{**group, "params": plain}] if plain else []
            out += [{**group, "params": embed, "lr_scale": scale * self.patch_embed_lr_scale}] if embed else []
            out += [{**group, "params": token, "lr_scale": bottom}] if token else []
        return out

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """DINOv2's clipping: the gradient norm of each student network (backbone with the mask token, class
        head, patch head) is clipped at ``clip_grad`` (on the device, no host read); then the Trainer's own
        ``gradient_clip_val``, if set."""
        if self.clip_grad > 0:
            networks = [[*self.backbone.parameters(), self.mask_token], list(self.head.parameters())]
            if self.patch_head is not None:
                networks.append(list(self.patch_head.parameters()))
            for params in networks:
                grads = [p for p in params if p.grad is not None]
                if grads:
                    torch.nn.utils.clip_grad_norm_(grads, self.clip_grad, foreach=True)
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
