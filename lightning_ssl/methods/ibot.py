"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer").

DINO's self-distillation of the class token plus masked image modeling by self-distillation on the
patch tokens: the student sees the global crops with block-wise masked patches replaced by a learned
mask token, the teacher (the EMA "online tokenizer") sees them unmasked, and at every masked patch the
student's patch distribution must match the teacher's centered, sharpened one.

- ``ibot_patch_loss``: the masked-patch cross entropy of the paper's eq. 2 as ``iBOTLoss`` computes it, on
  the full token grid.
- ``masked_patch_loss``, ``masked_patch_weights``: the same loss on the masked tokens only (DINOv2's
  ``forward_masked``), which the training steps use: the student's patch head runs on the masked tokens only.
- ``float32_loss``: runs a loss with autocast off, its 16-bit tensor arguments cast to float32 (the
  losses here and in ``dinov2``; the same rule as ``lightning_ssl.losses``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_ssl.ema import ema_copy
from lightning_ssl.losses import at_least_float32, dino_center, dino_loss, float32_loss, teacher_temperature
from lightning_ssl.mask_sampling import MaskSampler
from lightning_ssl.masking import block_masks
from lightning_ssl.methods.dino import DINO
from lightning_ssl.vit import Tokens, encode_tokens, patch_grid, require_vit, vit_width

__all__ = ["IBOT", "ibot_patch_loss", "masked_patch_loss", "masked_patch_weights"]


@float32_loss
def ibot_patch_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """iBOT's masked-image-modeling loss (Zhou et al. 2022, eq. 2; ``iBOTLoss`` of the paper's code): for
    each global crop, the student's patch tokens of the *masked* crop against the teacher's patch tokens of
    the same crop unmasked (the same view, ``q == v`` in the code), at the masked patches only.

    For image ``b`` of crop ``c`` with mask ``m`` (``B x N``, True = masked) the term is
    ``sum_n m_n H(P_t[b, n], P_s[b, n]) / max(sum_n m_n, 1)`` with
    ``P_t = softmax((t - center) / teacher_temperature)`` (no gradient) and
    ``P_s = softmax(s / student_temperature)``: the mean cross entropy over the image's masked patches,
    0 for an image with none. The loss is the mean over images (masked or not) and over the crops, the
    code's ``loss2 = sum(loss2 * mask, -1) / mask.sum(-1).clamp(min=1.0)``, ``loss2.mean()``, then the
    average over the ``n_loss_terms2`` crops. An unmasked patch's logits do not enter it.

    Args:
        student: one ``B x N x K`` tensor of the student's patch logits per global crop (masked input).
        teacher: the teacher's ``B x N x K`` patch logits of the same crops (unmasked input).
        masks: one ``B x N`` bool tensor per crop, True at the patches the student saw masked.
        center: ``K`` or ``1 x K`` running center of the teacher's patch logits (the code's ``center2``).
    """
    if not 1 <= len(student) == len(teacher) == len(masks):
        raise ValueError(
            f"need one student, teacher and mask tensor per global crop, got {len(student)}, {len(teacher)}, "
            f"{len(masks)}"
        )
    total = student[0].new_zeros(())
    for s, t, m in zip(student, teacher, masks):
        if s.ndim != 3 or s.shape != t.shape or tuple(m.shape) != tuple(s.shape[:2]):
            raise ValueError(
                f"student and teacher must be B x N x K and the mask B x N, got {tuple(s.shape)}, {tuple(t.shape)} "
                f"and {tuple(m.shape)}"
            )
        targets = F.softmax((t.detach() - center.reshape(1, 1, -1)) / teacher_temperature, dim=-1)
        cross_entropy = -(targets * F.log_softmax(s / student_temperature, dim=-1)).sum(dim=-1)  # B x N
        weight = m.to(device=s.device, dtype=s.dtype)
        per_image = (cross_entropy * weight).sum(dim=-1) / weight.sum(dim=-1).clamp(min=1.0)
        total = total + per_image.mean()
    return total / len(student)


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """``1 / (masked patches of the token's image)`` for every masked token of the ``I x N`` bool ``masks``, in
    ``masks.flatten().nonzero()`` order (image by image, patch by patch): the code's ``masks_weight``."""
    counts = masks.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    return (1.0 / counts).expand(masks.shape)[masks]


@float32_loss
def masked_patch_loss(
    student: torch.Tensor,
    targets: torch.Tensor,
    masks: torch.Tensor,
    student_temperature: float = 0.1,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ibot_patch_loss`` on the masked tokens only (DINOv2's ``iBOTPatchLoss.forward_masked``):
    ``-sum_m w_m sum_k targets_m,k log softmax(student_m / student_temperature)_k / I`` with ``w_m = 1 /`` the
    number of masked patches of token ``m``'s image and ``I = masks.shape[0]`` the number of images (masked or
    not; all global crops): the mean over images of the mean cross entropy over the image's masked patches,
    iBOT's normalization. (DINOv2's ``loss_scales = 2`` and ``ibot_loss_scale = 1 / n_global_crops`` cancel
    for 2 global crops.) With ``targets = softmax((t - center) / tau_t)`` at the masked tokens it equals
    ``ibot_patch_loss`` on the full grid.

    Args:
        student: ``M x K`` student logits of the masked tokens, in ``masks.flatten().nonzero()`` order.
        targets: ``M x K`` teacher targets of the same tokens (no gradient).
        masks: ``I x N`` bool masks of the images (the global crops concatenated, crop by crop).
        weights: the ``M`` weights ``w`` when already known (``masked_patch_weights``; the training steps
            compute them on the CPU from their CPU masks, with no device synchronization).
    """
    if student.ndim != 2 or student.shape != targets.shape:
        raise ValueError(
            f"student and targets must both be M x K, got {tuple(student.shape)} and {tuple(targets.shape)}"
        )
    if masks.ndim != 2:
        raise ValueError(f"masks must be I x N, got shape {tuple(masks.shape)}")
    if weights is None:
        weights = masked_patch_weights(masks)
    if weights.shape != student.shape[:1]:
        raise ValueError(f"{student.shape[0]} masked tokens but {weights.shape[0]} weights (masked patches)")
    cross_entropy = -(targets.detach() * F.log_softmax(student / student_temperature, dim=-1)).sum(dim=-1)
    return (cross_entropy * weights.to(cross_entropy)).sum() / masks.shape[0]


class IBOT(DINO):
    """iBOT: DINO's class-token self-distillation plus masked image modeling with an online tokenizer
    (Zhou et al. 2022, sec. 3 and appendix; the paper's code ``main_ibot.py``, ``models/head.py`` and
    ``loader.py``).

    Each step: the global crops get block-wise masks (``masking.block_masks``; BEiT's blocks, aspect
    ratio log-uniform in [0.3, 1/0.3]; per crop and image, masked with probability ``mask_probability``
    at a ratio uniform in ``mask_ratio``), the local crops none. The student encodes the masked global
    crops (masked patch embeddings replaced by the learned ``mask_token`` before the position
    embeddings, the code's ``masked_embed``) and the local crops; the teacher (EMA of the student) the
    unmasked global crops. Loss = ``cls_loss_weight x`` DINO's loss on the class tokens (``dino_loss``:
    student on every crop against the teacher on the other global crops) ``+ patch_loss_weight x``
    ``ibot_patch_loss`` (student's masked patches against the teacher's patches of the same crop;
    computed as ``masked_patch_loss`` on the masked tokens, the same value). The
    two teacher distributions have their own centers (``center``, ``patch_center``; momentum 0.9 over the
    global batch; the patch center over every patch of the teacher's global crops, as the code's
    ``update_center``) and temperatures. The representation is the teacher's class token (DINO's
    ``evaluate="teacher"``; the paper evaluates the teacher).

    Defaults (the paper's appendix, ``main_ibot.py``'s argparse and its README's run flags; DINO's where
    iBOT keeps them): head
    ``[D, 2048, 2048, 256]`` -> 8192 outputs (``--out_dim 8192``), shared by the class and patch tokens
    (``--shared_head true`` of the released ViT-S/B runs; ``shared_head=False`` gives the patch tokens
    their own last layer on the shared MLP, ``iBOTHead.last_layer2`` with ``patch_out_dim`` outputs,
    the code's argparse default); weight-normalized last layer with fixed norm (ViT-B's
    ``--norm_last_layer true``), frozen in epoch 0; teacher temperatures 0.04 -> 0.07 over the first 30
    epochs for both the class token (``--warmup_teacher_temp``, ``--teacher_temp``) and the patches
    (``--warmup_teacher_patch_temp 0.04``, ``--teacher_patch_temp 0.07``); student temperature 0.1;
    ``lambda1 = lambda2 = 1``; masks with probability 0.5 at a ratio in (0.1, 0.5) (the released
    runs' ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``: per crop, ratio 0 or 0.3 +- 0.2 with equal
    chance; ``mask_probability=1`` is the argparse default's every-crop masking); EMA 0.996 -> 1
    (cosine); AdamW, lr 0.0005 x B/256 after 10 warmup epochs, cosine; weight decay 0.04 -> 0.4 (cosine);
    the mask token is weight-decayed like the other 2-d parameters (the code's ``get_params_groups``);
    drop path 0.1 on the student; per-parameter gradient clipping at 3.0.

    Differences from the code: blocks have at least 4 patches (BEiT's rule; ``ImageFolderMask`` uses
    ``(min(rows, cols) // 3) ** 2``, 16 on 14 x 14); masks are drawn in the training step from torch's
    global CPU generator (saved in checkpoints) instead of the data loader; no ``pred_start_epoch``; the
    student's patch head runs on the masked tokens only, and the teacher's last layer on the masked tokens
    and on the mean bottleneck vector (the center's input: the last layer is linear and bias-free), which
    gives the code's loss and center at a fraction of the cost of the head on every patch (with
    ``head_batch_norm`` the student head's batch statistics are over the masked tokens).

    Args (the shared ones are ``DINO``'s and ``SSLMethod``'s):
        backbone: a torchvision or timm ViT (``vit_s_16``, ``vit_b_16``, ``timm:vit_small_patch16_224``).
        out_dim: outputs of the class-token head.
        patch_out_dim: outputs of the patch head; ``None``: ``out_dim``. Must equal ``out_dim`` with a
            shared head.
        shared_head: one head for class and patch tokens; ``False``: the patch tokens get their own last
            layer (``build_patch_head``).
        teacher_patch_temperature, warmup_teacher_patch_temperature: the teacher's patch temperature after
            and at the start of the warm-up (``warmup_teacher_temperature_epochs``, shared with the class token).
        patch_center_momentum: momentum of the patch center.
        cls_loss_weight, patch_loss_weight: lambda1 and lambda2.
        mask_probability: the chance that a global crop of an image is masked.
        mask_ratio: ``(low, high)``: a masked crop covers ``round(r N)`` patches, ``r`` uniform in it.
        mask_min_aspect: the blocks' aspect ratios lie in ``[mask_min_aspect, 1 / mask_min_aspect]``.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_b_16",
        out_dim: int = 8192,
        patch_out_dim: int | None = None,
        shared_head: bool = True,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        head_batch_norm: bool = False,
        norm_last_layer: bool = True,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        warmup_teacher_temperature: float = 0.04,
        teacher_patch_temperature: float = 0.07,
        warmup_teacher_patch_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 30,
        center_momentum: float = 0.9,
        patch_center_momentum: float = 0.9,
        cls_loss_weight: float = 1.0,
        patch_loss_weight: float = 1.0,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_min_aspect: float = 0.3,
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
        patch_dim = out_dim if patch_out_dim is None else patch_out_dim
        if shared_head and patch_dim != out_dim:
            raise ValueError(
                f"a shared head gives the patches the class token's {out_dim} outputs, got patch_out_dim="
                f"{patch_dim}: leave it None or use shared_head=False"
            )
        if out_dim < 1 or patch_dim < 1:
            raise ValueError(f"out_dim and patch_out_dim must be positive, got {out_dim} and {patch_dim}")
        temperatures = (
            student_temperature,
            teacher_temperature,
            warmup_teacher_temperature,
            teacher_patch_temperature,
            warmup_teacher_patch_temperature,
        )
        if min(temperatures) <= 0:
            raise ValueError(f"every temperature must be positive, got {temperatures}")
        if not (0.0 <= center_momentum <= 1.0 and 0.0 <= patch_center_momentum <= 1.0):
            raise ValueError(
                f"center_momentum and patch_center_momentum must lie in [0, 1], got {center_momentum} and "
                f"{patch_center_momentum}"
            )
        if cls_loss_weight < 0 or patch_loss_weight < 0 or cls_loss_weight + patch_loss_weight == 0:
            raise ValueError(
                f"cls_loss_weight and patch_loss_weight must be >= 0 and not both 0, got {cls_loss_weight} and "
                f"{patch_loss_weight}"
            )
        if not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"mask_probability must lie in [0, 1], got {mask_probability}")
        try:
            low, high = (float(r) for r in mask_ratio)
        except (TypeError, ValueError):
            raise ValueError(f"mask_ratio must be a pair (low, high), got {mask_ratio!r}") from None
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"mask_ratio must satisfy 0 <= low <= high < 1, got {mask_ratio!r}")
        if not 0.0 < mask_min_aspect <= 1.0:
            raise ValueError(f"mask_min_aspect must lie in (0, 1], got {mask_min_aspect}")
        super().__init__(
            backbone,
            out_dim=out_dim,
            head_hidden_dim=head_hidden_dim,
            head_bottleneck_dim=head_bottleneck_dim,
            head_layers=head_layers,
            head_batch_norm=head_batch_norm,
            norm_last_layer=norm_last_layer,
            student_temperature=student_temperature,
            teacher_temperature=teacher_temperature,
            warmup_teacher_temperature=warmup_teacher_temperature,
            warmup_teacher_temperature_epochs=warmup_teacher_temperature_epochs,
            center_momentum=center_momentum,
            ema_tau=ema_tau,
            ema_tau_final=ema_tau_final,
            global_crops=global_crops,
            freeze_last_layer_epochs=freeze_last_layer_epochs,
            clip_grad=clip_grad,
            optimizer=optimizer,
            base_lr=base_lr,
            weight_decay=weight_decay,
            weight_decay_final=weight_decay_final,
            warmup_epochs=warmup_epochs,
            drop_path=drop_path,
            evaluate=evaluate,
            **kwargs,
        )
        require_vit(self.backbone, type(self).__name__)
        self.teacher_patch_temperature_range = (warmup_teacher_patch_temperature, teacher_patch_temperature)
        self.patch_center_momentum = patch_center_momentum
        self.cls_loss_weight, self.patch_loss_weight = cls_loss_weight, patch_loss_weight
        self.mask_probability, self.mask_ratio, self.mask_min_aspect = mask_probability, (low, high), mask_min_aspect
        self.mask_sampler = MaskSampler()
        self.shared_head = shared_head
        # iBOT's masked_embed: zeros, a 1 x D parameter (weight-decayed as the code's get_params_groups does)
        self.mask_token = nn.Parameter(torch.zeros(1, vit_width(self.backbone)))
        self.patch_head: nn.Module | None = None
        self.patch_head_ema: nn.Module | None = None
        if not shared_head:
            self.patch_head = self.build_patch_head(
                patch_dim,
                head_hidden_dim,
                head_bottleneck_dim,
                head_layers,
                head_batch_norm,
                norm_last_layer,
            )
            self.patch_head_ema = ema_copy(self.patch_head)
        self.register_buffer("patch_center", torch.zeros(1, patch_dim))

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
        """The patch tokens' own part of the head when ``shared_head=False``: iBOT's ``last_layer2``, a
        weight-normalized bias-free ``bottleneck_dim -> out_dim`` layer after the class token's MLP and L2
        normalization (norm fixed to 1 when ``norm_last_layer``)."""
        layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        return layer

    def patch_last_layer(self) -> nn.Module | None:
        """The patch head's layer frozen in the first ``freeze_last_layer_epochs`` (none when shared: the
        shared head's ``last_layer`` is frozen anyway)."""
        return self.patch_head

    def patch_parts(self, teacher: bool) -> tuple[nn.Module, nn.Module]:
        """``(mlp, last_layer)`` of the student's (or the teacher's) patch head: logits are
        ``last_layer(normalize(mlp(x)))`` (shared: the class head's; else its MLP and ``patch_head``)."""
        head = self.head_ema if teacher else self.head
        if self.patch_head is None:
            return head.mlp, head.last_layer
        return head.mlp, self.patch_head_ema if teacher else self.patch_head

    def patch_network(self, teacher: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The map from ``M x D`` patch tokens to ``M x K`` logits of the student (or the teacher)."""
        mlp, last = self.patch_parts(teacher)
        return lambda x: last(F.normalize(mlp(x), dim=-1))

    def apply_head(self, head: Callable, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """``head`` on each of ``features``: once on all of them concatenated (``view_batching="concat"``,
        DINO's ``MultiCropWrapper``) or on each (``"per_view"``)."""
        if self._view_mode(features) == "per_view" or len(features) == 1:
            return [head(f) for f in features]
        return list(head(torch.cat(features)).split([f.shape[0] for f in features]))

    def masked_tokens(self, tokens: list[Tokens], index: torch.Tensor) -> torch.Tensor:
        """``M x D``: the patch tokens of the global crops (concatenated crop by crop) at the flat ``index``
        of the masked patches."""
        return torch.cat([t.patches for t in tokens]).flatten(0, 1).index_select(0, index)

    def mask_layout(self, cpu_masks: list[torch.Tensor], device: torch.device):
        """From the CPU masks of the global crops: the masks, the flat index of the masked patches and their
        loss weights (``masked_patch_weights``), all on ``device`` and computed on the CPU (no device sync)."""
        flat = torch.cat(cpu_masks)  # (crops x B) x N, crop by crop as the code's collate
        index = self.to_device(flat.flatten().nonzero().flatten(), device)
        weights = self.to_device(masked_patch_weights(flat), device)
        return [self.to_device(m, device) for m in cpu_masks], index, weights

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = super().ema_pairs()
        if self.patch_head is not None:
            pairs.append((self.patch_head, self.patch_head_ema))
        return pairs

    # ----------------------------------------------------------------- masks and tokens
    def sample_masks(self, views: list[torch.Tensor], batch_idx: int | None = None) -> list[torch.Tensor]:
        """One ``B x N`` bool mask per global view, on the CPU (``masking.block_masks``): each image's crop is
        masked with probability ``mask_probability``. With ``batch_idx`` (training), this process's rows of the
        global batch's masks from the method's ``MaskSampler`` (the same on 1 or N processes and on resume);
        without, from torch's global generator."""
        grids = [patch_grid(self.backbone, v.shape[-2], v.shape[-1]) for v in views]
        draw = lambda n, g: self.draw_masks(n, grids, g)  # noqa: E731
        if batch_idx is None:
            return draw(views[0].shape[0], None)
        return self.mask_sampler.sample(draw, views[0].shape[0], self.current_epoch, batch_idx)

    def draw_masks(
        self, batch: int, grids: list[tuple[int, int]], generator: torch.Generator | None
    ) -> list[torch.Tensor]:
        """The masks of ``batch`` images, one ``batch x N`` tensor per global view of grid ``grids[i]``."""
        ratio, p, aspect = self.mask_ratio, self.mask_probability, self.mask_min_aspect
        return [block_masks(batch, grid, ratio, p, aspect, generator=generator) for grid in grids]

    @staticmethod
    def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A CPU tensor (masks, indices) on ``device`` without a host stall: pinned first on CUDA, so the copy
        is asynchronous."""
        if device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)

    def encode_global(
        self, backbone: nn.Module, views: list[torch.Tensor], masks: list[torch.Tensor] | None = None
    ) -> list[Tokens]:
        """``vit.encode_tokens`` of each global view (masked patches replaced by ``mask_token`` when ``masks``
        is given): one forward over the views concatenated (``"concat"``) or one per view."""
        token = None if masks is None else self.mask_token
        same_shape = all(v.shape == views[0].shape for v in views)
        if self._view_mode(views) == "per_view" or len(views) == 1 or not same_shape:
            tokens = [
                encode_tokens(backbone, v, mask=None if masks is None else m, mask_token=token)
                for v, m in zip(views, masks if masks is not None else [None] * len(views))
            ]
        else:
            out = encode_tokens(
                backbone, torch.cat(views), mask=None if masks is None else torch.cat(masks), mask_token=token
            )
            sizes = [v.shape[0] for v in views]
            tokens = [Tokens(c, p) for c, p in zip(out.cls.split(sizes), out.patches.split(sizes))]
        if tokens[0].cls is None:
            raise ValueError(f"{type(self).__name__} needs a ViT with a class token; this backbone has none")
        return tokens

    def check_views(self, views: list[torch.Tensor]) -> None:
        if len(views) < max(2, self.global_crops):
            raise ValueError(
                f"{type(self).__name__} needs at least 2 and global_crops={self.global_crops} views, got {len(views)}"
            )

    def student_cls(self, global_tokens: list[Tokens], local_views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's class tokens of every crop: the masked global crops', then the local crops' (unmasked)."""
        local = self.forward_views(self.backbone, local_views) if local_views else []
        return [t.cls for t in global_tokens] + list(local)

    # ----------------------------------------------------------------- schedules
    def teacher_patch_temperature(self, epoch: int | None = None) -> float:
        """The teacher's patch temperature at ``epoch`` (default: the current one)."""
        epoch = self.current_epoch if epoch is None else epoch
        start, end = self.teacher_patch_temperature_range
        return teacher_temperature(epoch, start, end, self.warmup_teacher_temperature_epochs)

    # ----------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        views, _ = batch
        self.check_views(views)
        global_views, local_views = views[: self.global_crops], views[self.global_crops :]
        masks, index, weights = self.mask_layout(self.sample_masks(global_views, batch_idx), global_views[0].device)
        student = self.encode_global(self.backbone, global_views, masks)
        student_cls = self.apply_head(self.head, self.student_cls(student, local_views))
        # the loss reads the student's patch logits at the masked patches only: the head runs on those
        student_patches = self.patch_network(teacher=False)(self.masked_tokens(student, index))
        with torch.no_grad():
            teacher = self.encode_global(self.backbone_ema, global_views)
            teacher_cls = self.apply_head(self.head_ema, [t.cls for t in teacher])
            mlp, last = self.patch_parts(teacher=True)
            bottleneck = F.normalize(mlp(torch.cat([t.patches for t in teacher]).flatten(0, 1)), dim=-1)
            teacher_patches = at_least_float32(last(bottleneck.index_select(0, index)))
            with torch.autocast(device_type=bottleneck.device.type, enabled=False):
                # iBOT's center2 averages the logits of every teacher patch: the last layer is linear and
                # bias-free, so that is the last layer of the average bottleneck
                patch_mean = last(bottleneck.to(last.weight.dtype).mean(dim=0, keepdim=True))
        # float32 from here (bf16-mixed): dino_loss and dino_center cast tensor arguments, not lists of them
        student_cls, teacher_cls = at_least_float32(student_cls), at_least_float32(teacher_cls)
        temperature, patch_temperature = self.teacher_temperature(), self.teacher_patch_temperature()
        cls_loss = dino_loss(student_cls, teacher_cls, self.center, self.student_temperature, temperature)
        patch_targets = F.softmax((teacher_patches - self.patch_center) / patch_temperature, dim=-1)
        patch_loss = masked_patch_loss(
            student_patches, patch_targets, torch.cat(masks), self.student_temperature, weights=weights
        )
        loss = self.cls_loss_weight * cls_loss + self.patch_loss_weight * patch_loss
        self.center.copy_(dino_center(self.center, teacher_cls, self.center_momentum))
        # the mean over every patch of this process's global crops; equal counts per process, so the
        # all-reduced average of the processes' means is the global batch's (the code's update_center)
        self.patch_center.copy_(dino_center(self.patch_center, [patch_mean], self.patch_center_momentum))
        self.log("train/loss", loss)
        self.log("train/cls_loss", cls_loss)
        self.log("train/patch_loss", patch_loss)
        self.log("train/teacher_temperature", temperature)
        self.log("train/teacher_patch_temperature", patch_temperature)
        return loss

    def on_after_backward(self) -> None:
        """DINO's freeze of the head's last layer, and of the patch head's own last layer (the code's
        ``cancel_gradients_last_layer`` clears every parameter named ``last_layer*``)."""
        super().on_after_backward()
        last = self.patch_last_layer()
        if last is not None and self.current_epoch < self.freeze_last_layer_epochs:
            for p in last.parameters():
                p.grad = None
