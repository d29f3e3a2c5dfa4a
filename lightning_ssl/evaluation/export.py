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

Audio methods (``CPCAudio``, ``encoder_spec()["modality"] == "audio"``) have no torchvision model:
their export is the ``CPCAudioEncoder``'s state_dict (convolutions and GRU), which loads with
``strict=True`` into ``CPCAudioEncoder(**spec["audio_encoder"])``; ``load_encoder`` rebuilds it.
"""

from __future__ import annotations

import argparse
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
    PooledBackbone,
    ViTBackbone,
    batch_norm_to_layer_norm,
    build_backbone,
    small_image_stem,
    strip_classifier,
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
]


def _is_lightning_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj


def _is_audio(spec: dict) -> bool:
    return spec.get("modality") == "audio"


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
    """A freshly initialized torchvision model (the small-image ResNet stem when asked)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        if small_image:
            small_image_stem(model)
    return model


def load_torchvision_model(arch: str, weights_path: str | Path) -> nn.Module:
    """A torchvision model with the weights of a local state_dict file (``strict=True``): pass it as
    a method's ``backbone`` to start SSL from, e.g., supervised ImageNet weights or an export."""
    model = torchvision.models.get_model(arch, weights=None)
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
            "torchvision architecture it is (arch='resnet50', --arch resnet50 on the command line)"
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
    (``PatchGridEncoder``); the file holds the backbone's weights only.
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
    model = _spec_model(spec, _arch(spec, arch, checkpoint), num_classes, seed)
    state = encoder_state_dict(ckpt)
    full = model.state_dict()
    classifier = {k: v for k, v in full.items() if k.split(".")[0] in CLASSIFIER_ATTRS}
    clash = set(state) & set(classifier)
    if clash:
        raise ValueError(f"encoder unexpectedly holds classifier weights {sorted(clash)}")
    state = {**state, **classifier}
    model.load_state_dict(state, strict=True)  # raises with the missing/unexpected keys if it does not fit
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: state[k] for k in full}, out)
    keys = ("small_image", "layer_norm", "patch_grid")
    sidecar = {"arch": _arch(spec, arch, checkpoint), **{k: spec.get(k) for k in keys}}
    encoder_sidecar(out).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def loading_instructions(out: str | Path) -> str:
    """How to load the export ``out`` (from its sidecar): the torchvision constructor and, for the
    small-image stem or CPC v2's layer norm, the lines that change it before ``load_state_dict``."""
    sidecar = encoder_sidecar(out)
    if not sidecar.is_file():  # CPC on audio
        return f"load: lightning_ssl.audio_encoders.CPCAudioEncoder(...).load_state_dict(torch.load({str(out)!r}))"
    spec = json.loads(sidecar.read_text())
    arch, lines = spec["arch"], []
    lines.append(f"model = torchvision.models.{arch}()")
    if spec.get("small_image"):
        conv1 = torch.load(out, map_location="cpu", weights_only=True)["conv1.weight"]
        lines.append(
            f"model.conv1 = torch.nn.Conv2d({conv1.shape[1]}, {conv1.shape[0]}, 3, 1, 1, bias=False)  "
            "# the small-image stem"
        )
        lines.append("model.maxpool = torch.nn.Identity()")
    if spec.get("layer_norm"):
        lines.append("model = lightning_ssl.backbones.batch_norm_to_layer_norm(model)  # CPC v2's layer norm")
    lines.append(f"model.load_state_dict(torch.load({str(out)!r}))")
    text = "load it with:\n" + "\n".join(f"  {line}" for line in lines)
    text += f"\nor: lightning_ssl.evaluation.load_encoder({str(out)!r}, arch={arch!r})  # the frozen encoder, pooled"
    if spec.get("patch_grid"):
        text += " on CPC's patch grid"
    return text


def load_encoder(path: str | Path, arch: str | None = None, small_image: bool = False) -> tuple[nn.Module, int]:
    """``(encoder, feature_dim)`` from a Lightning checkpoint of any method or from a torchvision
    state_dict file (exported, or supervised weights).

    For a checkpoint, the encoder computes the method's evaluation features (``representation``): the
    online backbone, or for CPC the backbone's features averaged over the patch grid. So does an export
    with its ``encoder_sidecar`` file next to it (its stem, norm layers and patch grid win over
    ``small_image``). ``arch`` names the torchvision model of a plain state_dict (``resnet18``,
    ``resnet50``, ...) and of checkpoints of methods built on an ``nn.Module`` backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file {path} does not exist")
    obj = read_checkpoint(path) if path.suffix == ".ckpt" else torch.load(path, map_location="cpu", weights_only=False)
    if _is_lightning_checkpoint(obj):
        spec = encoder_spec(obj)
        if _is_audio(spec):
            audio = CPCAudioEncoder(**spec["audio_encoder"])
            audio.load_state_dict(encoder_state_dict(obj), strict=True)
            return audio, audio.feature_dim
        model = _spec_model(spec, _arch(spec, arch, path))
        dim = strip_classifier(model)
        model.load_state_dict(encoder_state_dict(obj), strict=True)
        encoder: nn.Module = ViTBackbone(model) if isinstance(model, VisionTransformer) else PooledBackbone(model)
        if spec.get("patch_grid"):
            encoder = PatchGridEncoder(encoder, **spec["patch_grid"])
        return encoder, int(dim)
    if arch is None:
        raise ValueError(
            f"{path} is a plain state_dict, not a Lightning checkpoint: pass the torchvision architecture "
            "it belongs to (arch='resnet50', or --arch on the command line)"
        )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    sidecar = encoder_sidecar(path)
    spec = json.loads(sidecar.read_text()) if sidecar.is_file() else {"small_image": small_image}
    model = _spec_model(spec, arch)
    dim = strip_classifier(model)
    # the classifier of the file (any number of classes) is not part of the encoder; every other
    # tensor must match the architecture exactly
    state = {k: v for k, v in obj.items() if k.split(".")[0] not in CLASSIFIER_ATTRS}
    model.load_state_dict(state, strict=True)
    encoder, dim = build_backbone(model, feature_dim=dim)
    if spec.get("patch_grid"):
        encoder = PatchGridEncoder(encoder, **spec["patch_grid"])
    return encoder, dim


def export_main(argv: list[str], check_model: Callable[[str, str], None] | None = None) -> None:
    """``lightning-ssl export CKPT OUT.pt [--num-classes N] [--model NAME]``; ``check_model(ckpt, NAME)``
    stops a checkpoint of another method (the CLI passes the registry's check)."""
    parser = argparse.ArgumentParser(
        prog="lightning-ssl export",
        description="Write the encoder of a method's checkpoint as a torchvision state_dict "
        "(loads with strict=True into torchvision.models.<arch>(); its classifier is freshly initialized).",
    )
    parser.add_argument("checkpoint", help="Lightning .ckpt written by any lightning_ssl method")
    parser.add_argument("out", help="output file, e.g. resnet50_simclr.pt")
    parser.add_argument(
        "--arch", default=None, help="torchvision architecture, when the method was built on an nn.Module backbone"
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
