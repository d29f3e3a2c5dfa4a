"""What the benchmark scripts share: the run header, tables, JSON results, quiet trainers and the
CIFAR-10 data they read."""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_ssl import REGISTRY
from lightning_ssl.datamodules import CIFAR10DataModule

__all__ = [
    "CIFAR_ROOT",
    "IMAGE_METHODS",
    "add_common_args",
    "apply_threads",
    "header",
    "print_table",
    "write_json",
    "quiet_trainer",
    "cifar10",
]

IMAGE_METHODS = sorted(name for name, entry in REGISTRY.items() if entry.modality == "image")
"""The registered methods on images (the image benchmarks' choices)."""

CIFAR_ROOT = Path(os.environ.get("LIGHTNING_SSL_CIFAR10", Path.home() / ".cache" / "lightning-ssl" / "cifar10-jpg"))


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the arguments and results here")
    return parser


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def header(what: str) -> str:
    """``# <date> UTC; <what>; <machine>; torch <version>, <n> threads``."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {what}; {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, {device}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` are ``(key, title, format)``."""
    widths = [max(len(title), 8) for _, title, _ in columns]
    print(" ".join(f"{title:>{w}}" for (_, title, _), w in zip(columns, widths)), flush=True)
    for row in rows:
        cells = []
        for (key, _, fmt), w in zip(columns, widths):
            value = row.get(key)
            cells.append(f"{'-' if value is None else format(value, fmt):>{w}}")
        print(" ".join(cells), flush=True)


def write_json(path: Path | None, args: argparse.Namespace, rows: Sequence[dict[str, Any]]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": list(rows)}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A Trainer with no logger, progress bar, checkpoints or model summary (benchmarks time the work)."""
    defaults = dict(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def cifar10(
    root: Path,
    train_per_class: int | None,
    val_per_class: int | None,
    batch_size: int,
    augmentation: str = "simclr",
    **kwargs: Any,
) -> CIFAR10DataModule:
    """The CIFAR-10 JPEG copy decoded once into memory, with the views made by the on-device path
    (on the CPU when there is no GPU): no worker processes and no per-image Python work."""
    if not (root / "train").is_dir():
        raise SystemExit(
            f"no CIFAR-10 JPEG tree at {root}; unpack ../shared/data/cifar10-jpg.tar.gz there "
            "(see ../shared/data/README.md) or set LIGHTNING_SSL_CIFAR10 to the folder holding train/ and test/"
        )
    dm = CIFAR10DataModule(
        root=str(root),
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        in_memory=True,
        gpu_augment=True,
        num_workers=0,
        batch_size=batch_size,
        augmentation=augmentation,
        **kwargs,
    )
    dm.setup()
    return dm
