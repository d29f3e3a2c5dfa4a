"""Cityscapes (Cordts et al. 2016) from a local copy in the official layout; nothing is downloaded.

    <root>/leftImg8bit/{train,val,test,train_extra}/<city>/<name>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png

Two modes:

* ``"ssl"``: two-view batches ``([view1, view2], -1)`` of unlabeled images from ``train`` (and
  ``train_extra`` with ``use_train_extra=True``) for pretraining, with SimCLR's recipe.
* ``"segmentation"``: ``(image, mask)`` batches, masks in the 19 evaluation classes (trainIds,
  255 = ignored) of cityscapesScripts' ``labels.py``; training uses a joint random scale, crop and
  flip, ``num_labeled`` keeps a fixed random subset of the labeled training images.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from lightning_ssl.datamodules.augmentations import preset, tensor_view_transform
from lightning_ssl.datamodules.resumable import ResumableDataLoader
from lightning_ssl.datamodules.shards import ShardedCityscapes, join_url
from lightning_ssl.datamodules.two_views import MultiViewDataset

__all__ = [
    "CityscapesDataModule",
    "CityscapesImages",
    "CityscapesSegmentation",
    "CITYSCAPES_CLASSES",
    "LABEL_ID_TO_TRAIN_ID",
    "label_ids_to_train_ids",
    "cityscapes_pairs",
    "cityscapes_ssl_views",
    "IGNORE_INDEX",
]

IGNORE_INDEX = 255
# cityscapesScripts/helpers/labels.py: (labelId, trainId) of the 19 classes used for evaluation;
# every other labelId (void classes, 'guard rail', 'bridge', 'tunnel', 'polegroup', 'caravan',
# 'trailer', 'license plate') has trainId 255.
LABEL_ID_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
MEAN, STD = (0.287, 0.325, 0.284), (0.187, 0.190, 0.187)  # Cityscapes train images, in [0, 1]
_LAYOUT = (
    "expected <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and, for labels, "
    "<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png (the official Cityscapes layout)"
)

_LUT = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
for _label_id, _train_id in LABEL_ID_TO_TRAIN_ID.items():
    _LUT[_label_id] = _train_id


def label_ids_to_train_ids(label_ids: torch.Tensor) -> torch.Tensor:
    """Map a uint8 labelId map to trainIds (0..18, 255 ignored), any shape."""
    return _LUT[label_ids.long()]


def _split_dir(root: Path, kind: str, split: str) -> Path:
    path = root / kind / split
    if not path.is_dir():
        raise FileNotFoundError(f"Cityscapes split directory {path} does not exist; {_LAYOUT}")
    return path


def cityscapes_images(root: str | Path, split: str) -> list[Path]:
    """All ``*_leftImg8bit.png`` of a split, sorted."""
    images = sorted(_split_dir(Path(root), "leftImg8bit", split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"no images in {Path(root) / 'leftImg8bit' / split}; {_LAYOUT}")
    return images


def cityscapes_pairs(root: str | Path, split: str, strict: bool = False) -> list[tuple[Path, Path]]:
    """``(image, labelIds)`` path pairs of a split. Images without a label file are skipped with one
    warning naming them, or raise ``FileNotFoundError`` with ``strict=True``."""
    root = Path(root)
    label_dir = _split_dir(root, "gtFine", split)
    pairs, missing = [], []
    for image in cityscapes_images(root, split):
        name = image.name[: -len("_leftImg8bit.png")]
        label = label_dir / image.parent.name / f"{name}_gtFine_labelIds.png"
        (pairs.append((image, label)) if label.is_file() else missing.append(label))
    if missing:
        message = (
            f"{len(missing)} Cityscapes image(s) of split {split!r} have no label file: "
            f"{', '.join(map(str, missing[:5]))}" + (" ..." if len(missing) > 5 else "")
        )
        if strict:
            raise FileNotFoundError(message + f"; {_LAYOUT}")
        warnings.warn(message + "; skipping them (strict=True raises instead)", stacklevel=2)
    if not pairs:
        raise FileNotFoundError(f"no labeled images in split {split!r} under {root}; {_LAYOUT}")
    return pairs


def _read_rgb(path: Path) -> torch.Tensor:
    return decode_image(str(path), mode=ImageReadMode.RGB)


class CityscapesImages(Dataset):
    """Unlabeled images of one or more splits: ``(transform(image), -1)``; from the tree at ``root``,
    or from ``shards`` (one ``ShardedCityscapes`` per split) when given."""

    def __init__(
        self,
        root: str | Path | None,
        splits: tuple[str, ...] = ("train",),
        transform=None,
        shards: list[ShardedCityscapes] | None = None,
    ):
        if shards is not None:
            self.entries = [(split, i) for split in shards for i in range(len(split))]
        else:
            self.entries = [(None, p) for split in splits for p in cityscapes_images(root, split)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        source, item = self.entries[index]
        image = tv_tensors.Image(_read_rgb(item) if source is None else source.image(item))
        return (self.transform(image) if self.transform is not None else image), -1


class CityscapesSegmentation(Dataset):
    """``(image, mask)`` pairs; ``transform`` is applied jointly to the ``tv_tensors`` Image and Mask.
    ``indices`` keeps a subset of the (sorted) labeled images. ``shard`` (a ``ShardedCityscapes`` of the
    split) replaces the tree at ``root``."""

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform=None,
        indices=None,
        strict: bool = False,
        shard: ShardedCityscapes | None = None,
    ):
        pairs = list(range(len(shard))) if shard is not None else cityscapes_pairs(root, split, strict=strict)
        self.pairs = pairs if indices is None else [pairs[int(i)] for i in indices]
        self.transform, self.shard = transform, shard

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        if self.shard is not None:
            image, label_ids = self.shard.image(self.pairs[index]), self.shard.mask(self.pairs[index])
        else:
            image_path, label_path = self.pairs[index]
            image, label_ids = _read_rgb(image_path), decode_image(str(label_path), mode=ImageReadMode.GRAY)
        image = tv_tensors.Image(image)
        mask = tv_tensors.Mask(label_ids_to_train_ids(label_ids[0]))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask.long().as_subclass(torch.Tensor)


def cityscapes_ssl_views(
    size: int = 224, augmentation: str = "simclr", strength: float = 0.5, blur: bool = False
) -> list[v2.Compose]:
    """The pretraining views: a recipe of ``lightning_ssl.datamodules.augmentations`` on the decoded
    uint8 images, normalized with Cityscapes' statistics. Default: SimCLR's (Chen et al. 2020) crops,
    flip, color jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8 and grayscale with p = 0.2, without blur."""
    views = preset(augmentation, size, strength, small_image=not blur, mean=MEAN, std=STD)
    return [tensor_view_transform(v) for v in views]


def segmentation_train_transform(crop_size: int, base_size: int | None, scale_range: tuple[float, float]) -> v2.Compose:
    """Joint random scale (shorter side ``base_size x U(scale_range)``), random crop padded with
    0 / 255, horizontal flip; masks are resized with nearest neighbor."""
    steps = []
    if base_size is not None:
        lo, hi = int(base_size * scale_range[0]), int(base_size * scale_range[1])
        steps.append(v2.RandomResize(max(1, lo), max(lo + 1, hi + 1), antialias=True))
    steps += [
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(MEAN, STD),
    ]
    return v2.Compose(steps)


def segmentation_eval_transform(size: int | None) -> v2.Compose:
    """Optional resize of the shorter side to ``size`` (masks: nearest), then normalization."""
    steps = [v2.Resize(size, antialias=True)] if size is not None else []
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(steps)


class CityscapesDataModule(pl.LightningDataModule):
    """Cityscapes in SSL or segmentation mode (see the module docstring).

    Args:
        root: the directory holding ``leftImg8bit/`` and ``gtFine/``.
        shards: instead of ``root``, the folder or URL of the tree's shards made by ``lightning-ssl
            prepare cityscapes`` (one sub-folder per split; the same samples as the tree).
        storage_options, shard_cache_dir, shard_fetch: for shards on an object store (see
            ``ImageNetDataModule``).
        mode: ``"ssl"`` (two views of unlabeled images) or ``"segmentation"`` (image, mask).
        batch_size, num_workers: loader settings.
        image_size: output size of the SSL views.
        augmentation, strength, blur: the SSL views' recipe (see ``cityscapes_ssl_views``).
        use_train_extra: also pretrain on ``train_extra`` (19,998 coarsely annotated images).
        crop_size: training crop of segmentation mode (512 or 768 on full-resolution Cityscapes).
        base_size: shorter side before the random scale (``None``: the image's own size; 1024 on
            Cityscapes gives the usual 0.5-2.0 x 1024 scaling).
        scale_range: random scale range (0.5, 2.0 as in most Cityscapes training recipes).
        val_size: shorter side of validation images and masks (``None``: full resolution, the
            official protocol; smaller values give an approximate, faster mIoU).
        num_labeled: number of labeled training images kept (a fixed random subset, ``subset_seed``);
            ``None`` keeps all 2,975.
        strict: raise instead of skipping an image whose label file is missing.
    """

    def __init__(
        self,
        root: str | None = None,
        mode: str = "ssl",
        batch_size: int = 32,
        num_workers: int = 4,
        image_size: int = 224,
        augmentation: str = "simclr",
        strength: float = 0.5,
        blur: bool = False,
        use_train_extra: bool = False,
        crop_size: int = 512,
        base_size: int | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        val_size: int | None = None,
        num_labeled: int | None = None,
        subset_seed: int = 0,
        strict: bool = False,
        drop_last: bool = True,
        shards: str | None = None,
        storage_options: dict | None = None,
        shard_cache_dir: str | None = None,
        shard_fetch: str = "chunk",
    ):
        super().__init__()
        if mode not in ("ssl", "segmentation"):
            raise ValueError(f"mode must be 'ssl' or 'segmentation', got {mode!r}")
        if num_labeled is not None and num_labeled < 1:
            raise ValueError(f"num_labeled must be a positive number of images or None, got {num_labeled}")
        if (root is None) == (shards is None):
            raise ValueError("give the Cityscapes tree as root=<folder> or its shards as shards=<folder or URL>")
        root_path = Path(root) if root is not None else None
        if root_path is not None and not root_path.is_dir():
            raise FileNotFoundError(f"Cityscapes root {root_path} does not exist; {_LAYOUT}")
        self.root, self.mode = root_path, mode
        self.shards, self.shard_options = (
            shards,
            dict(storage_options=storage_options, cache_dir=shard_cache_dir, fetch=shard_fetch),
        )
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.augmentation, self.strength, self.blur = augmentation, strength, blur
        self.use_train_extra, self.crop_size, self.base_size = use_train_extra, crop_size, base_size
        self.scale_range, self.val_size = tuple(scale_range), val_size
        self.num_labeled, self.subset_seed, self.strict, self.drop_last = num_labeled, subset_seed, strict, drop_last
        self.num_classes = len(CITYSCAPES_CLASSES)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def labeled_indices(self) -> list[int] | None:
        """Indices (into the sorted labeled training images) of the ``num_labeled`` subset."""
        if self.num_labeled is None:
            return None
        if self.shards is not None:
            total = len(self._shard("train"))
        else:
            total = len(cityscapes_pairs(self.root, "train", strict=self.strict))
        if self.num_labeled > total:
            raise ValueError(f"num_labeled={self.num_labeled} but the training split has only {total} labeled images")
        gen = torch.Generator().manual_seed(self.subset_seed)
        return torch.randperm(total, generator=gen)[: self.num_labeled].sort().values.tolist()

    def _shard(self, split: str) -> ShardedCityscapes | None:
        """The shards of ``split`` when reading shards, else None."""
        if self.shards is None:
            return None
        return ShardedCityscapes(join_url(self.shards, split), **self.shard_options)

    def train_dataset(self) -> Dataset:
        if self.mode == "ssl":
            splits = ("train", "train_extra") if self.use_train_extra else ("train",)
            views = cityscapes_ssl_views(self.image_size, self.augmentation, self.strength, self.blur)
            shards = [self._shard(split) for split in splits] if self.shards is not None else None
            return MultiViewDataset(CityscapesImages(self.root, splits, shards=shards), views)
        return CityscapesSegmentation(
            self.root,
            "train",
            segmentation_train_transform(self.crop_size, self.base_size, self.scale_range),
            indices=self.labeled_indices(),
            strict=self.strict,
            shard=self._shard("train"),
        )

    def train_dataloader(self) -> DataLoader:
        if self.mode == "ssl":  # resumable mid-epoch; views depend on the sample only
            return ResumableDataLoader(
                self.train_dataset(),
                batch_size=self.batch_size,
                drop_last=self.drop_last,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        return self._loader(self.train_dataset(), train=True)

    def val_dataloader(self) -> DataLoader:
        if self.mode == "ssl":
            return []  # no labels to validate on during pretraining
        dataset = CityscapesSegmentation(
            self.root, "val", segmentation_eval_transform(self.val_size), strict=self.strict, shard=self._shard("val")
        )
        return self._loader(dataset, train=False)
