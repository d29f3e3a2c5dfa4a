"""What the image datamodules share: multi-view pretraining loaders made on the CPU (in the
workers) or on the accelerator (``gpu_augment=True``), and un-augmented labeled loaders, all from
one augmentation recipe (``lightning_ssl.datamodules.augmentations``).

A subclass implements ``_base_dataset(split)`` returning ``(image, label)`` pairs, the image an RGB
PIL image or, for datasets held in memory (``tensor_images = True``), a ``3 x H x W`` uint8 tensor.

With ``gpu_augment=True`` the loader ships fixed-size uint8 images (decoded and resized in the
workers, or gathered from memory a whole batch at a time) and each image's original size;
``on_after_batch_transfer`` then makes the views on the device with ``GPUAugment`` (same
distributions as the CPU recipe).

With ``gpu_decode=True`` as well, the workers do not decode: they ship each image's encoded file
bytes, and ``on_after_batch_transfer`` decodes the batch on the device first (``gpu_decode.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_ssl.datamodules.augmentations import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewConfig,
    cpu_view_transform,
    eval_transform,
    multi_crop,
    preset,
    tensor_eval_transform,
    tensor_view_transform,
)
from lightning_ssl.datamodules.gpu_augment import GPUAugment
from lightning_ssl.datamodules.gpu_decode import ENCODED_KEY, EncodedViewsDataset, collate_encoded, decode_batch
from lightning_ssl.datamodules.resumable import ResumableDataLoader
from lightning_ssl.datamodules.two_views import MultiViewDataset, TensorImageDataset, split_key

__all__ = ["TwoViewDataModule", "FixedSizeUint8", "TransformedDataset", "Uint8ViewsDataset", "UINT8_KEY"]

UINT8_KEY = "uint8_images"  # marks a batch still to be augmented on the device

# While fitting, val_dataloader is deliberately empty (KNNMonitor evaluates during fit; the labeled
# split serves `validate`): Lightning's notice about an empty validation loader says nothing useful.
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")


class FixedSizeUint8:
    """PIL image or uint8 tensor -> ``(3 x S x S uint8 tensor, tensor([height, width]))``: the image
    squashed to a square (the on-device crop is drawn in original pixels, so the aspect ratio is
    restored there)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(image, torch.Tensor):
            h, w = image.shape[-2:]
            if (h, w) != (self.size, self.size):
                resized = F.interpolate(image[None].float(), (self.size, self.size), mode="bilinear", antialias=True)
                image = resized[0].round().clamp(0, 255).to(torch.uint8)
            return image.contiguous(), torch.tensor([h, w])
        w, h = image.size
        if (w, h) != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR, reducing_gap=3.0)
        t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return t.permute(2, 0, 1).contiguous(), torch.tensor([h, w])


