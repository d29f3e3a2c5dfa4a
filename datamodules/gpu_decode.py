"""Decoding on the accelerator (``gpu_decode=True``): the workers ship each image's encoded file bytes,
and ``decode_batch`` decodes a batch on the device (``torchvision.io.decode_jpeg``, batched with nvjpeg
on CUDA; the same function on the CPU elsewhere) and squashes it to the square the on-device
augmentation (``GPUAugment``) takes.

* Bytes source (``read_encoded``): a ``RobustImageFolder`` (in ``Subset``s or not) gives its files;
  any dataset with ``encoded(index) -> (bytes, label)`` (``EncodedDataset``, e.g. shards) gives its
  records. Other datasets (CIFAR-10 binaries, tensors in memory) have no bytes to ship.
* Unreadable files, in two stages. The worker checks each JPEG cheaply (an end-of-image marker after
  its last scan): a truncated or empty file is replaced by the next readable sample with the one
  warning of ``unreadable.py``, as the CPU path does. On the device, a JPEG that ``decode_jpeg``
  rejects there and every other format (PNG, ...) are decoded on the CPU by PIL (``load_rgb``, as the
  CPU path converts modes), then moved; a file that no decoder reads is replaced by the next image of
  its batch, label included, with one warning per file.
* The bytes stay in host memory: ``decode_jpeg`` reads its input from the host (nvjpeg stages it in
  its own pinned buffers), so the batch's ``EncodedBatch`` is no tensor, collection or dataclass, and
  neither the loader's pinning nor Lightning's transfer copies it.
* Each image is resized to the square (bilinear, antialiased; ``resize_square``), images of one size
  in one call; the original ``(height, width)`` go to the augmenter, which draws crops in original
  pixels.

``torchvision.io``'s decoders are deprecated since torchvision 0.29 in favor of TorchCodec.
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision.io import ImageReadMode, decode_jpeg

from lightning_ssl.datamodules.image_folder import RobustImageFolder, load_rgb
from lightning_ssl.datamodules.two_views import split_key
from lightning_ssl.datamodules.unreadable import load_skipping_unreadable, summarize

__all__ = [
    "ENCODED_KEY",
    "EncodedBatch",
    "EncodedDataset",
    "EncodedViewsDataset",
    "collate_encoded",
    "decode_batch",
    "decode_images",
    "jpeg_problem",
    "read_encoded",
    "resize_square",
]

ENCODED_KEY = "encoded_images"  # marks a batch still to be decoded (then augmented) on the device
_SOI, _SOS, _EOI = b"\xff\xd8\xff", b"\xff\xda", b"\xff\xd9"
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # as image_folder
_NEEDS_BYTES = "gpu_decode needs an image folder or shards (a dataset with encoded(index) -> (bytes, label))"


@runtime_checkable
class EncodedDataset(Protocol):
    def encoded(self, index: int) -> tuple[bytes, int]:
        """The encoded image file (JPEG, PNG, ...) of sample ``index``, and its label."""
        ...


def _unwrap(dataset: Dataset, index: int) -> tuple[Dataset, int]:
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, int(dataset.indices[index])
    return dataset, index


def _source(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset``s, checked to hold encoded bytes."""
    inner = dataset
    while isinstance(inner, Subset):
        inner = inner.dataset
    if not isinstance(inner, (EncodedDataset, RobustImageFolder)):
        raise ValueError(f"{_NEEDS_BYTES}; got {type(inner).__name__}")
    return inner


def read_encoded(dataset: Dataset, index: int) -> tuple[bytes, int]:
    """``(encoded file bytes, label)`` of ``dataset[index]``: ``encoded(index)``, or the file of a
    ``RobustImageFolder``'s ``samples[index]``, through any ``Subset``s (no check, no skipping)."""
    inner, index = _unwrap(dataset, index)
    if isinstance(inner, EncodedDataset):
        return inner.encoded(index)
    if isinstance(inner, RobustImageFolder):
        path, label = inner.samples[index]
        with open(path, "rb") as f:
            return f.read(), label
    raise ValueError(f"{_NEEDS_BYTES}; got {type(inner).__name__}")


