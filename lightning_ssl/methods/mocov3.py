"""MoCo v3 (Chen, Xie and He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ssl.backbones import vit_depth
from lightning_ssl.callbacks import EMAUpdate
from lightning_ssl.distributed import gather_no_grad, rank
from lightning_ssl.ema import ema_copy
from lightning_ssl.heads import mlp
from lightning_ssl.losses import at_least_float32
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.optim import split_weight_decay
from lightning_ssl.vit import freeze_patch_projection as freeze_random_projection
from lightning_ssl.vit import is_vit, use_sincos_positions

__all__ = ["MoCoV3", "mocov3_contrastive_loss", "mocov3_loss", "VIT_DEFAULTS", "RESNET_DEFAULTS", "OPTIMIZER_DEFAULTS"]

# The defaults that depend on the backbone kind (``None`` arguments of ``MoCoV3``): the ViT recipe of the
# paper (sec. 4 and appendix; the code's CONFIG.md: ``--optimizer=adamw --lr=1.5e-4 --weight-decay=.1
# --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2``, ``MoCo_ViT``'s heads, ``vits.py``'s fixed
# sin-cos positions) and the ResNet recipe (``main_moco.py``'s argparse defaults ``--optimizer lars
# --warmup-epochs 10 --moco-t 1.0``, ``MoCo_ResNet``'s heads).
VIT_DEFAULTS = {
    "optimizer": "adamw",
    "warmup_epochs": 40.0,
    "temperature": 0.2,
    "projection_layers": 3,
    "predictor_last_batch_norm": True,
    "freeze_patch_projection": True,
    "sincos_positions": True,
}
RESNET_DEFAULTS = {
    "optimizer": "lars",
    "warmup_epochs": 10.0,
    "temperature": 1.0,
    "projection_layers": 2,
    "predictor_last_batch_norm": False,
    "freeze_patch_projection": False,
    "sincos_positions": False,
}
# (base_lr, weight_decay) by optimizer: AdamW's are the ViT recipe's (1.5e-4 x B/256, 0.1), LARS's the
# code's argparse defaults (``--lr 0.6 --wd 1e-6``, its ResNet-50 100-epoch recipe; 300 epochs use 0.3).
# The paper has no SGD recipe: with optimizer="sgd" give base_lr (or lr) and weight_decay.
OPTIMIZER_DEFAULTS = {"adamw": (1.5e-4, 0.1), "lars": (0.6, 1e-6)}


def mocov3_contrastive_loss(
    q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, gather: bool = True
) -> torch.Tensor:
    """``ctr(q, k)`` of MoCo v3 (Chen et al. 2021, sec. 3, alg. 1; the code's ``contrastive_loss``): ``q``
    and ``k`` (``N x D``) L2-normalized, the keys of every process gathered without gradient (``gather``;
    the code's ``concat_all_gather``), the cross entropy of ``q @ k_all.T / temperature`` with query ``i``'s
    positive at its global index ``i + rank * N``, times ``2 * temperature`` (the code's scaling, which makes
    the gradient scale independent of the temperature). The mean over this process's queries; computed in
    float32 with autocast off (16-bit inputs are cast). ``k`` gets no gradient."""
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be N x D, got {tuple(q.shape)} and {tuple(k.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    q, k = at_least_float32([q, k.detach()])
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
        offset = 0
        if gather:
            k = gather_no_grad(k)
            offset = rank() * q.shape[0]
        logits = q @ k.T / temperature  # N x N_global
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels) * (2 * temperature)


def mocov3_loss(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    temperature: float = 0.2,
    gather: bool = True,
) -> torch.Tensor:
    """MoCo v3's symmetrized loss (alg. 1): ``ctr(q1, k2) + ctr(q2, k1)``, with ``q`` the predictor outputs
    of the query encoder and ``k`` the momentum encoder's projections of views 1 and 2
    (``mocov3_contrastive_loss``)."""
    return mocov3_contrastive_loss(q1, k2, temperature, gather) + mocov3_contrastive_loss(q2, k1, temperature, gather)


class MoCoV3(SSLMethod):
    """MoCo v3: a query encoder (backbone, projector, predictor) is trained to pick, with InfoNCE, the
    momentum encoder's key of the other view of its image among the keys of the whole global batch; no queue.

    Architecture (sec. 3 and the code's ``moco/builder.py``): query encoder = backbone + projector; key
    (momentum) encoder = an EMA copy of both (``ema_pairs`` + ``EMAUpdate``); the predictor is on the query
    side only. Every linear layer of the heads is bias-free; hidden layers have BN and ReLU and the last
    layer a BN without affine parameters (``_build_mlp``). Projector: 3 layers ``[D, 4096, 4096, 256]`` for
    ViTs (``MoCo_ViT``), 2 layers ``[D, 4096, 256]`` otherwise (``MoCo_ResNet``); predictor ``[256, 4096,
    256]``, with the last BN for ViTs and without it for ResNets (the code's ``last_bn=False``). Loss:
    ``mocov3_loss`` (symmetric, times ``2T``). Momentum m from 0.99 to 1 on a half cosine over all
    optimizer steps (``--moco-m 0.99 --moco-m-cos``: ``m = 1 - (1 + cos(pi k / K)) / 2 * (1 - 0.99)``),
    applied after each step (the code applies it before the next forward: the same sequence).

    Defaults that depend on the backbone kind (``None`` = "the paper's default for the backbone kind", fixed
    at construction; ``VIT_DEFAULTS`` / ``RESNET_DEFAULTS``):

    ============================  =========================  ==========================
    argument                      ViT (paper's ViT recipe)   other (code's ResNet)
    ============================  =========================  ==========================
    optimizer                     adamw                      lars
    warmup_epochs                 40                         10
    temperature                   0.2                        1.0
    projection_layers             3                          2
    predictor_last_batch_norm     True                       False
    freeze_patch_projection       True                       (ViT only)
    sincos_positions              True                       (ViT only)
    ============================  =========================  ==========================

    ``base_lr`` and ``weight_decay`` default by the optimizer (``OPTIMIZER_DEFAULTS``): AdamW 1.5e-4 x B/256
    and 0.1 (the ViT recipe), LARS 0.6 x B/256 and 1e-6 (``main_moco.py``'s defaults, its ResNet-50 100-epoch
    recipe; its 300-epoch recipe uses 0.3). Schedule: linear warmup then cosine to 0. The paper trains 300
    epochs (the Trainer's ``max_epochs``) at batch 4096.

    ViT stability (sec. 5.3, "random patch projection"): the patch projection keeps its random init and is
    never trained (``freeze_patch_projection``, the code's ``--stop-grad-conv1``), and the position
    embeddings are fixed 2-D sin-cos (``sincos_positions``; ``vits.py``'s
    ``build_2d_sincos_position_embedding``; this uses MAE's table, ``vit.sincos_2d``, whose two halves are
    the code's in the other order: a fixed permutation of channels, the same for a randomly initialized
    network). Both are applied before the momentum copy is made, so both encoders have them.

    Optimization follows the code: AdamW decays every trained parameter (``torch.optim.AdamW(
    model.parameters(), ...)``, biases and norms included; the frozen ones get no gradient, hence no
    update); LARS (``moco/optimizer.py``) gives 1-d parameters neither weight decay nor adaptation. With
    ``layer_decay < 1`` on a ViT the base class' groups are used instead (layer-wise lr, no decay on
    biases, norms and tokens). Views go through the networks one at a time by default
    (``view_batching="per_view"``), as the code's forward does, so the heads' BN statistics are per view.
    The representation (kNN, linear probe, export) is the query backbone: the code's ``main_lincls.py``
    loads ``base_encoder``. Use ``Trainer(sync_batchnorm=True)`` with several processes, as the code does
    (``convert_sync_batchnorm``).

    Args (the shared ones are ``SSLMethod``'s):
        projection_hidden_dim, projection_dim: hidden and output widths of the projector and the predictor
            (the code's ``--moco-mlp-dim 4096``, ``--moco-dim 256``).
        projection_layers: linear layers of the projector (``None``: 3 for ViTs, 2 otherwise).
        predictor_last_batch_norm: the predictor ends with a BN without affine parameters (``None``: for ViTs).
        temperature: T of the contrastive loss (``None``: 0.2 for ViTs, 1.0 otherwise).
        ema_tau, ema_tau_final: the momentum m at the first and the last step (cosine between; equal values
            give a constant momentum).
        freeze_patch_projection: never train the ViT's patch projection (``None``: for ViTs).
        sincos_positions: fixed 2-D sin-cos position embeddings in place of learned ones (``None``: for ViTs).
        optimizer, base_lr, weight_decay, warmup_epochs: as ``SSLMethod``'s, ``None`` for the defaults above.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_b_16",
        projection_hidden_dim: int = 4096,
        projection_dim: int = 256,
        projection_layers: int | None = None,
        predictor_last_batch_norm: bool | None = None,
        temperature: float | None = None,
        ema_tau: float = 0.99,
        ema_tau_final: float = 1.0,
        freeze_patch_projection: bool | None = None,
        sincos_positions: bool | None = None,
        optimizer: str | None = None,
        base_lr: float | None = None,
        weight_decay: float | None = None,
        warmup_epochs: float | None = None,
        final_lr: float = 0.0,
        view_batching: str = "per_view",
        **kwargs,
    ):
        # The backbone kind is known once the base class has built it: the base gets placeholders for the
        # arguments left to the defaults (its checks apply to what the user gave), resolved just after.
        given = {"optimizer": optimizer, "base_lr": base_lr, "weight_decay": weight_decay}
        placeholder = {"optimizer": "adamw", "base_lr": 1.0, "weight_decay": 0.0}
        super().__init__(
            backbone,
            **{key: placeholder[key] if value is None else value for key, value in given.items()},
            warmup_epochs=0.0 if warmup_epochs is None else warmup_epochs,
            final_lr=0.0,
            view_batching=view_batching,
            **kwargs,
        )
        self.vit_backbone = is_vit(self.backbone)
        defaults = VIT_DEFAULTS if self.vit_backbone else RESNET_DEFAULTS
        pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
        optimizer = pick(optimizer, "optimizer")
        lr = self.optim_config["lr"]
        if optimizer not in OPTIMIZER_DEFAULTS and (weight_decay is None or (base_lr is None and lr is None)):
            raise ValueError(
                f"MoCo v3 has no {optimizer} recipe: with optimizer={optimizer!r} give weight_decay and base_lr "
                f"(or lr); the defaults exist for {' and '.join(OPTIMIZER_DEFAULTS)}"
            )
        default_lr, default_wd = OPTIMIZER_DEFAULTS.get(optimizer, (lr, weight_decay))
        base_lr = default_lr if base_lr is None else base_lr
        weight_decay = default_wd if weight_decay is None else weight_decay
        peak = lr if lr is not None else base_lr
        if not 0 <= final_lr <= peak:
            name = "lr" if lr is not None else "base_lr"
            raise ValueError(f"final_lr must lie in [0, {name}={peak}], got {final_lr}")
        self.optim_config.update(
            optimizer=optimizer,
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=float(pick(warmup_epochs, "warmup_epochs")),
            final_lr=final_lr,
        )

        self.temperature = float(pick(temperature, "temperature"))
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= ema_tau <= ema_tau_final <= 1.0:
            raise ValueError(f"need 0 <= ema_tau <= ema_tau_final <= 1, got {ema_tau} and {ema_tau_final}")
        self.ema_tau, self.ema_tau_final = ema_tau, ema_tau_final
        self.projection_layers = int(pick(projection_layers, "projection_layers"))
        if self.projection_layers < 1 or projection_hidden_dim < 1 or projection_dim < 1:
            raise ValueError(
                "need projection_layers >= 1, projection_hidden_dim >= 1 and projection_dim >= 1, got "
                f"{self.projection_layers}, {projection_hidden_dim} and {projection_dim}"
            )
        self.freeze_patch_projection = bool(pick(freeze_patch_projection, "freeze_patch_projection"))
        self.sincos_positions = bool(pick(sincos_positions, "sincos_positions"))
        for name, on in (
            ("freeze_patch_projection", self.freeze_patch_projection),
            ("sincos_positions", self.sincos_positions),
        ):
            if on and not self.vit_backbone:
                raise ValueError(
                    f"{name}=True needs a ViT backbone (e.g. 'vit_s_16', 'vit_b_16' or a "
                    f"torchvision.models.VisionTransformer), got {type(self.backbone).__name__}"
                )
        self.prepare_backbone(self.backbone)  # before the momentum copy: the key encoder gets the same

        hidden = [projection_hidden_dim] * (self.projection_layers - 1)
        self.projector = mlp([self.feature_dim, *hidden, projection_dim], last_batch_norm=True, last_bias=False)
        self.predictor = mlp(
            [projection_dim, projection_hidden_dim, projection_dim],
            last_batch_norm=bool(pick(predictor_last_batch_norm, "predictor_last_batch_norm")),
            last_bias=False,
        )
        self.backbone_ema = ema_copy(self.backbone)
        self.projector_ema = ema_copy(self.projector)

    # contracts with the callbacks -------------------------------------------------------
    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_ema), (self.projector, self.projector_ema)]

    def configure_callbacks(self):
        return [*super().configure_callbacks(), EMAUpdate(tau=self.ema_tau, tau_final=self.ema_tau_final)]

    # ------------------------------------------------------------------ optimization
    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The code's: AdamW (and SGD) decay every trained parameter in one group; LARS leaves 1-d parameters
        (biases, norms) without decay or adaptation. ``layer_decay < 1`` on a ViT: ``SSLMethod``'s groups."""
        if self.layer_decay < 1.0 and vit_depth(self.backbone) is not None:
            return super().parameter_groups(weight_decay)
        if self.optim_config["optimizer"] == "lars":
            return split_weight_decay([self], weight_decay)
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay, "lars_exclude": False}]

    # ------------------------------------------------------------------ evaluation
    def prepare_backbone(self, module: nn.Module) -> nn.Module:
        """The ViT recipe's frozen random patch projection and fixed sin-cos positions (when on), in place."""
        if self.freeze_patch_projection:
            freeze_random_projection(module)
        if self.sincos_positions:
            use_sincos_positions(module)
        return module

    # ------------------------------------------------------------------ training
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The query encoder's output: predictor(projector(backbone(images)))."""
        return self.predictor(self.projector(self.backbone(images)))

    @torch.no_grad()
    def key(self, images: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's output: projector_ema(backbone_ema(images)), without gradient."""
        return self.projector_ema(self.backbone_ema(images))

    def training_step(self, batch, batch_idx):
        views, _ = batch
        if len(views) != 2:
            raise ValueError(
                f"MoCo v3 takes two views per image, got {len(views)}: use a two-view augmentation "
                "(e.g. 'byol') without local crops"
            )
        q1, q2 = self.forward_views(self.query, list(views))
        k1, k2 = self.forward_views(self.key, list(views))
        loss = mocov3_loss(q1, q2, k1, k2, self.temperature)
        self.log("train/loss", loss)  # no prog_bar: Lightning would .item() it (a host sync) every step
        return loss