class TransformedDataset(Dataset):
    """``(transform(image), label)`` over a dataset of ``(image, label)``."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), label


class Uint8ViewsDataset(Dataset):
    """Fixed-size uint8 images with their original sizes, for the on-device path. Over an in-memory
    ``TensorImageDataset`` of the right size, whole batches are gathered at once (``__getitems__``)."""

    def __init__(self, dataset: Dataset, size: int):
        self.dataset, self.to_uint8 = dataset, FixedSizeUint8(size)
        self.batched = (
            isinstance(dataset, TensorImageDataset)
            and dataset.transform is None
            and tuple(dataset.images.shape[-2:]) == (size, size)
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = split_key(key)
        image, label = self.dataset[index]
        pixels, size = self.to_uint8(image)
        return {UINT8_KEY: pixels, "sizes": size, "target": label, "seed": -1 if seed is None else seed}

    def __getitems__(self, keys: list):
        if not self.batched:
            return [self[key] for key in keys]
        indices, seeds = zip(*(split_key(key) for key in keys))
        idx = torch.as_tensor(indices, device=self.dataset.images.device)
        images = self.dataset.images[idx]
        sizes = torch.tensor(images.shape[-2:], device=images.device).expand(len(indices), 2)
        seeds = torch.tensor([-1 if s is None else s for s in seeds])
        return [{UINT8_KEY: images, "sizes": sizes, "target": self.dataset.labels[idx], "seed": seeds}]


def _collate_uint8(samples: list[dict]):
    """Default collation, except that one already-batched dict (``Uint8ViewsDataset.__getitems__``) passes."""
    if len(samples) == 1 and samples[0][UINT8_KEY].ndim == 4:
        return samples[0]
    return torch.utils.data.default_collate(samples)


class TwoViewDataModule(pl.LightningDataModule):
    """Base class of the image datamodules (see the module docstring).

    Args:
        batch_size: per process; ``drop_last`` drops the ragged last pretraining batch.
        num_workers: loader worker processes.
        augmentation: a preset of ``lightning_ssl.datamodules.augmentations`` (simclr, moco_v1,
            moco_v2, byol, seed, digits).
        image_size: side of the views.
        strength: color jitter strength ``s``.
        small_image: drop the blur (small-image variant of the recipe).
        gpu_augment: make the views on the accelerator instead of in the workers.
        gpu_load_size: side of the square uint8 images shipped when ``gpu_augment`` is on
            (default ``image_size x 8 / 7``: 256 for 224).
        gpu_decode: with ``gpu_augment``, ship the training images' encoded file bytes and decode them
            on the device (``torchvision.io.decode_jpeg``, batched with nvjpeg on CUDA; on the CPU
            elsewhere), then resize them to ``gpu_load_size`` there. Needs an image folder or a
            dataset with ``encoded(index)`` (``gpu_decode.EncodedDataset``); non-JPEG files and JPEGs
            nvjpeg rejects are decoded by PIL on the CPU of the training process, so it suits JPEG
            datasets. The views equal ``gpu_augment``'s alone up to decoder and resize rounding
            (``tests/test_gpu_decode.py``). Labeled (evaluation) loaders still decode in the workers.
        eval_resize, eval_crop: evaluation transform (resize shorter side, center crop; None skips).
        eval_batch_size: batch size of the labeled loaders.
        mean, std: normalization of every view and of the evaluation images.
        pin_memory: default: when CUDA is available.
        predict_split: the split ``lightning-ssl predict`` embeds.

    Multi-crop (``augmentations.multi_crop``; Caron et al. 2020): methods receive the global views
    first, then the local ones.
        global_crops: number of views of side ``image_size`` (the recipe's views, cycled).
        local_crops: number of views of side ``local_size`` (0: none, the recipe's two views).
        local_size: side of the local views (96 in SwAV and DINO at 224).
        global_scale: crop scale of the global views (default: the recipe's).
        local_scale: crop scale of the local views.
    """

    tensor_images = False  # True: _base_dataset yields uint8 tensors instead of PIL images

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 4,
        augmentation: str = "simclr",
        image_size: int = 224,
        strength: float = 1.0,
        small_image: bool = False,
        gpu_augment: bool = False,
        gpu_load_size: int | None = None,
        gpu_decode: bool = False,
        drop_last: bool = True,
        eval_resize: int | None = 256,
        eval_crop: int | None = 224,
        eval_batch_size: int = 256,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        pin_memory: bool | None = None,
        predict_split: str = "val",
        global_crops: int = 2,
        local_crops: int = 0,
        local_size: int = 96,
        global_scale: tuple[float, float] | None = None,
        local_scale: tuple[float, float] = (0.05, 0.4),
    ):
        super().__init__()
        # every constructor argument of the class chain, for the run config (RunSummary logs them as data/...;
        # not merged by Lightning, which would refuse keys that the method shares, such as small_image)
        self.save_hyperparameters(logger=False)
        for key in [k for k, v in self.hparams.items() if isinstance(v, torch.Tensor)]:
            del self.hparams[key]
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.eval_batch_size = eval_batch_size
        if predict_split not in ("train", "val"):
            raise ValueError(f"predict_split must be 'train' or 'val', got {predict_split!r}")
        self.predict_split = predict_split
        recipe = preset(augmentation, image_size, strength, small_image, mean, std)
        self.views: list[ViewConfig] = multi_crop(
            recipe, global_crops, local_crops, local_size, global_scale, local_scale
        )
        self.global_crops, self.local_crops = global_crops, local_crops
        if gpu_decode and not gpu_augment:
            raise ValueError("gpu_decode needs gpu_augment=True (the views are made on the device after decoding)")
        self.gpu_augment, self.gpu_decode = gpu_augment, gpu_decode
        # default: the views' size x 8/7 (256 for 224-pixel views), as the evaluation resize
        self.gpu_load_size = gpu_load_size or round(image_size * 8 / 7)
        self.eval_resize, self.eval_crop = eval_resize, eval_crop
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.augmenter = self._make_augmenter() if gpu_augment else None
        self._augment_generator: torch.Generator | None = None
        self._batch_seed = -1
        self._undecodable: list[str] = []  # files no decoder read on the device, in this process

    # ---------------------------------------------------------------- to implement
    def _base_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def _labeled_train_dataset(self) -> Dataset:
        return self._base_dataset("train")

    # ---------------------------------------------------------------- loaders
    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, collate_fn: Callable | None = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
        )

    def view_transforms(self) -> list[Callable]:
        """One CPU transform per view, for PIL images or uint8 tensors as ``_base_dataset`` yields."""
        build = tensor_view_transform if self.tensor_images else cpu_view_transform
        return [build(v) for v in self.views]

    def pretrain_dataset(self) -> Dataset:
        """The multi-view training set: ``([view1, view2], label)`` or, with ``gpu_augment``, uint8 dicts
        (encoded bytes with ``gpu_decode``)."""
        base = self._base_dataset("train")
        if self.gpu_decode:
            return EncodedViewsDataset(base)
        if self.gpu_augment:
            return Uint8ViewsDataset(base, self.gpu_load_size)
        return MultiViewDataset(base, self.view_transforms())

    def train_dataloader(self) -> DataLoader:
        """Shuffled multi-view batches from a ``ResumableDataLoader``: checkpoints hold the position in the
        epoch, and each sample's views depend on the seed, the epoch and the sample only."""
        dataset = self.pretrain_dataset()
        if self.gpu_decode and not isinstance(dataset, EncodedViewsDataset):
            raise ValueError(f"gpu_decode needs an image folder or shards; got a {type(dataset).__name__}")
        collate = collate_encoded if isinstance(dataset, EncodedViewsDataset) else None
        collate = _collate_uint8 if isinstance(dataset, Uint8ViewsDataset) else collate
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and (UINT8_KEY in batch or ENCODED_KEY in batch):
            self._batch_seed = int(batch.pop("seed")[0])  # on the host: no device synchronization
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Makes the views on the device when the loader shipped uint8 images (or encoded ones, decoded
        first, on the batch's device), with a generator seeded from the batch's first sample (so views
        depend on the samples only, as on the CPU path)."""
        if isinstance(batch, dict) and ENCODED_KEY in batch:
            target = batch["target"]
            encoded = batch[ENCODED_KEY]
            images, sizes, source = decode_batch(encoded, self.gpu_load_size, target.device, self._undecodable)
            if source is not None:  # undecodable images replaced by others of the batch: their labels too
                target = target[torch.tensor(source, device=target.device)]
            batch = {UINT8_KEY: images, "sizes": sizes, "target": target}
        if isinstance(batch, dict) and UINT8_KEY in batch:
            images = batch[UINT8_KEY]
            augmenter = self.augmenter or self._make_augmenter()
            self.augmenter = augmenter.to(images.device)
            return self.augmenter(images, batch["sizes"], self._generator(images.device)), batch["target"]
        return batch

    def _make_augmenter(self) -> GPUAugment:
        """The on-device augmenter; multi-crop's local views are made in one batched call."""
        return GPUAugment(self.views, group_identical=self.local_crops > 0)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The on-device augmentation generator, seeded for this batch (a fresh seed per call outside a
        ``ResumableDataLoader``)."""
        if self._augment_generator is None or self._augment_generator.device != device:
            self._augment_generator = torch.Generator(device=device)
        seed = self._batch_seed if self._batch_seed >= 0 else int(torch.randint(2**62, ()).item())
        self._augment_generator.manual_seed(seed)
        self._batch_seed = -1
        return self._augment_generator

    def val_dataloader(self) -> DataLoader | list:
        """The labeled validation split for ``validate`` (kNN top-1); none while fitting (``KNNMonitor``
        evaluates there, when configured)."""
        if self.trainer is not None and self.trainer.state.fn == "validate":
            return self.labeled_dataloader("val")
        return []

    def predict_dataloader(self) -> DataLoader:
        """The labeled ``predict_split`` ("val" unless changed) for ``predict``: embeddings and labels."""
        return self.labeled_dataloader(self.predict_split)

    def labeled_dataloader(self, split: str, augment: bool = False) -> DataLoader:
        """Un-augmented ``(images, labels)`` of ``split`` ("train" or "val"), for kNN and linear probes.
        ``augment=True`` (train only) gives the ``linear_eval`` recipe's views (random resized crop and
        flip) for linear evaluation and fine-tuning, shuffled."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        dataset = self._labeled_train_dataset() if split == "train" else self._base_dataset("val")
        if augment:
            if split != "train":
                raise ValueError("augment=True is for the training split only")
            (view,) = preset("linear_eval", self.views[0].size, mean=self.mean, std=self.std)
            transform = (tensor_view_transform if self.tensor_images else cpu_view_transform)(view)
            return self._loader(TransformedDataset(dataset, transform), self.eval_batch_size, True, False)
        build = tensor_eval_transform if self.tensor_images else eval_transform
        transform = build(self.eval_resize, self.eval_crop, self.mean, self.std)
        return self._loader(TransformedDataset(dataset, transform), self.eval_batch_size, False, False)