def jpeg_problem(data: bytes) -> str | None:
    """Why ``data`` cannot be a whole image, checked without decoding (None: no problem found): empty,
    or a JPEG whose last scan (SOS marker) is not followed by the end-of-image marker (a cut file; the
    markers cannot occur inside a scan's entropy-coded data). Other formats are not checked here."""
    if len(data) == 0:
        return "empty file"
    if data.startswith(_SOI):
        sos = data.rfind(_SOS)
        if sos < 0 or data.find(_EOI, sos) < 0:
            return "truncated JPEG: no end-of-image marker after its last scan"
    return None


def _checked(data: bytes) -> bytes:
    problem = jpeg_problem(data)
    if problem is not None:
        raise OSError(problem)
    return data


def _read_file(path: str) -> tuple[str, bytes]:
    with open(path, "rb") as f:
        return path, _checked(f.read())


class _Records:
    """``(key, label)`` pairs of an ``EncodedDataset``, for ``load_skipping_unreadable`` (the label is
    read with the bytes, by ``read``)."""

    def __init__(self, dataset: EncodedDataset):
        self.dataset, self.name = dataset, type(dataset).__name__

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return f"{self.name}[{index}]", -1

    def read(self, index: int) -> tuple[str, bytes, int]:
        data, label = self.dataset.encoded(index)
        return self[index][0], _checked(data), label


class EncodedViewsDataset(Dataset):
    """Encoded image bytes (``1-D uint8``) with their labels and seeds, for the on-device decoding path.

    Over a ``RobustImageFolder`` (in ``Subset``s or not), a file that fails ``jpeg_problem`` is replaced
    by the next readable file with the folder's one warning (``bad_files``, ``strict``, ``max_retries``);
    over an ``EncodedDataset``, by the next readable record (this dataset's ``bad_files``).
    """

    def __init__(self, dataset: Dataset, max_retries: int = 50):
        self.dataset, self.source = dataset, _source(dataset)
        self.max_retries, self.bad_files = max_retries, []

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> tuple[str, bytes, int]:
        """``(file name, bytes, label)`` of sample ``index``, or of the next readable one."""
        inner, index = _unwrap(self.dataset, index)
        if isinstance(inner, EncodedDataset):
            records = _Records(inner)
            (name, data, label), _ = load_skipping_unreadable(
                records,
                index,
                records.read,
                (OSError,),
                kind="image",
                bad_files=self.bad_files,
                strict=False,
                max_retries=self.max_retries,
                root=records.name,
            )
            return name, data, label
        (name, data), label = load_skipping_unreadable(
            inner.samples,
            index,
            lambda i: _read_file(inner.samples[i][0]),
            (OSError,),
            kind="image",
            bad_files=inner.bad_files,
            strict=inner.strict,
            max_retries=inner.max_retries,
            root=inner.root,
        )
        return name, data, label

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = split_key(key)
        name, data, label = self.read(index)
        return {
            ENCODED_KEY: torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "name": name,
            "target": label,
            "seed": -1 if seed is None else seed,
        }


class EncodedBatch:
    """A batch's encoded images, packed: ``data`` (all bytes, ``1-D uint8``), ``offsets`` (``N + 1``;
    image ``i`` is ``data[offsets[i]:offsets[i + 1]]``) and ``names`` (for messages). Deliberately a
    plain object, so that the loader's pinning and Lightning's transfer leave it in host memory."""

    __slots__ = ("data", "offsets", "names")

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor, names: list[str]):
        self.data, self.offsets, self.names = data, offsets, names

    def __len__(self) -> int:
        return len(self.names)

    def tensors(self) -> list[torch.Tensor]:
        """One ``1-D uint8`` view per image (no copy)."""
        return list(self.data.split(self.offsets.diff().tolist()))


def collate_encoded(samples: list[dict]) -> dict:
    """``EncodedViewsDataset`` items -> ``{ENCODED_KEY: EncodedBatch, "target": N, "seed": N}``."""
    blobs = [s[ENCODED_KEY] for s in samples]
    offsets = torch.zeros(len(blobs) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor([b.numel() for b in blobs]), 0, out=offsets[1:])
    return {
        ENCODED_KEY: EncodedBatch(torch.cat(blobs), offsets, [s["name"] for s in samples]),
        "target": torch.tensor([s["target"] for s in samples]),
        "seed": torch.tensor([s["seed"] for s in samples]),
    }


