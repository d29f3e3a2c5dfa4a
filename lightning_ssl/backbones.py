"""Encoders: a torchvision model by name, or any ``nn.Module``, turned into a feature extractor.

``build_backbone`` returns ``(module, feature_dim)``; the module maps ``B x 3 x H x W`` images to
``B x feature_dim`` vectors. A classifier head (``fc``, ``classifier``, ``head(s)``) is replaced by
``nn.Identity``; convolutional outputs are average-pooled. ``small_image=True`` gives ResNets the
CIFAR stem used by SimCLR (Chen et al. 2020, appendix B.9): a 3x3 stride-1 first convolution and
no max-pool, for 32x32 inputs.

Vision Transformers (Dosovitskiy et al. 2021): torchvision's by name (``vit_b_16``, ``vit_l_16``, ...)
or as a ``torchvision.models.VisionTransformer`` module of any size (``ViTBackbone``: the class token
after the last layer norm, position embeddings interpolated bicubically for other input sizes, so
multi-crop's local views work), and timm's models (optional extra ``timm``) as ``"timm:<name>"``
(ViTs built with ``dynamic_img_size=True``). ``token_features`` gives the class and patch tokens for
methods that need them; ``vit_parameter_groups`` the optimizer groups with layer-wise lr decay and no
weight decay on biases, norms, position embeddings and the class token.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import math
import re
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

__all__ = [
    "zero_init_residual",
    "set_drop_path",
    "build_backbone",
    "PooledBackbone",
    "reset_parameters",
    "strip_classifier",
    "small_image_stem",
    "infer_feature_dim",
    "CLASSIFIER_ATTRS",
    "batch_norm_to_layer_norm",
    "ViTBackbone",
    "token_features",
    "vit_parameter_groups",
    "vit_depth",
    "TIMM_PREFIX",
    "interpolate_positions",
    "vision_transformer",
    "VIT_SIZES",
]

TIMM_PREFIX = "timm:"

CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


class PooledBackbone(nn.Module):
    """Wraps a module so that its output is always ``B x D``: 4-d maps are average-pooled."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        elif out.ndim != 2:
            out = out.flatten(1)
        return out


def interpolate_positions(pos: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Position embeddings ``1 x (prefix + N) x D`` of a square grid resized (bicubic, as MAE's and DINO's
    ``interpolate_pos_embed``) to ``grid``; the ``prefix`` (class-token) positions are kept as they are."""
    n = pos.shape[1] - prefix
    side = int(math.isqrt(n))
    if (side, side) == tuple(grid):
        return pos
    patches = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
    patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([pos[:, :prefix], patches], dim=1)


class ViTBackbone(PooledBackbone):
    """A torchvision ``VisionTransformer`` as an encoder: ``B x D`` class-token features (after the final
    layer norm, as torchvision's classifier sees them), for any input size divisible by the patch size
    (position embeddings interpolated). ``tokens(x)`` returns all ``B x (1 + N) x D`` tokens. The state_dict
    keys are torchvision's under ``module.``, as for other backbones."""

    def __init__(self, module: torchvision.models.VisionTransformer):
        super().__init__(module)
        self.module.heads = nn.Identity()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.module
        n = x.shape[0]
        x = vit.conv_proj(x)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([vit.class_token.expand(n, -1, -1), x], dim=1)
        x = x + interpolate_positions(vit.encoder.pos_embedding, tuple(grid))
        return vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]


def _timm_model(name: str) -> nn.Module:
    if importlib.util.find_spec("timm") is None:
        raise ImportError(f"backbone {TIMM_PREFIX}{name} needs timm: pip install 'lightning-ssl[timm]'")
    import timm

    try:  # ViTs: any input size (multi-crop's local views)
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=0)


