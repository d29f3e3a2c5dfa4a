"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 images in 10 classes.

Reads either torchvision's binaries (``root/cifar-10-batches-py``; downloaded only with
``download=True``) or an ImageFolder tree (``root/train/<class>/*.jpg``, ``root/test/<class>/*.jpg``,
like the project's JPEG copy). SimCLR's CIFAR-10 recipe (appendix B.9): jitter strength 0.5,
no blur, 32x32 views.

``in_memory=True`` decodes the images once into a uint8 tensor (150 MB for the whole set); with
``gpu_augment=True`` whole batches are then gathered from it and the views made on the device, and
``resident_device="cuda"`` keeps the tensor on the accelerator (no transfer per batch).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Subset

from lightning_ssl.datamodules.augmentations import CIFAR10_MEAN, CIFAR10_STD
from lightning_ssl.datamodules.image_folder import RobustImageFolder
from lightning_ssl.datamodules.in_memory import balanced_subset, load_images
from lightning_ssl.datamodules.shards import ShardedImageFolder, join_url
from lightning_ssl.datamodules.two_view_datamodule import TwoViewDataModule, Uint8ViewsDataset
from lightning_ssl.datamodules.two_views import TensorImageDataset

__all__ = ["CIFAR10DataModule"]

_BINARY_DIR = "cifar-10-batches-py"
_LAYOUTS = (
    "expected either torchvision's binaries (<root>/cifar-10-batches-py/data_batch_1 ...; pass download=True "
    "to fetch them) or an image tree (<root>/<train_split>/<class>/*.jpg and <root>/<val_split>/<class>/*.jpg)"
)


class CIFAR10DataModule(TwoViewDataModule):
    """Two-view CIFAR-10 batches ``([view1, view2], label)`` and labeled ``(images, labels)`` loaders.

    Args:
        root: folder holding ``cifar-10-batches-py`` or the ``train``/``test`` image folders.
        shards: instead of ``root``, the folder or URL of the JPEG tree's shards made by
            ``lightning-ssl prepare image-folder ROOT OUT --splits train test`` (docs/data.md).
        storage_options, shard_cache_dir, shard_fetch: for shards on an object store (see
            ``ImageNetDataModule``).
        source: ``"auto"`` (shards if given, else binaries if present, else folders), ``"binary"``,
            ``"folder"`` or ``"shards"``.
        download: fetch the binaries into ``root`` if they are missing (never done otherwise).
        train_split, val_split: image-tree split folder names.
        train_per_class, val_per_class: keep the first ``n`` images of each class (a deterministic,
            balanced subset, for quick runs); ``None`` keeps all.
        in_memory: decode the images once into a uint8 tensor (see the module docstring).
        resident_device: with ``in_memory`` and ``gpu_augment``, the device that holds the images.
        strict, verify, index_cache: see ``RobustImageFolder``.
        Others: see ``TwoViewDataModule``.
    """

    def __init__(
        self,
        root: str = "~/.cache/lightning-ssl/cifar10-jpg",
        shards: str | None = None,
        storage_options: dict | None = None,
        shard_cache_dir: str | None = None,
        shard_fetch: str = "chunk",
        source: str = "auto",
        download: bool = False,
        train_split: str = "train",
        val_split: str = "test",
        train_per_class: int | None = None,
        val_per_class: int | None = None,
        in_memory: bool = False,
        resident_device: str | None = None,
        batch_size: int = 512,
        image_size: int = 32,
        strength: float = 0.5,
        small_image: bool = True,
        gpu_load_size: int | None = 32,
        eval_batch_size: int = 512,
        strict: bool = False,
        verify: str = "header",
        index_cache: bool = True,
        **kwargs,
    ):
        super().__init__(
            batch_size=batch_size,
            image_size=image_size,
            strength=strength,
            small_image=small_image,
            gpu_load_size=gpu_load_size,
            eval_resize=image_size,
            eval_crop=image_size,
            eval_batch_size=eval_batch_size,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            **kwargs,
        )
        if source not in ("auto", "binary", "folder", "shards"):
            raise ValueError(f"source must be 'auto', 'binary', 'folder' or 'shards', got {source!r}")
        if source == "shards" and shards is None:
            raise ValueError("source='shards' needs shards=<folder or URL made by lightning-ssl prepare>")
        if resident_device is not None and not (in_memory and self.gpu_augment and self.num_workers == 0):
            raise ValueError("resident_device needs in_memory=True, gpu_augment=True and num_workers=0")
        self.root = Path(root).expanduser()
        self.source, self.download = source, download
        self.shards, self.storage_options, self.shard_cache_dir = shards, storage_options, shard_cache_dir
        self.shard_fetch = shard_fetch
        self.splits = {"train": train_split, "val": val_split}
        self.per_class = {"train": train_per_class, "val": val_per_class}
        self.in_memory, self.resident_device = in_memory, resident_device
        self.tensor_images = in_memory
        self.strict, self.verify, self.index_cache = strict, verify, index_cache
        self._datasets: dict[str, Dataset] = {}
        self._decoded: dict[str, Dataset] = {}

    def _resolved_source(self) -> str:
        if self.source != "auto":
            return self.source
        if self.shards is not None:
            return "shards"
        if (self.root / _BINARY_DIR).is_dir() or self.root.name == _BINARY_DIR:
            return "binary"
        if (self.root / self.splits["train"]).is_dir():
            return "folder"
        if self.download:
            return "binary"
        raise FileNotFoundError(f"no CIFAR-10 data at {self.root}; {_LAYOUTS}")

    def _decoded_dataset(self, split: str) -> Dataset:
        """``(RGB PIL image, label)`` pairs of a split, from the binaries or the image tree."""
        if split not in self._decoded:
            self._decoded[split] = self._open(split)
        return self._decoded[split]

    def _open(self, split: str) -> Dataset:
        if self._resolved_source() == "binary":
            from torchvision.datasets import CIFAR10

            root = self.root.parent if self.root.name == _BINARY_DIR else self.root
            try:
                return CIFAR10(str(root), train=split == "train", download=self.download)
            except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
                raise FileNotFoundError(f"CIFAR-10 binaries not found or corrupted in {root}; {_LAYOUTS}") from err
        classes = None if split == "train" else self._decoded_dataset("train").classes
        if self._resolved_source() == "shards":
            return ShardedImageFolder(
                join_url(self.shards, self.splits[split]),
                classes=classes,
                storage_options=self.storage_options,
                cache_dir=self.shard_cache_dir,
                fetch=self.shard_fetch,
                strict=self.strict,
            )
        folder = self.root / self.splits[split]
        if not folder.is_dir():
            raise FileNotFoundError(f"split folder {folder} does not exist; {_LAYOUTS}")
        return RobustImageFolder(
            folder, classes=classes, strict=self.strict, verify=self.verify, index_cache=self.index_cache
        )

    def _base_dataset(self, split: str) -> Dataset:
        if split in self._datasets:
            return self._datasets[split]
        dataset = self._decoded_dataset(split)
        if self.per_class[split] is not None:
            dataset = Subset(dataset, balanced_subset(dataset.targets, self.per_class[split]))
        if self.in_memory:
            dataset = TensorImageDataset(*load_images(dataset))
        self._datasets[split] = dataset
        return dataset

    def pretrain_dataset(self) -> Dataset:
        if self.resident_device is None:
            return super().pretrain_dataset()
        return Uint8ViewsDataset(self._base_dataset("train").to(self.resident_device), self.gpu_load_size)

    def setup(self, stage: str | None = None) -> None:
        self._base_dataset("train")
