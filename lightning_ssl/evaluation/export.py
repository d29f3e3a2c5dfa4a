"""Moving encoders in and out of files: torchvision-compatible export and loading for evaluation.

``export_backbone(ckpt, out)`` writes the encoder of any method's Lightning checkpoint as a plain
torchvision ``state_dict``. Because an SSL encoder has no classifier, the file includes the
classifier (``fc.weight``/``fc.bias`` for ResNets) of a freshly initialized torchvision model
(seeded, 1000 classes by default): the file then loads with ``strict=True`` into
``torchvision.models.<arch>()`` as is, and ``build_backbone(arch, weights_path=out)`` starts a new
run (SSL or evaluation) from it. That classifier is random: replace or ignore it.

    lightning-ssl export outputs/simclr/last.ckpt resnet18_simclr.pt [--arch resnet18]

``load_torchvision_model(arch, file)`` is the reverse: a torchvision model with a local file's
weights, to pass as a method's ``backbone`` (then export with ``--arch``).

``load_encoder(path)`` returns ``(encoder, feature_dim)`` from a method's checkpoint, an exported
file, or any torchvision state_dict (e.g. supervised ImageNet weights saved locally).

Next to an export, ``<out>.json`` (``encoder_sidecar``) records what the state_dict cannot: the stem,
layer norm, and CPC's patch grid. ``load_encoder`` reads it, so a CPC export is evaluated on its patch
grid (mean-pooled, as ``CPC.representation``) and not on the whole image.

ViTs: ``encoder_spec()["pool"]`` says which ``B x D`` features a ViT is evaluated on: ``"cls"`` (absent in
the spec: the default), the class token after the final norm, or ``"mean"``, the mean of the patch tokens
after it (MAE's fine-tuning, I-JEPA's evaluation); ``load_encoder`` returns that pooling (``pooled_encoder``).
A torchvision ViT (``vit_b_16``, ...) exports as torchvision's ``VisionTransformer`` state_dict (with a
random ``heads.head``); a timm backbone (``"timm:<name>"``) as the timm model's own state_dict, which loads
with ``strict=True`` into ``timm.create_model(name, pretrained=False, num_classes=0)``.

Audio methods (``CPCAudio``, ``encoder_spec()["modality"] == "audio"``) have no torchvision model:
their export is the ``CPCAudioEncoder``'s state_dict (convolutions and GRU), which loads with
``strict=True`` into ``CPCAudioEncoder(**spec["audio_encoder"])``; ``load_encoder`` rebuilds it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import VisionTransformer

from lightning_ssl.audio_encoders import CPCAudioEncoder
from lightning_ssl.backbones import (
    CLASSIFIER_ATTRS,
    TIMM_PREFIX,
    PooledBackbone,
    ViTBackbone,
    batch_norm_to_layer_norm,
    build_backbone,
    small_image_stem,
    strip_classifier,
    token_features,
    vision_transformer,
    vit_depth,
)
from lightning_ssl.checkpoints import read_checkpoint
from lightning_ssl.patches import PatchGridEncoder

__all__ = [
    "export_backbone",
    "encoder_state_dict",
    "encoder_spec",
    "load_encoder",
    "torchvision_model",
    "load_torchvision_model",
    "export_main",
    "encoder_sidecar",
    "POOLS",
    "MeanPooledViT",
    "MeanPooledTimmViT",
    "pooled_encoder",
    "encoder_pool",
    "timm_model",
]

POOLS = ("cls", "mean")
"""The ``B x D`` features of a ViT encoder: its class token, or the mean of its patch tokens."""


def _is_lightning_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj


def _is_audio(spec: dict) -> bool:
    return spec.get("modality") == "audio"


def _is_timm(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def _check_pool(pool: str, what: str = "pool") -> str:
    if pool not in POOLS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, POOLS))}, got {pool!r}")
    return pool


class MeanPooledViT(ViTBackbone):
    """A torchvision ViT encoder whose ``B x D`` output is the mean of its patch tokens after the final layer
    norm (``token_features``), not the class token: MAE's ``global_pool`` (He et al. 2022) and I-JEPA's
    average-pooled evaluation (Assran et al. 2023). Same parameters and state_dict keys as ``ViTBackbone``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 1:].mean(dim=1)


