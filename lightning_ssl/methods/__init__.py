"""One file per method; each is a LightningModule with its own ``training_step``.

``REGISTRY`` lists every method by its short name. Adding a method (docs/adding_a_method.md): its
file in this folder, its import and one ``REGISTRY`` line here, and its configs.
"""

from lightning_ssl.methods.barlow_twins import BarlowTwins
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.methods.byol import BYOL
from lightning_ssl.methods.cpc import CPC, CPCv2
from lightning_ssl.methods.cpc_audio import CPCAudio
from lightning_ssl.methods.dino import DINO
from lightning_ssl.methods.dinov2 import DINOv2
from lightning_ssl.methods.ibot import IBOT
from lightning_ssl.methods.ijepa import IJEPA
from lightning_ssl.methods.mae import MAE
from lightning_ssl.methods.moco import MoCo, MoCoV2
from lightning_ssl.methods.mocov3 import MoCoV3
from lightning_ssl.methods.nnclr import NNCLR
from lightning_ssl.methods.registry import VIT_BACKBONE, MethodEntry
from lightning_ssl.methods.simclr import SimCLR
from lightning_ssl.methods.simsiam import SimSiam
from lightning_ssl.methods.swav import SwAV
from lightning_ssl.methods.vicreg import VICReg

_HEAD = {"projection_dim": 16}
_CPC_SMALL = {"patch_size": 4, "patch_stride": 2, "embedding_dim": 16, "context_hidden_dim": 16, "context_blocks": 2}
_CPC_CIFAR = {"patch_size": 8, "patch_stride": 4, "grid_size": 7}
_VIT = {"vit_only": True, "named_backbone": VIT_BACKBONE}
_DINO_SMALL = {"out_dim": 16, "head_hidden_dim": 32, "head_bottleneck_dim": 8}
_AUDIO = {"modality": "audio", "configs": ("librispeech", "synthetic"), "named_backbone": {"backbone": "cpc"}}

REGISTRY: dict[str, MethodEntry] = {
    "simclr": MethodEntry(SimCLR, small={**_HEAD, "projection_hidden_dim": 32}),
    "moco": MethodEntry(MoCo, small={**_HEAD, "queue_size": 64, "split_bn_groups": 2}),
    "mocov2": MethodEntry(MoCoV2, small={**_HEAD, "projection_hidden_dim": 32, "queue_size": 64, "split_bn_groups": 2}),
    "byol": MethodEntry(BYOL, small={**_HEAD, "projection_hidden_dim": 32}),
    "cpc": MethodEntry(CPC, small=_CPC_SMALL, cifar=_CPC_CIFAR),
    "cpcv2": MethodEntry(CPCv2, small=_CPC_SMALL, cifar=_CPC_CIFAR),
    "cpc_audio": MethodEntry(CPCAudio, small={"encoder_dim": 32, "context_dim": 16, "prediction_steps": 3}, **_AUDIO),
    "simsiam": MethodEntry(SimSiam, small={**_HEAD, "projection_hidden_dim": 32, "prediction_hidden_dim": 8}),
    "barlow_twins": MethodEntry(BarlowTwins, small={**_HEAD, "projection_hidden_dim": 32}),
    "vicreg": MethodEntry(VICReg, small={"expander_dim": 16, "expander_hidden_dim": 32}),
    "nnclr": MethodEntry(
        NNCLR, small={**_HEAD, "projection_hidden_dim": 32, "prediction_hidden_dim": 32, "queue_size": 64}
    ),
    "swav": MethodEntry(
        SwAV, small={**_HEAD, "projection_hidden_dim": 32, "num_prototypes": 12, "freeze_prototypes_steps": 1}
    ),
    "dino": MethodEntry(DINO, small=_DINO_SMALL),
    "ibot": MethodEntry(IBOT, small=_DINO_SMALL, **_VIT),
    "dinov2": MethodEntry(DINOv2, small=_DINO_SMALL, **_VIT),
    "mocov3": MethodEntry(MoCoV3, small={"projection_hidden_dim": 32, "projection_dim": 8}),
    "mae": MethodEntry(
        MAE,
        small={"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
        cifar={"decoder_dim": 128, "decoder_depth": 8, "decoder_heads": 4},
        **_VIT,
    ),
    "ijepa": MethodEntry(
        IJEPA,
        small={"predictor_dim": 24, "predictor_depth": 1, "target_scale": (0.1, 0.15), "min_keep": 4},
        cifar={"predictor_dim": 96, "predictor_depth": 6, "min_keep": 4},
        **_VIT,
    ),
}

__all__ = ["SSLMethod", "MethodEntry", "REGISTRY", *(entry.cls.__name__ for entry in REGISTRY.values())]