def _pil_decode(blob: torch.Tensor) -> torch.Tensor:
    """``3 x H x W`` uint8 of any format PIL reads, converted as the CPU path converts (``load_rgb``)."""
    image = load_rgb(io.BytesIO(blob.numpy().tobytes()))
    w, h = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def _decode_jpegs(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """``decode_jpeg`` for ``device``: one batched call with nvjpeg on CUDA; one image at a time where
    that fails (one bad image fails the batched call), and on the CPU for other devices (then moved).
    None where an image does not decode."""
    if not blobs:
        return []
    cuda = device.type == "cuda"
    if cuda:
        try:
            return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    out: list[torch.Tensor | None] = []
    for blob in blobs:
        try:
            out.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device if cuda else "cpu").to(device))
        except RuntimeError:
            out.append(None)
    return out


def decode_images(
    blobs: list[torch.Tensor], device: torch.device | str
) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Each encoded image as ``3 x H x W`` uint8 RGB on ``device`` (None where it does not decode), and
    the errors by position: JPEGs with ``decode_jpeg`` on the device, the rest (and the JPEGs it
    rejects) with PIL on the CPU."""
    device = torch.device(device)
    jpeg = [i for i, b in enumerate(blobs) if b.numel() >= 3 and bytes(b[:3].tolist()) == _SOI]
    images: list[torch.Tensor | None] = [None] * len(blobs)
    for i, image in zip(jpeg, _decode_jpegs([blobs[i] for i in jpeg], device)):
        images[i] = image
    errors: dict[int, str] = {}
    for i, blob in enumerate(blobs):
        if images[i] is None:
            try:
                images[i] = _pil_decode(blob).to(device)
            except _PIL_ERRORS as err:
                errors[i] = f"{type(err).__name__}: {err}"
    return images, errors


def resize_square(images: list[torch.Tensor], size: int, in_float: bool | None = None) -> torch.Tensor:
    """``N x 3 x size x size`` uint8: each image squashed to the square with an antialiased bilinear
    resize, the images of one size in one call. ``in_float`` (default: except on the CPU) resizes in
    float and rounds, as ``FixedSizeUint8`` resizes tensors (CUDA has no uint8 kernel); otherwise
    torch's uint8 kernel (PIL's algorithm, as ``FixedSizeUint8`` resizes PIL images) runs on the
    decoders' channels-last layout, kept in the result."""
    uint8 = images[0].device.type == "cpu" if in_float is None else not in_float
    square = (size, size)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[tuple(image.shape[-2:])].append(i)
    out = None
    for hw, positions in groups.items():
        if uint8:  # height x width x 3 in memory: stacked so, without a transposition
            x = torch.stack([images[i].permute(1, 2, 0) for i in positions]).permute(0, 3, 1, 2)
        else:
            x = torch.stack([images[i] for i in positions])
        if hw != square:
            x = F.interpolate(x if uint8 else x.float(), square, mode="bilinear", antialias=True)
            x = x if uint8 else x.round_().clamp_(0, 255).to(torch.uint8)
        if len(groups) == 1:
            return x
        if out is None:
            layout = torch.channels_last if uint8 else torch.contiguous_format
            out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=x.device, memory_format=layout)
        out[positions] = x
    return out


def decode_batch(
    batch: EncodedBatch, size: int, device: torch.device | str, bad_files: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """``(N x 3 x size x size uint8 images, N x 2 original (height, width), source)`` on ``device``.

    An image that no decoder reads is replaced by the next one of the batch that decodes, warned about
    once per file (``bad_files``); ``source`` then gives, per position, the image it holds (to pick the
    labels), else it is None.
    """
    images, errors = decode_images(batch.tensors(), device)
    source = None
    if errors:
        good = [i for i in range(len(images)) if i not in errors]
        if not good:
            raise RuntimeError(f"no image of the batch decodes: {summarize(batch.names)}; check the dataset")
        bad_files = [] if bad_files is None else bad_files
        source = list(range(len(images)))
        for i, error in errors.items():
            source[i] = next((j for j in good if j > i), good[0])
            images[i] = images[source[i]]
            if batch.names[i] not in bad_files:
                bad_files.append(batch.names[i])
                warnings.warn(
                    f"cannot decode image {batch.names[i]} ({error}); replaced by another image of its batch "
                    f"({len(bad_files)} undecodable file(s) so far in this process)",
                    stacklevel=2,
                )
    sizes = torch.tensor([list(image.shape[-2:]) for image in images]).to(torch.device(device))
    return resize_square(images, size), sizes, source