class MeanPooledTimmViT(PooledBackbone):
    """A timm ViT encoder whose ``B x D`` output is the mean of the patch tokens of ``forward_features``
    (after timm's final norm, without the class and register tokens). State_dict keys as ``PooledBackbone``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_features(self, x)[1].mean(dim=1)


def encoder_pool(encoder: nn.Module) -> str:
    """``"mean"`` for an encoder made by ``pooled_encoder(..., "mean")``, ``"cls"`` otherwise."""
    return "mean" if isinstance(encoder, (MeanPooledViT, MeanPooledTimmViT)) else "cls"


def pooled_encoder(encoder: nn.Module, pool: str) -> nn.Module:
    """``encoder`` (a ViT from ``build_backbone``: ``ViTBackbone``, a timm ViT in a ``PooledBackbone``, or
    the bare torchvision/timm model) with ``B x D`` features ``pool``: ``"cls"`` the class token after the
    final norm (``ViTBackbone``; a timm model's own pooled output), ``"mean"`` the mean of the patch tokens
    (``MeanPooledViT``, ``MeanPooledTimmViT``). The result shares the ViT's parameters (same state_dict
    keys under ``module.``); an encoder that already pools so is returned as is. Other networks: returned as
    they are for ``"cls"`` (their pooled features); ``"mean"`` is an error."""
    _check_pool(pool)
    inner = encoder.module if isinstance(encoder, PooledBackbone) else encoder
    if isinstance(inner, VisionTransformer):
        cls: type[nn.Module] = MeanPooledViT if pool == "mean" else ViTBackbone
    elif vit_depth(inner) is not None:  # a timm ViT
        cls = MeanPooledTimmViT if pool == "mean" else PooledBackbone
    elif pool == "mean":
        raise ValueError(
            f"pool='mean' averages the patch tokens of a ViT, but the encoder is a {type(inner).__name__}: "
            "use a torchvision VisionTransformer or a timm ViT ('timm:<name>'), or pool='cls' (a convolutional "
            "encoder's features are already average-pooled)"
        )
    else:
        return encoder
    return encoder if type(encoder) is cls else cls(inner)


def timm_model(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0)``: the plain timm model an export of a
    ``"timm:<name>"`` backbone loads into (``name`` with or without the prefix)."""
    name = name[len(TIMM_PREFIX) :] if _is_timm(name) else name
    if importlib.util.find_spec("timm") is None:
        raise ImportError(f"the backbone {TIMM_PREFIX}{name} needs timm: pip install 'lightning-ssl[timm]'")
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0)


