"""ImageNet (ILSVRC-2012) in its standard on-disk layout, or any ImageFolder tree.

``root/<train_split>/<wnid>/*.JPEG`` and ``root/<val_split>/<wnid>/*.JPEG`` (the validation images
sorted into class folders, as torchvision and most SSL code expect). Options from the SSL papers:
a class subset (e.g. ImageNet-100, Tian et al. 2019), a class-balanced labeled fraction for
semi-supervised evaluation (1% / 10%, SimCLR sec. 6), and the evaluation transform
(resize 256, center crop 224).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from lightning_ssl.datamodules.image_folder import LAYOUT_HINT, RobustImageFolder
from lightning_ssl.datamodules.shards import ShardedImageFolder, join_url
from lightning_ssl.datamodules.two_view_datamodule import TwoViewDataModule

__all__ = ["ImageNetDataModule", "read_class_list", "balanced_fraction"]


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class folder names from a text file: the first word of each line; blank lines and text after
    ``#`` are ignored (the usual ImageNet-100 lists, ``n02869837`` or ``n02869837 bonnet``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} does not exist (a text file with one class folder name per line)")
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    if not names:
        raise ValueError(f"class list {path} names no class (one class folder name per line)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class list {path} repeats {duplicates}")
    return sorted(names)


def balanced_fraction(targets: list[int] | np.ndarray, fraction: float, seed: int = 0) -> list[int]:
    """Indices of ``round(fraction x n_c)`` (at least 1) samples of each class ``c``, drawn without
    replacement with ``seed``; deterministic for a given file list, sorted."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"labeled_fraction must lie in (0, 1], got {fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        k = max(1, int(round(fraction * len(idx))))
        chosen.append(np.sort(rng.permutation(idx)[:k]))
    return sorted(int(i) for i in np.concatenate(chosen)) if chosen else []


class ImageNetDataModule(TwoViewDataModule):
    """Two-view ImageNet batches ``([view1, view2], label)`` for pretraining, and labeled loaders.

    Args:
        root: folder holding the split folders.
        shards: instead of ``root``, the folder or URL (``s3://bucket/imagenet``) of the tree's
            shards made by ``lightning-ssl prepare image-folder`` (one sub-folder per split); the same
            samples, labels and batches as the folder (docs/data.md).
        storage_options: for shards on an object store: passed to litdata and boto3
            (``endpoint_url``, credentials); default: the environment's AWS settings.
        shard_cache_dir: where chunks of shards on S3 are cached (default ~/.cache/lightning-ssl/shards).
        shard_fetch: ``"chunk"`` (download remote chunks whole into that cache) or ``"sample"`` (one
            byte-range request per sample, nothing cached).
        train_split, val_split: split folder names (``train``/``val``; ``train``/``test`` for the
            CIFAR-10 JPEG copy).
        class_list: text file of class folder names to keep (e.g. ImageNet-100); default all.
        labeled_fraction: fraction of training labels available for evaluation (0.01, 0.1; class-
            balanced, chosen with ``fraction_seed``). ``labeled_dataloader("train")`` then yields
            that subset; pretraining always uses every training image.
        labeled_list: a file of training image file names (e.g. SimCLR's ``1percent.txt``) to use as
            the labeled subset instead of a random fraction.
        strict, verify, index_cache: see ``RobustImageFolder``.
        Others (batch size, augmentation recipe, image size, on-device augmentation, evaluation
            transform 256 / 224, ...): see ``TwoViewDataModule``.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        shards: str | None = None,
        storage_options: dict | None = None,
        shard_cache_dir: str | None = None,
        shard_fetch: str = "chunk",
        train_split: str = "train",
        val_split: str = "val",
        class_list: str | None = None,
        labeled_fraction: float | None = None,
        labeled_list: str | None = None,
        fraction_seed: int = 0,
        num_workers: int = 8,
        strict: bool = False,
        verify: str = "header",
        index_cache: bool = True,
        **kwargs,
    ):
        super().__init__(num_workers=num_workers, **kwargs)
        if labeled_fraction is not None and not 0.0 < labeled_fraction <= 1.0:
            raise ValueError(f"labeled_fraction must lie in (0, 1], got {labeled_fraction}")
        if labeled_fraction is not None and labeled_list is not None:
            raise ValueError("give labeled_fraction or labeled_list, not both")
        if verify not in ("header", "full", "none"):
            raise ValueError(f"verify must be 'header', 'full' or 'none', got {verify!r}")
        self.root = Path(root).expanduser()
        self.shards, self.storage_options, self.shard_cache_dir = shards, storage_options, shard_cache_dir
        self.shard_fetch = shard_fetch
        self.splits = {"train": train_split, "val": val_split}
        self.class_list, self.labeled_fraction, self.labeled_list = class_list, labeled_fraction, labeled_list
        self.fraction_seed, self.strict, self.verify, self.index_cache = fraction_seed, strict, verify, index_cache
        self._datasets: dict[str, RobustImageFolder | ShardedImageFolder] = {}

    def _folder(self, split: str) -> Path:
        folder = self.root / self.splits[split]
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"dataset root {self.root} does not exist; {LAYOUT_HINT} (split folders "
                f"{self.splits['train']!r} and {self.splits['val']!r}, set with train_split/val_split)"
            )
        if not folder.is_dir():
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"split folder {folder} does not exist (folders in {self.root}: {present}); {LAYOUT_HINT}. "
                f"Set train_split/val_split to the folder names of your tree."
            )
        return folder

    def _base_dataset(self, split: str) -> RobustImageFolder | ShardedImageFolder:
        if split not in self._datasets:
            classes = read_class_list(self.class_list) if self.class_list else None
            if split == "val" and classes is None:
                classes = self._base_dataset("train").classes  # labels agree with the training split
            if self.shards is not None:
                self._datasets[split] = ShardedImageFolder(
                    join_url(self.shards, self.splits[split]),
                    classes=classes,
                    storage_options=self.storage_options,
                    cache_dir=self.shard_cache_dir,
                    fetch=self.shard_fetch,
                    strict=self.strict,
                )
                return self._datasets[split]
            self._datasets[split] = RobustImageFolder(
                self._folder(split),
                classes=classes,
                strict=self.strict,
                verify=self.verify,
                index_cache=self.index_cache,
            )
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        self._base_dataset("train")

    @property
    def classes(self) -> list[str]:
        return self._base_dataset("train").classes

    def labeled_indices(self) -> list[int]:
        """Indices (into the training set) of the images whose labels evaluation may use."""
        train = self._base_dataset("train")
        if self.labeled_list is not None:
            path = Path(self.labeled_list).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"labeled_list {path} does not exist (one training image file name per line)")
            wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
            idx = [i for i, (p, _) in enumerate(train.samples) if os.path.basename(p) in wanted]
            if len(idx) < len(wanted):
                warnings.warn(
                    f"{len(wanted) - len(idx)} of the {len(wanted)} images in {path} are not in {train.root}",
                    stacklevel=2,
                )
            if not idx:
                raise ValueError(f"no image named in {path} is in {train.root}")
            return idx
        if self.labeled_fraction is None or self.labeled_fraction == 1.0:
            return list(range(len(train)))
        return balanced_fraction(train.targets, self.labeled_fraction, self.fraction_seed)

    def _labeled_train_dataset(self) -> Dataset:
        train = self._base_dataset("train")
        if self.labeled_fraction is None and self.labeled_list is None:
            return train
        return Subset(train, self.labeled_indices())