def token_features(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cls, patches)``: ``B x D`` and ``B x N x D`` token features of ``images`` from a backbone made by
    ``build_backbone``: a ViT's class token and patch tokens (torchvision, or timm's ``forward_features``
    without its prefix tokens), or a convolutional network's pooled features and its last feature map
    as ``H x W`` tokens."""
    inner = backbone.module if isinstance(backbone, PooledBackbone) else backbone
    if isinstance(backbone, ViTBackbone):
        tokens = backbone.tokens(images)
        return tokens[:, 0], tokens[:, 1:]
    if hasattr(inner, "forward_features") and hasattr(inner, "num_prefix_tokens"):  # a timm ViT
        tokens = inner.forward_features(images)
        prefix = int(inner.num_prefix_tokens)
        return tokens[:, 0], tokens[:, prefix:]
    pool = getattr(inner, "avgpool", None)  # torchvision's CNNs: the map that enters the average pool
    maps: list[torch.Tensor] = []
    hook = pool.register_forward_hook(lambda m, i, o: maps.append(i[0])) if isinstance(pool, nn.Module) else None
    try:
        out = inner(images)
    finally:
        if hook is not None:
            hook.remove()
    if maps:
        out = maps[0]
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim != 4:
        raise ValueError(
            f"token_features needs a ViT or a network returning feature maps; got shape {tuple(out.shape)}"
        )
    return out.mean(dim=(2, 3)), out.flatten(2).transpose(1, 2)


_NO_DECAY_NAMES = ("pos_embedding", "pos_embed", "class_token", "cls_token", "dist_token", "reg_token")


def vit_depth(backbone: nn.Module) -> int | None:
    """The number of transformer blocks of a torchvision or timm ViT backbone (``None`` for other networks)."""
    inner = backbone.module if isinstance(backbone, PooledBackbone) else backbone
    if isinstance(inner, torchvision.models.VisionTransformer):
        return len(inner.encoder.layers)
    blocks = getattr(inner, "blocks", None)
    if hasattr(inner, "num_prefix_tokens") and isinstance(blocks, nn.Sequential):
        return len(blocks)
    return None


def _vit_layer(name: str, depth: int) -> int:
    """Layer id of a backbone parameter: 0 embeddings, ``i + 1`` block ``i``, ``depth + 1`` the rest."""
    match = re.search(r"(?:encoder\.layers\.encoder_layer_|blocks\.)(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if any(key in name for key in ("conv_proj", "patch_embed", *_NO_DECAY_NAMES)):
        return 0
    return depth + 1


class _DropPathEncoderBlock(torchvision.models.vision_transformer.EncoderBlock):
    """torchvision's ``EncoderBlock`` with stochastic depth on both residual branches (same parameters)."""

    drop_path: StochasticDepth

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = input + self.drop_path(self.dropout(x))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