def _check_keys(state: dict[str, torch.Tensor], full: dict[str, torch.Tensor], what: str) -> None:
    """``state`` has exactly the keys and shapes of ``full`` (the plain model's state_dict), or a clear error."""
    missing, unexpected = sorted(set(full) - set(state)), sorted(set(state) - set(full))
    shapes = sorted(k for k in set(full) & set(state) if tuple(full[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        shown = lambda keys: f"{keys[:8]}{' ...' if len(keys) > 8 else ''}"  # noqa: E731
        raise ValueError(
            f"the checkpoint's encoder does not have the state_dict of {what}: missing {shown(missing)}, "
            f"unexpected {shown(unexpected)}, other shapes {shown(shapes)}. An export has exactly the plain "
            "model's keys and shapes: a method that replaces a tensor of the backbone (a fixed sin-cos position "
            "embedding, a frozen patch projection) must keep it under its name and shape, as a parameter or a "
            "persistent buffer"
        )


def encoder_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The evaluated encoder's weights of a Lightning checkpoint, with torchvision key names (for an
    audio method: the ``CPCAudioEncoder``'s own key names): the online backbone, or the entries
    ``encoder_spec(ckpt)["state_prefix"]`` names (DINO's teacher, ``backbone_ema.``)."""
    spec = encoder_spec(ckpt)
    prefix = spec.get("state_prefix", "backbone.") + ("" if _is_audio(spec) else "module.")
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(
            f"no '{prefix}*' weights in the checkpoint: it was not written by an lightning_ssl method "
            "(SSLMethod keeps its encoder in `self.backbone`)"
        )
    return state


def torchvision_model(arch: str, small_image: bool = False, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A freshly initialized torchvision model (the small-image ResNet stem when asked; a ViT named
    ``vit_<size>_<patch>`` by ``backbones.vision_transformer``, with 4x4 patches for small images)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = vision_transformer(arch, small_image=small_image, num_classes=num_classes)
        if vit is not None:
            return vit
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        if small_image:
            small_image_stem(model)
    return model


def load_torchvision_model(arch: str, weights_path: str | Path) -> nn.Module:
    """A torchvision model with the weights of a local state_dict file (``strict=True``): pass it as
    a method's ``backbone`` to start SSL from, e.g., supervised ImageNet weights or an export."""
    model = vision_transformer(arch) or torchvision.models.get_model(arch, weights=None)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def encoder_spec(ckpt: dict) -> dict:
    """How to rebuild a checkpoint's evaluation encoder (``SSLMethod.encoder_spec``), read from the
    checkpoint or, for checkpoints of earlier releases, derived from its hyperparameters."""
    if isinstance(ckpt.get("encoder_spec"), dict):
        return ckpt["encoder_spec"]
    hp = ckpt.get("hyper_parameters", {})
    grid = None
    if "patch_size" in hp:
        grid = {"patch_size": hp["patch_size"], "patch_stride": hp["patch_stride"], "grid_size": hp.get("grid_size")}
    return {
        "backbone": hp.get("backbone") if isinstance(hp.get("backbone"), str) else None,
        "small_image": bool(hp.get("small_image", False)),
        "layer_norm": hp.get("encoder_norm") == "layer" and isinstance(hp.get("backbone"), str),
        "patch_grid": grid,
    }


def _arch(spec: dict, arch: str | None, source) -> str:
    name = spec.get("backbone")
    if isinstance(name, str):
        if arch is not None and arch != name:
            raise ValueError(f"{source} was trained with backbone {name!r}, not {arch!r}")
        return name
    if arch is None:
        raise ValueError(
            f"{source} was trained with an nn.Module backbone, not a torchvision model name: pass the "
            "torchvision architecture it is (arch='resnet50', --arch resnet50 on the command line; "
            "arch='timm:<name>' for a timm model)"
        )
    return arch


def _spec_model(spec: dict, arch: str, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """The torchvision model the checkpoint's backbone is, with its stem and norm layers."""
    model = torchvision_model(arch, small_image=bool(spec.get("small_image")), num_classes=num_classes, seed=seed)
    return batch_norm_to_layer_norm(model) if spec.get("layer_norm") else model


def encoder_sidecar(out: str | Path) -> Path:
    """The file next to an export that holds its ``encoder_spec`` (``resnet18_cpc.pt.json``)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def export_backbone(
    checkpoint: str | Path, out: str | Path, num_classes: int = 1000, seed: int = 0, arch: str | None = None
) -> Path:
    """Write the encoder of ``checkpoint`` as a torchvision state_dict to ``out`` and return ``out``.

    The file is checked by loading it with ``strict=True`` into the torchvision model before it is
    written. Encoders trained with ``small_image=True`` have the CIFAR stem (3x3 stride-1 ``conv1``,
    no max-pool): load them into a torchvision ResNet whose stem was changed the same way
    (``torchvision_model(arch, small_image=True)``); CPC v2's layer-norm encoders load into
    ``batch_norm_to_layer_norm(torchvision_model(arch))``. CPC evaluates its encoder on a patch grid
    (``PatchGridEncoder``); the file holds the backbone's weights only. A torchvision ViT's file has
    torchvision's ``VisionTransformer`` keys (with a random ``heads.head``). A timm backbone
    (``"timm:<name>"``) is written as the timm model's own state_dict (no classifier: it loads with
    ``strict=True`` into ``timm.create_model(name, pretrained=False, num_classes=0)``; needs the ``timm``
    extra). Either way the file has exactly the plain model's keys and shapes, or the export stops naming
    the keys that differ. The sidecar records ``encoder_spec``'s ``pool``.
    """
    ckpt = read_checkpoint(checkpoint)
    spec = encoder_spec(ckpt)
    if _is_audio(spec):
        state = encoder_state_dict(ckpt)
        CPCAudioEncoder(**spec["audio_encoder"]).load_state_dict(state, strict=True)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        return out
    name = _arch(spec, arch, checkpoint)
    pool = _check_pool(spec.get("pool", "cls"), "encoder_spec's pool")
    state = encoder_state_dict(ckpt)
    if _is_timm(name):  # the timm model's own keys, no classifier (num_classes=0)
        try:  # keys and shapes only: no need to initialize its weights
            with torch.device("meta"):
                model = timm_model(name)
        except ImportError:
            raise
        except Exception:
            model = timm_model(name)
        full = model.state_dict()
        _check_keys(state, full, f"timm.create_model({name[len(TIMM_PREFIX) :]!r}, num_classes=0)")
    else:
        model = _spec_model(spec, name, num_classes, seed)
        full = model.state_dict()
        classifier = {k: v for k, v in full.items() if k.split(".")[0] in CLASSIFIER_ATTRS}
        clash = set(state) & set(classifier)
        if clash:
            raise ValueError(f"encoder unexpectedly holds classifier weights {sorted(clash)}")
        state = {**state, **classifier}
        _check_keys(state, full, f"torchvision's {name}")
    model.load_state_dict(state, strict=True, assign=_is_timm(name))  # a meta-device model takes the tensors
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: state[k] for k in full}, out)
    keys = ("small_image", "layer_norm", "patch_grid")
    sidecar = {"arch": name, **{k: spec.get(k) for k in keys}, "pool": pool}
    encoder_sidecar(out).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def loading_instructions(out: str | Path) -> str:
    """How to load the export ``out`` (from its sidecar): the torchvision constructor and, for the
    small-image stem or CPC v2's layer norm, the lines that change it before ``load_state_dict``; for a
    timm backbone, ``timm.create_model``; for ``pool="mean"``, a comment saying how to pool."""
    sidecar = encoder_sidecar(out)
    if not sidecar.is_file():  # CPC on audio
        return f"load: lightning_ssl.audio_encoders.CPCAudioEncoder(...).load_state_dict(torch.load({str(out)!r}))"
    spec = json.loads(sidecar.read_text())
    arch, lines = spec["arch"], []
    mean = spec.get("pool", "cls") == "mean"
    if _is_timm(arch):
        lines.append("import timm")
        lines.append(f"model = timm.create_model({arch[len(TIMM_PREFIX) :]!r}, pretrained=False, num_classes=0)")
        lines.append(f"model.load_state_dict(torch.load({str(out)!r}))")
        if mean:
            lines.append("# features: model.forward_features(images)[:, model.num_prefix_tokens:].mean(1), pool=mean")
        else:
            lines.append("# features: model(images)  (timm's pooling: a ViT's class token after the final norm)")
        text = "load it with:\n" + "\n".join(f"  {line}" for line in lines)
        text += f"\nor: lightning_ssl.evaluation.load_encoder({str(out)!r})  # the frozen encoder, pooled"
        return text + (" (the mean of the patch tokens)" if mean else "")
    vit = vision_transformer(arch, small_image=bool(spec.get("small_image")))
    if vit is not None and (spec.get("small_image") or arch not in torchvision.models.list_models()):
        lines.append(
            f"model = torchvision.models.VisionTransformer({vit.image_size}, {vit.patch_size}, "
            f"{len(vit.encoder.layers)}, {vit.encoder.layers[0].num_heads}, {vit.hidden_dim}, {vit.mlp_dim})"
            f"  # {arch}" + (" with 4x4 patches for small images" if spec.get("small_image") else "")
        )
    else:
        lines.append(f"model = torchvision.models.{arch}()")
    if spec.get("small_image") and vit is None:
        conv1 = torch.load(out, map_location="cpu", weights_only=True)["conv1.weight"]
        lines.append(
            f"model.conv1 = torch.nn.Conv2d({conv1.shape[1]}, {conv1.shape[0]}, 3, 1, 1, bias=False)  "
            "# the small-image stem"
        )
        lines.append("model.maxpool = torch.nn.Identity()")
    if spec.get("layer_norm"):
        lines.append("model = lightning_ssl.backbones.batch_norm_to_layer_norm(model)  # CPC v2's layer norm")
    lines.append(f"model.load_state_dict(torch.load({str(out)!r}))")
    if mean:
        lines.append("# features: the mean of the patch tokens after model.encoder.ln, not model(images)'s class token")
    text = "load it with:\n" + "\n".join(f"  {line}" for line in lines)
    text += f"\nor: lightning_ssl.evaluation.load_encoder({str(out)!r}, arch={arch!r})  # the frozen encoder, pooled"
    if spec.get("patch_grid"):
        text += " on CPC's patch grid"
    if mean:
        text += " (the mean of the patch tokens)"
    return text


def _timm_encoder(name: str, state: dict[str, torch.Tensor]) -> tuple[nn.Module, int]:
    """The ``build_backbone`` encoder of the timm backbone ``name`` with the weights ``state`` (``strict=True``).
    Built on the meta device when it can be (every tensor then comes from ``state``, in the model's dtypes:
    no random initialization to pay for), else built and loaded as usual."""
    if importlib.util.find_spec("timm") is not None:
        try:
            with torch.device("meta"):
                encoder, dim = build_backbone(name)
        except Exception:  # a model whose construction needs real tensors
            encoder = None
        if encoder is not None:
            reference = encoder.module.state_dict()
            typed = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
            encoder.module.load_state_dict(typed, strict=True, assign=True)
            tensors = [*encoder.parameters(), *encoder.buffers()]
            if not any(t.is_meta for t in tensors):  # non-persistent buffers would stay on the meta device
                return encoder, dim
    encoder, dim = build_backbone(name)  # ImportError naming the timm extra when timm is missing
    encoder.module.load_state_dict(state, strict=True)
    return encoder, dim


def load_encoder(
    path: str | Path, arch: str | None = None, small_image: bool = False, pool: str | None = None
) -> tuple[nn.Module, int]:
    """``(encoder, feature_dim)`` from a Lightning checkpoint of any method or from a torchvision
    state_dict file (exported, or supervised weights).

    For a checkpoint, the encoder computes the method's evaluation features (``representation``): the
    online backbone, or for CPC the backbone's features averaged over the patch grid. So does an export
    with its ``encoder_sidecar`` file next to it (its stem, norm layers and patch grid win over
    ``small_image``). ``arch`` names the torchvision model of a plain state_dict (``resnet18``,
    ``resnet50``, ...) and of checkpoints of methods built on an ``nn.Module`` backbone; ``"timm:<name>"``
    a timm model's state_dict (an export's sidecar names its architecture, so ``arch`` may be left out).
    ``pool`` (``"cls"`` or ``"mean"``, see ``pooled_encoder``) overrides the ViT pooling that the checkpoint's
    ``encoder_spec`` or the sidecar records (``"cls"`` when they say nothing)."""
    if pool is not None:
        _check_pool(pool)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file {path} does not exist")
    obj = read_checkpoint(path) if path.suffix == ".ckpt" else torch.load(path, map_location="cpu", weights_only=False)
    if _is_lightning_checkpoint(obj):
        spec = encoder_spec(obj)
        if _is_audio(spec):
            audio = CPCAudioEncoder(**spec["audio_encoder"])
            audio.load_state_dict(encoder_state_dict(obj), strict=True)
            return pooled_encoder(audio, pool or "cls"), audio.feature_dim
        name = _arch(spec, arch, path)
        encoder: nn.Module
        if _is_timm(name):
            encoder, dim = _timm_encoder(name, encoder_state_dict(obj))
        else:
            model = _spec_model(spec, name)
            dim = strip_classifier(model)
            model.load_state_dict(encoder_state_dict(obj), strict=True)
            encoder = ViTBackbone(model) if isinstance(model, VisionTransformer) else PooledBackbone(model)
        encoder = pooled_encoder(encoder, pool or _check_pool(spec.get("pool", "cls"), "encoder_spec's pool"))
        if spec.get("patch_grid"):
            encoder = PatchGridEncoder(encoder, **spec["patch_grid"])
        return encoder, int(dim)
    sidecar = encoder_sidecar(path)
    spec = json.loads(sidecar.read_text()) if sidecar.is_file() else {"small_image": small_image}
    arch = arch or spec.get("arch")
    if arch is None:
        raise ValueError(
            f"{path} is a plain state_dict, not a Lightning checkpoint: pass the torchvision architecture "
            "it belongs to (arch='resnet50', or --arch on the command line; arch='timm:<name>' for timm's)"
        )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    # the classifier of the file (any number of classes) is not part of the encoder; every other
    # tensor must match the architecture exactly
    state = {k: v for k, v in obj.items() if k.split(".")[0] not in CLASSIFIER_ATTRS}
    if _is_timm(arch):
        encoder, dim = _timm_encoder(arch, state)
    else:
        model = _spec_model(spec, arch)
        dim = strip_classifier(model)
        model.load_state_dict(state, strict=True)
        encoder, dim = build_backbone(model, feature_dim=dim)
    encoder = pooled_encoder(encoder, pool or _check_pool(spec.get("pool", "cls"), "the sidecar's pool"))
    if spec.get("patch_grid"):
        encoder = PatchGridEncoder(encoder, **spec["patch_grid"])
    return encoder, dim


def export_main(argv: list[str], check_model: Callable[[str, str], None] | None = None) -> None:
    """``lightning-ssl export CKPT OUT.pt [--num-classes N] [--model NAME]``; ``check_model(ckpt, NAME)``
    stops a checkpoint of another method (the CLI passes the registry's check)."""
    parser = argparse.ArgumentParser(
        prog="lightning-ssl export",
        description="Write the encoder of a method's checkpoint as a torchvision state_dict "
        "(loads with strict=True into torchvision.models.<arch>(); its classifier is freshly initialized), "
        "or for a timm:<name> backbone as the timm model's state_dict (timm.create_model(name, num_classes=0)).",
    )
    parser.add_argument("checkpoint", help="Lightning .ckpt written by any lightning_ssl method")
    parser.add_argument("out", help="output file, e.g. resnet50_simclr.pt")
    parser.add_argument(
        "--arch",
        default=None,
        help="torchvision architecture (or timm:<name>), when the method was built on an nn.Module backbone",
    )
    parser.add_argument("--num-classes", type=int, default=1000, help="size of the (random) classifier in the file")
    parser.add_argument(
        "--model", default=None, help="the method the checkpoint must be of (e.g. SimCLR); stops if it is another"
    )
    args = parser.parse_args(argv)
    if args.model is not None:
        if check_model is None:
            raise ValueError("--model is checked by the lightning-ssl export command; run it from there")
        check_model(args.checkpoint, args.model)
    out = export_backbone(args.checkpoint, args.out, num_classes=args.num_classes, arch=args.arch)
    print(f"wrote {out}; {loading_instructions(out)}")
