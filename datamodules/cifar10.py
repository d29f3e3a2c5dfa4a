"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 images in 10 classes.

Reads either torchvision's binaries (``root/cifar-10-batches-py``; downloaded only with
``download=True``) or an ImageFolder tree (``root/train/<class>/*.jpg``, ``root/test/<class>/*.jpg``,
like the project's JPEG copy). SimCLR's CIFAR-10 recipe (appendix B.9): jitter strength 0.5,
no blur, 32x32 views.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from datamodules.augmentations import CIFAR10_MEAN, CIFAR10_STD
from datamodules.image_folder import RobustImageFolder
from datamodules.two_view_datamodule import TwoViewDataModule

__all__ = ["CIFAR10DataModule"]

_BINARY_DIR = "cifar-10-batches-py"
_LAYOUTS = (
    "expected either torchvision's binaries (<root>/cifar-10-batches-py/data_batch_1 ...; pass download=True "
    "to fetch them) or an image tree (<root>/<train_split>/<class>/*.jpg and <root>/<val_split>/<class>/*.jpg)"
)


class CIFAR10DataModule(TwoViewDataModule):
    """Two-view CIFAR-10 batches ``([view1, view2], label)`` and labelled ``(images, labels)`` loaders.

    Args:
        root: folder holding ``cifar-10-batches-py`` or the ``train``/``test`` image folders.
        source: ``"auto"`` (binaries if present, else folders), ``"binary"`` or ``"folder"``.
        download: fetch the binaries into ``root`` if they are missing (never done otherwise).
        train_split, val_split: image-tree split folder names.
        Others: see ``TwoViewDataModule`` and ``RobustImageFolder``.
    """

    def __init__(
        self,
        root: str = "~/.cache/lightning-ssl/cifar10-jpg",
        source: str = "auto",
        download: bool = False,
        train_split: str = "train",
        val_split: str = "test",
        batch_size: int = 512,
        num_workers: int = 4,
        drop_last: bool = True,
        augmentation: str = "simclr",
        image_size: int = 32,
        strength: float = 0.5,
        small_image: bool = True,
        gpu_augment: bool = False,
        eval_batch_size: int = 512,
        strict: bool = False,
        verify: str = "header",
        pin_memory: bool | None = None,
    ):
        super().__init__(
            batch_size, num_workers, augmentation, image_size, strength, small_image, gpu_augment, 32,
            drop_last, image_size, image_size, eval_batch_size, CIFAR10_MEAN, CIFAR10_STD,
            pin_memory,
        )
        if source not in ("auto", "binary", "folder"):
            raise ValueError(f"source must be 'auto', 'binary' or 'folder', got {source!r}")
        self.root = Path(root).expanduser()
        self.source, self.download = source, download
        self.splits = {"train": train_split, "val": val_split}
        self.strict, self.verify = strict, verify
        self._datasets: dict[str, Dataset] = {}

    def _resolved_source(self) -> str:
        if self.source != "auto":
            return self.source
        if (self.root / _BINARY_DIR).is_dir() or self.root.name == _BINARY_DIR:
            return "binary"
        if (self.root / self.splits["train"]).is_dir():
            return "folder"
        if self.download:
            return "binary"
        raise FileNotFoundError(f"no CIFAR-10 data at {self.root}; {_LAYOUTS}")

    def _base_dataset(self, split: str) -> Dataset:
        if split in self._datasets:
            return self._datasets[split]
        if self._resolved_source() == "binary":
            from torchvision.datasets import CIFAR10

            root = self.root.parent if self.root.name == _BINARY_DIR else self.root
            try:
                dataset = CIFAR10(str(root), train=split == "train", download=self.download)
            except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
                raise FileNotFoundError(f"CIFAR-10 binaries not found or corrupted in {root}; {_LAYOUTS}") from err
        else:
            folder = self.root / self.splits[split]
            if not folder.is_dir():
                raise FileNotFoundError(f"split folder {folder} does not exist; {_LAYOUTS}")
            classes = None if split == "train" else self._base_dataset("train").classes
            dataset = RobustImageFolder(folder, classes=classes, strict=self.strict, verify=self.verify)
        self._datasets[split] = dataset
        return dataset

    def setup(self, stage: str | None = None) -> None:
        self._base_dataset("train")