def set_drop_path(backbone: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth (Huang et al. 2016) on the blocks of a torchvision or timm ViT ``backbone``, in place:
    block ``i`` of ``depth`` drops its residual branches per sample with probability ``rate * i / (depth - 1)``
    (DINO's and timm's linear rule). Parameter names do not change; other networks are returned as they are."""
    depth = vit_depth(backbone)
    if depth is None:
        return backbone
    inner = backbone.module if isinstance(backbone, PooledBackbone) else backbone
    rates = torch.linspace(0, rate, depth).tolist()
    if isinstance(inner, torchvision.models.VisionTransformer):
        for block, p in zip(inner.encoder.layers, rates):
            block.__class__ = _DropPathEncoderBlock
            block.drop_path = StochasticDepth(p, "row")
    else:
        for block, p in zip(inner.blocks, rates):
            for name in ("drop_path1", "drop_path2"):
                if hasattr(block, name):
                    setattr(block, name, StochasticDepth(p, "row") if p > 0 else nn.Identity())
    return backbone


def vit_parameter_groups(
    model: nn.Module, backbone: nn.Module, weight_decay: float, layer_decay: float = 1.0, decay_tokens: bool = False
) -> list[dict]:
    """Optimizer groups for a method with a ViT ``backbone`` (a submodule of ``model``): layer-wise lr decay
    (BEiT, Bao et al. 2022; MAE, He et al. 2022): a backbone parameter of layer ``l`` (0 the patch and
    position embeddings, ``i + 1`` block ``i``, ``depth + 1`` the final norm) gets ``lr_scale =
    layer_decay ** (depth + 1 - l)``, the method's heads 1; no weight decay (nor LARS adaptation) for
    biases, norm parameters, position embeddings and class/register tokens (``decay_tokens=True``: weight decay on
    the embeddings and tokens too, as DINO's ``get_params_groups`` exempts only biases and 1-d parameters).
    ``layer_decay=1``: no decay."""
    depth = vit_depth(backbone)
    if depth is None:
        raise ValueError("vit_parameter_groups needs a torchvision or timm ViT backbone")
    in_backbone = {id(p): name for name, p in backbone.named_parameters()}
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bb_name = in_backbone.get(id(p))
        layer = _vit_layer(bb_name, depth) if bb_name is not None else depth + 1
        no_decay = p.ndim <= 1 or (not decay_tokens and any(name.endswith(k) for k in _NO_DECAY_NAMES))
        scale = layer_decay ** (depth + 1 - layer)
        key = (scale, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lars_exclude": no_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def strip_classifier(model: nn.Module) -> int | None:
    """Replace the classifier (``fc``, ``classifier``, ``heads``, ``head``) by ``nn.Identity``; return
    the width of the features that entered it (the pooled features, as in the papers' evaluations)."""
    for attr in CLASSIFIER_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            linears = [m for m in head if isinstance(m, nn.Linear)]
            if linears:
                setattr(model, attr, nn.Identity())
                return linears[0].in_features
    return None


def small_image_stem(model: nn.Module) -> None:
    """Give a ResNet the CIFAR stem in place: a 3x3 stride-1 ``conv1`` and no max-pool."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"small_image=True replaces a ResNet-style stem (attributes `conv1` and `maxpool`), but "
            f"{type(model).__name__} has none. Use a ResNet, or pass small_image=False and an "
            "encoder designed for small inputs."
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


@torch.no_grad()
def infer_feature_dim(module: nn.Module, image_size: int = 224) -> int:
    """Width of ``module``'s output for a ``2 x 3 x image_size x image_size`` input (eval mode, no gradient);
    raises if the output is not ``B x D``."""
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = module(torch.zeros(2, 3, image_size, image_size, device=device))
    finally:
        module.train(was_training)
    if out.ndim != 2:
        raise ValueError(
            f"the encoder must return B x D features, got shape {tuple(out.shape)}; wrap it in PooledBackbone"
        )
    return int(out.shape[1])


def zero_init_residual(model: nn.Module) -> nn.Module:
    """The last batch norm of every torchvision ResNet residual block starts at weight 0, so each block starts
    as the identity (Goyal et al. 2017; torchvision's ``zero_init_residual=True``), in place."""
    for m in model.modules():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return model


# (layers, heads, width, MLP width) of the ViT sizes (Dosovitskiy et al. 2021, table 1; Ti and S from DeiT,
# Touvron et al. 2021): torchvision builds B, L and H by name; Ti and S are built here as torchvision ViTs
VIT_SIZES = {
    "ti": (12, 3, 192, 768),
    "s": (12, 6, 384, 1536),
    "b": (12, 12, 768, 3072),
    "l": (24, 16, 1024, 4096),
    "h": (32, 16, 1280, 5120),
}
_VIT_NAME = re.compile(r"vit_(ti|s|b|l|h)_(\d+)")
SMALL_IMAGE_VIT_PATCH = 4  # small_image=True: 4x4 patches on 32x32 images, an 8x8 grid


def vision_transformer(
    name: str, small_image: bool = False, num_classes: int = 1000
) -> torchvision.models.VisionTransformer | None:
    """A randomly initialized torchvision ``VisionTransformer`` for ``vit_<size>_<patch>`` (sizes ``ti``, ``s``,
    ``b``, ``l``, ``h`` of ``VIT_SIZES``; e.g. ``vit_s_16`` is ViT-S/16, ``vit_b_16`` torchvision's ViT-B/16)
    for 224x224 inputs, or with ``small_image=True`` the same widths with 4x4 patches for 32x32 inputs
    (the ViT counterpart of the ResNets' CIFAR stem). ``None`` for other names."""
    match = _VIT_NAME.fullmatch(name)
    if match is None:
        return None
    size, patch = match.group(1), int(match.group(2))
    layers, heads, width, mlp = VIT_SIZES[size]
    if not small_image and name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    image_size, patch = (32, SMALL_IMAGE_VIT_PATCH) if small_image else (224, patch)
    return torchvision.models.VisionTransformer(image_size, patch, layers, heads, width, mlp, num_classes=num_classes)


def build_backbone(
    backbone: str | nn.Module,
    small_image: bool = False,
    feature_dim: int | None = None,
    weights_path: str | Path | None = None,
    zero_init_residual_bn: bool = False,
) -> tuple[nn.Module, int]:
    """Build an encoder and return ``(module, feature_dim)``.

    Args:
        backbone: a torchvision classification model name (``"resnet18"``, ``"resnet50"``,
            ``"efficientnet_b0"``, ``"vit_b_16"``, ...) built with random weights, the ViT sizes of
            ``vision_transformer`` (``"vit_ti_16"``, ``"vit_s_16"``), a timm model as
            ``"timm:<name>"`` (e.g. ``"timm:vit_small_patch16_224"``; the ``timm`` extra), or any
            ``nn.Module`` (a ``torchvision.models.VisionTransformer`` of any size becomes a ``ViTBackbone``).
        small_image: CIFAR stem for ResNets (3x3 stride-1 conv1, no max-pool) for 32x32 inputs; a ViT named
            ``vit_<size>_<patch>`` gets 4x4 patches for 32x32 inputs instead (``vision_transformer``).
        feature_dim: the output dimension, when it cannot be inferred from a dummy forward.
        weights_path: a local file with a torchvision state_dict (e.g. supervised ImageNet weights)
            loaded with ``strict=True`` before the classifier is removed. Nothing is downloaded.
        zero_init_residual_bn: a ResNet named by ``backbone`` starts with each residual block's last batch-norm
            weight at 0 (``zero_init_residual``; not applied to loaded weights or to a module passed in).
    """
    if isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX):
        if weights_path is not None:
            raise ValueError("weights_path is for torchvision models; timm models are built with random weights")
        model = _timm_model(backbone[len(TIMM_PREFIX) :])
        inferred = int(model.num_features) if hasattr(model, "num_features") else None
    elif isinstance(backbone, str) and vision_transformer(backbone) is not None:
        if weights_path is not None and small_image:
            raise ValueError("weights_path and small_image=True do not go together for a ViT: its patch size changes")
        model = vision_transformer(backbone, small_image=small_image)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            model.load_state_dict(state, strict=True)
        small_image = False  # the patch size did it
        inferred = model.hidden_dim
    elif isinstance(backbone, str):
        available = torchvision.models.list_models(module=torchvision.models)
        if backbone not in available:
            close = difflib.get_close_matches(backbone, available, n=3, cutoff=0.6)
            hint = f"Did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(
                f"Unknown backbone {backbone!r}. {hint}Use a torchvision classification model name "
                "(e.g. resnet18, resnet50; all: torchvision.models.list_models()) or pass an nn.Module."
            )
        model = torchvision.models.get_model(backbone, weights=None)
        if zero_init_residual_bn and weights_path is None:
            zero_init_residual(model)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            model.load_state_dict(state, strict=True)
        inferred = strip_classifier(model)
    elif isinstance(backbone, nn.Module):
        if weights_path is not None:
            raise ValueError(
                "weights_path is only used with a torchvision model name; load your module's weights yourself."
            )
        model = backbone
        inferred = strip_classifier(model) if any(hasattr(model, a) for a in CLASSIFIER_ATTRS) else None
    else:
        raise TypeError(f"backbone must be a torchvision model name or an nn.Module, got {type(backbone).__name__}")

    if small_image:
        small_image_stem(model)
    if isinstance(model, torchvision.models.VisionTransformer):
        module: nn.Module = ViTBackbone(model)
        inferred = model.hidden_dim
    else:
        module = PooledBackbone(model)
    if feature_dim is None:
        feature_dim = infer_feature_dim(module, 32 if small_image else 224) if inferred is None else inferred
    return module, int(feature_dim)


def reset_parameters(module: nn.Module, seed: int = 0) -> nn.Module:
    """Return a deep copy of ``module`` with every submodule's parameters re-initialized (a torchvision ViT's
    class token and position embeddings too: zeros and N(0, 0.02), as torchvision initializes them)."""
    module = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            if hasattr(sub, "reset_parameters") and callable(sub.reset_parameters):
                sub.reset_parameters()
            if hasattr(sub, "reset_running_stats") and callable(sub.reset_running_stats):
                sub.reset_running_stats()
            if isinstance(sub, torchvision.models.VisionTransformer):
                with torch.no_grad():
                    sub.class_token.zero_()
                    sub.encoder.pos_embedding.normal_(std=0.02)
    return module


def batch_norm_to_layer_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` (in place) by ``GroupNorm(1, C)``, i.e. layer norm
    over C, H, W of each sample, as CPC v2 does in its encoder. Returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = nn.GroupNorm(1, child.num_features, eps=child.eps, affine=child.affine)
            ref = next(iter([*child.parameters(), *child.buffers()]), None)
            setattr(module, name, norm if ref is None else norm.to(ref.device))
        else:
            batch_norm_to_layer_norm(child)
    return module
