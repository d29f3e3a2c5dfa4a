"""ImageNet (ILSVRC-2012) in its standard on-disk layout, or any ImageFolder tree.

``root/<train_split>/<wnid>/*.JPEG`` and ``root/<val_split>/<wnid>/*.JPEG`` (the validation images
sorted into class folders, as torchvision and most SSL code expect). Options from the SSL papers:
a class subset (e.g. ImageNet-100, Tian et al. 2019), a class-balanced labelled fraction for
semi-supervised evaluation (1% / 10%, SimCLR sec. 6), and the evaluation transform
(resize 256, centre crop 224).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from datamodules.augmentations import IMAGENET_MEAN, IMAGENET_STD
from datamodules.image_folder import LAYOUT_HINT, RobustImageFolder
from datamodules.two_view_datamodule import TwoViewDataModule

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
        raise ValueError(f"labelled_fraction must lie in (0, 1], got {fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        k = max(1, int(round(fraction * len(idx))))
        chosen.append(np.sort(rng.permutation(idx)[:k]))
    return sorted(int(i) for i in np.concatenate(chosen)) if chosen else []


class ImageNetDataModule(TwoViewDataModule):
    """Two-view ImageNet batches ``([view1, view2], label)`` for pretraining, and labelled loaders.

    Args:
        root: folder holding the split folders.
        train_split, val_split: split folder names (``train``/``val``; ``train``/``test`` for the
            CIFAR-10 JPEG copy).
        class_list: text file of class folder names to keep (e.g. ImageNet-100); default all.
        labelled_fraction: fraction of training labels available for evaluation (0.01, 0.1; class-
            balanced, chosen with ``fraction_seed``). ``labelled_dataloader("train")`` then yields
            that subset; pretraining always uses every training image.
        labelled_list: a file of training image file names (e.g. SimCLR's ``1percent.txt``) to use as
            the labelled subset instead of a random fraction.
        batch_size: per process; ``drop_last`` drops the ragged last pretraining batch.
        augmentation, image_size, strength, small_image, gpu_augment, gpu_load_size: see
            ``TwoViewDataModule``.
        eval_resize, eval_crop: evaluation transform (256 / 224).
        strict, verify: see ``RobustImageFolder``.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        train_split: str = "train",
        val_split: str = "val",
        class_list: str | None = None,
        labelled_fraction: float | None = None,
        labelled_list: str | None = None,
        fraction_seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 8,
        drop_last: bool = True,
        augmentation: str = "simclr",
        image_size: int = 224,
        strength: float = 1.0,
        small_image: bool = False,
        gpu_augment: bool = False,
        gpu_load_size: int | None = None,
        eval_resize: int | None = 256,
        eval_crop: int | None = 224,
        eval_batch_size: int = 256,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        strict: bool = False,
        verify: str = "header",
        pin_memory: bool | None = None,
    ):
        super().__init__(
            batch_size, num_workers, augmentation, image_size, strength, small_image, gpu_augment, gpu_load_size,
            drop_last, eval_resize, eval_crop, eval_batch_size, mean, std, pin_memory,
        )
        if labelled_fraction is not None and not 0.0 < labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must lie in (0, 1], got {labelled_fraction}")
        if labelled_fraction is not None and labelled_list is not None:
            raise ValueError("give labelled_fraction or labelled_list, not both")
        if verify not in ("header", "full", "none"):
            raise ValueError(f"verify must be 'header', 'full' or 'none', got {verify!r}")
        self.root = Path(root).expanduser()
        self.splits = {"train": train_split, "val": val_split}
        self.class_list, self.labelled_fraction, self.labelled_list = class_list, labelled_fraction, labelled_list
        self.fraction_seed, self.strict, self.verify = fraction_seed, strict, verify
        self._datasets: dict[str, RobustImageFolder] = {}

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

    def _base_dataset(self, split: str) -> RobustImageFolder:
        if split not in self._datasets:
            classes = read_class_list(self.class_list) if self.class_list else None
            if split == "val" and classes is None:
                classes = self._base_dataset("train").classes  # labels agree with the training split
            self._datasets[split] = RobustImageFolder(
                self._folder(split), classes=classes, strict=self.strict, verify=self.verify
            )
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        self._base_dataset("train")

    @property
    def classes(self) -> list[str]:
        return self._base_dataset("train").classes

    def labelled_indices(self) -> list[int]:
        """Indices (into the training set) of the images whose labels evaluation may use."""
        train = self._base_dataset("train")
        if self.labelled_list is not None:
            path = Path(self.labelled_list).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"labelled_list {path} does not exist (one training image file name per line)")
            wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
            idx = [i for i, (p, _) in enumerate(train.samples) if os.path.basename(p) in wanted]
            if len(idx) < len(wanted):
                warnings.warn(f"{len(wanted) - len(idx)} of the {len(wanted)} images in {path} are not in {train.root}")
            if not idx:
                raise ValueError(f"no image named in {path} is in {train.root}")
            return idx
        if self.labelled_fraction is None or self.labelled_fraction == 1.0:
            return list(range(len(train)))
        return balanced_fraction(train.targets, self.labelled_fraction, self.fraction_seed)

    def _labelled_train_dataset(self) -> Dataset:
        train = self._base_dataset("train")
        if self.labelled_fraction is None and self.labelled_list is None:
            return train
        return Subset(train, self.labelled_indices())
