"""Moving encoders in and out of files: torchvision-compatible export and loading for evaluation.

``export_backbone(ckpt, out)`` writes the encoder of any method's Lightning checkpoint as a plain
torchvision ``state_dict``. Because an SSL encoder has no classifier, the file includes the
classifier (``fc.weight``/``fc.bias`` for ResNets) of a freshly initialised torchvision model
(seeded, 1000 classes by default): the file then loads with ``strict=True`` into
``torchvision.models.<arch>()`` as is, and ``build_backbone(arch, weights_path=out)`` starts a new
run (SSL or evaluation) from it. That classifier is random: replace or ignore it.

    lightning-ssl export outputs/simclr/last.ckpt resnet18_simclr.pt [--arch resnet18]

``load_torchvision_model(arch, file)`` is the reverse: a torchvision model with a local file's
weights, to pass as a method's ``backbone`` (then export with ``--arch``).

``load_encoder(path)`` returns ``(encoder, feature_dim)`` from a method's checkpoint, an exported
file, or any torchvision state_dict (e.g. supervised ImageNet weights saved locally).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_ssl.backbones import _CLASSIFIER_ATTRS, _small_image_stem, _strip_classifier, build_backbone

__all__ = [
    "export_backbone", "encoder_state_dict", "load_encoder", "torchvision_model", "load_torchvision_model", "export_main",
]

_PREFIX = "backbone.module."


def _read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; give the path of a Lightning .ckpt file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


def _is_lightning_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj


def encoder_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The online encoder's weights of a Lightning checkpoint, with torchvision key names."""
    state = {k[len(_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(_PREFIX)}
    if not state:
        raise ValueError(
            f"no '{_PREFIX}*' weights in the checkpoint: it was not written by an lightning_ssl method "
            "(SSLMethod keeps its encoder in `self.backbone`)"
        )
    return state


def torchvision_model(arch: str, small_image: bool = False, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A freshly initialised torchvision model (the small-image ResNet stem when asked)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        if small_image:
            _small_image_stem(model)
    return model


def load_torchvision_model(arch: str, weights_path: str | Path) -> nn.Module:
    """A torchvision model with the weights of a local state_dict file (``strict=True``): pass it as
    a method's ``backbone`` to start SSL from, e.g., supervised ImageNet weights or an export."""
    model = torchvision.models.get_model(arch, weights=None)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def _arch(hp: dict, arch: str | None, source) -> str:
    name = hp.get("backbone")
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


def export_backbone(
    checkpoint: str | Path, out: str | Path, num_classes: int = 1000, seed: int = 0, arch: str | None = None
) -> Path:
    """Write the encoder of ``checkpoint`` as a torchvision state_dict to ``out`` and return ``out``.

    The file is checked by loading it with ``strict=True`` into the torchvision model before it is
    written. Encoders trained with ``small_image=True`` have the CIFAR stem (3x3 stride-1 ``conv1``,
    no max-pool): load them into a torchvision ResNet whose stem was changed the same way
    (``torchvision_model(arch, small_image=True)``).
    """
    ckpt = _read_checkpoint(checkpoint)
    hp = ckpt.get("hyper_parameters", {})
    arch = _arch(hp, arch, checkpoint)
    model = torchvision_model(arch, small_image=bool(hp.get("small_image", False)), num_classes=num_classes, seed=seed)
    state = encoder_state_dict(ckpt)
    full = model.state_dict()
    classifier = {k: v for k, v in full.items() if k.split(".")[0] in _CLASSIFIER_ATTRS}
    clash = set(state) & set(classifier)
    if clash:
        raise ValueError(f"encoder unexpectedly holds classifier weights {sorted(clash)}")
    state = {**state, **classifier}
    model.load_state_dict(state, strict=True)  # raises with the missing/unexpected keys if it does not fit
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: state[k] for k in full}, out)
    return out


def load_encoder(
    path: str | Path, arch: str | None = None, small_image: bool = False
) -> tuple[nn.Module, int]:
    """``(encoder, feature_dim)`` from a Lightning checkpoint of any method (its online encoder) or
    from a torchvision state_dict file (exported, or supervised weights); ``arch`` names the
    torchvision model for the latter (``resnet18``, ``resnet50``, ...) and for checkpoints of
    methods built on an ``nn.Module`` backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if _is_lightning_checkpoint(obj):
        hp = obj["hyper_parameters"]
        encoder, dim = build_backbone(_arch(hp, arch, path), small_image=bool(hp.get("small_image", False)))
        encoder.module.load_state_dict(encoder_state_dict(obj), strict=True)
        return encoder, dim
    if arch is None:
        raise ValueError(
            f"{path} is a plain state_dict, not a Lightning checkpoint: pass the torchvision architecture "
            "it belongs to (arch='resnet50', or --arch on the command line)"
        )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    model = torchvision_model(arch, small_image=small_image)
    dim = _strip_classifier(model)
    # the classifier of the file (any number of classes) is not part of the encoder; every other
    # tensor must match the architecture exactly
    state = {k: v for k, v in obj.items() if k.split(".")[0] not in _CLASSIFIER_ATTRS}
    model.load_state_dict(state, strict=True)
    return build_backbone(model, feature_dim=dim)


def export_main(argv: list[str]) -> None:
    """``lightning-ssl export CKPT OUT.pt [--num-classes N]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-ssl export",
        description="Write the encoder of a method's checkpoint as a torchvision state_dict "
        "(loads with strict=True into torchvision.models.<arch>(); its classifier is freshly initialised).",
    )
    parser.add_argument("checkpoint", help="Lightning .ckpt written by any lightning_ssl method")
    parser.add_argument("out", help="output file, e.g. resnet50_simclr.pt")
    parser.add_argument("--arch", default=None, help="torchvision architecture, when the method was built on an nn.Module backbone")
    parser.add_argument("--num-classes", type=int, default=1000, help="size of the (random) classifier in the file")
    args = parser.parse_args(argv)
    out = export_backbone(args.checkpoint, args.out, num_classes=args.num_classes, arch=args.arch)
    print(f"wrote {out}")
