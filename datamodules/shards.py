"""Datasets as shards in Lightning's ``litdata`` streaming format, on a local disk or an object store.

A sharded split is a litdata dataset (``index.json`` and ``chunk-*.bin`` files, written with litdata's
``BinaryWriter``) plus this package's manifest, ``lightning_ssl_shards.json``: the kind of data, the
class names, and the relative path and label of every sample in shard order. The manifest lets a
datamodule build its labeled subsets (class lists, 1%/10% fractions, labeled lists) and shuffle
without reading a single shard; the samples themselves are read on demand, by index, from litdata's
``StreamingDataset``, from a local folder or from S3 (any S3-compatible store), whose chunks are
downloaded whole into a local cache as they are first needed (``ShardReader``).

The datasets here are map-style: the project's ``ResumableDataLoader`` orders and shards them, so a
sharded source gives the same batches, the same per-sample augmentation and the same exact mid-epoch
resume as the folder it was made from, and with several processes each rank reads its own disjoint
part (docs/data.md).

``write_shards`` is resumable: samples are written in parts of ``part_size``; a part is complete when
its record file exists, so an interrupted run starts again at the first incomplete part. The final
``index.json`` and manifest are written last, so a split is readable only when complete.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from lightning_ssl.datamodules.image_folder import DECODE_ERRORS, load_rgb
from lightning_ssl.datamodules.unreadable import load_skipping_unreadable, summarize

__all__ = [
    "MANIFEST",
    "ShardRecord",
    "ShardSummary",
    "write_shards",
    "read_manifest",
    "is_remote",
    "join_url",
    "ShardedImageFolder",
    "ShardedCityscapes",
]

MANIFEST = "lightning_ssl_shards.json"
FORMAT = "lightning-ssl-shards/1"
_PART_PREFIX = ".part-"
_CHUNK_STRIDE = 1_000_000  # chunk numbers of part k start at k x this (unique file names across parts)


def is_remote(url: str | os.PathLike) -> bool:
    """Whether ``url`` names an object store (``s3://...``) rather than a local folder."""
    return "://" in str(url) and not str(url).startswith("file://")


def join_url(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a local path or a URL."""
    base = str(base)
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base).expanduser() / name)


def _litdata():
    try:
        import litdata
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('shards need the litdata package: pip install "lightning-ssl[shards]"') from err
    return litdata


def _read_remote(url: str, storage_options: dict | None) -> bytes:
    """The bytes of one object of an S3-compatible store (``s3://bucket/key``), with boto3 (litdata's
    own S3 client library); ``storage_options`` go to the client, as litdata passes them."""
    if not url.startswith("s3://"):
        raise ValueError(f"cannot read {url}: the manifest of a remote shard folder is read from s3:// URLs only")
    bucket, key = _s3_location(url)
    client = _s3_client(storage_options)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey as err:
        raise FileNotFoundError(f"{url} does not exist") from err


_PREPARE_KIND = {"image_folder": "image-folder", "audio": "audio", "cityscapes": "cityscapes"}


def read_manifest(
    split_url: str | os.PathLike, storage_options: dict | None = None, kind: str | None = None
) -> dict[str, Any]:
    """The manifest of a sharded split (local folder or ``s3://`` URL); with ``kind``, one error unless
    the split holds that kind of data."""
    url = join_url(split_url, MANIFEST)
    hint = "make the shards with `lightning-ssl prepare` (docs/data.md)"
    if is_remote(url):
        try:
            raw = _read_remote(url, storage_options)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"no sharded split at {split_url} ({MANIFEST} missing); {hint}") from err
    else:
        path = Path(url)
        if not path.is_file():
            incomplete = path.parent.is_dir() and any(p.name.startswith(_PART_PREFIX) for p in path.parent.iterdir())
            state = "is incomplete: run the same prepare command again to finish it" if incomplete else "missing"
            raise FileNotFoundError(f"no sharded split at {split_url} ({MANIFEST} {state}); {hint}")
        raw = path.read_bytes()
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{url} is not a lightning-ssl shard manifest (format {manifest.get('format')!r})")
    if kind is not None and manifest["kind"] != kind:
        raise ValueError(
            f"{split_url} holds {manifest['kind']} shards, not {kind} shards "
            f"(made by lightning-ssl prepare {_PREPARE_KIND.get(kind, kind)})"
        )
    return manifest


# ----------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class ShardRecord:
    """One sample to write: its path relative to the source root (for messages and the manifest),
    its label, and the files whose bytes it stores (field name -> absolute path)."""

    path: str
    label: int
    files: dict[str, str]


@dataclass
class ShardSummary:
    """What ``write_shards`` did: samples written, bytes of their files, shard files, skipped files."""

    out_dir: str
    files: int = 0
    bytes: int = 0
    shards: int = 0
    skipped: list[str] = field(default_factory=list)
    resumed_parts: int = 0
    already_complete: bool = False

    def __str__(self) -> str:
        text = f"{self.out_dir}: {self.files} samples, {self.bytes / 1e6:.1f} MB in {self.shards} shard file(s)"
        if self.already_complete:
            text += " (complete already; nothing written)"
        elif self.resumed_parts:
            text += f" ({self.resumed_parts} part(s) kept from an interrupted run)"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable file(s): {summarize(self.skipped)}"
        return text


def _read_record(record: ShardRecord, check: Callable[[str, bytes], None] | None) -> dict[str, Any] | str:
    """The stored item of a record (field -> bytes, plus the label), or the reason it is skipped."""
    item: dict[str, Any] = {}
    for name, path in record.files.items():
        try:
            with open(path, "rb") as f:
                data = f.read()
            if not data:
                return f"{record.path} (empty file)"
            if check is not None:
                check(name, data)
        except Exception as err:  # noqa: BLE001 - any failure to read or decode skips the sample, named
            detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
            return f"{record.path} ({type(err).__name__}: {detail})"
        item[name] = data
    item["label"] = int(record.label)
    return item


def check_image(name: str, data: bytes) -> None:
    """Decode image bytes fully (raises on a truncated or non-image file), as the folder datasets do."""
    load_rgb(io.BytesIO(data))


def _executor(workers: int) -> Executor:
    return ProcessPoolExecutor(workers) if workers > 1 else ThreadPoolExecutor(1)


def write_shards(
    records: Sequence[ShardRecord],
    out_dir: str | os.PathLike,
    *,
    kind: str,
    classes: Sequence[str] | None = None,
    check: Callable[[str, bytes], None] | None = check_image,
    chunk_bytes: str | int = "64MB",
    part_size: int = 4096,
    workers: int | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
    source: str | None = None,
    pre_skipped: Sequence[str] = (),
) -> ShardSummary:
    """Write ``records`` in order as a litdata dataset in ``out_dir`` with the manifest (module docstring).

    ``check(field, bytes)`` (default: a full image decode) runs in ``workers`` processes; a record whose
    file is empty, unreadable or fails the check is skipped and named in the summary (after
    ``pre_skipped``, the files the caller's listing left out). Rerunning with
    the same records resumes after the last complete part; a finished folder is left as it is.
    """
    _litdata()
    from litdata.streaming.writer import BinaryWriter
    from tqdm.auto import tqdm

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    summary = ShardSummary(str(out))
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest["num_records"] == len(records) and manifest["kind"] == kind:
            summary.files, summary.bytes = len(manifest["paths"]), manifest["bytes"]
            summary.shards, summary.skipped = manifest["shards"], manifest["skipped"]
            summary.already_complete = True
            return summary
        raise ValueError(f"{out} already holds other shards ({len(manifest['paths'])} samples); choose another out")
    workers = workers or min(8, os.cpu_count() or 1)
    n_parts = max(1, -(-len(records) // part_size))
    parts: list[dict[str, Any]] = []
    bar = tqdm(total=len(records), desc=f"prepare {out.name}", unit="file", disable=not progress, dynamic_ncols=True)
    with _executor(workers) as pool:
        for k in range(n_parts):
            record_file = out / f"{_PART_PREFIX}{k:06d}.json"
            chunk = records[k * part_size : (k + 1) * part_size]
            if record_file.is_file():
                parts.append(json.loads(record_file.read_text()))
                summary.resumed_parts += 1
                bar.update(len(chunk))
                continue
            writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes, chunk_index=k * _CHUNK_STRIDE)
            kept, skipped, nbytes = [], [], 0
            items = pool.map(_read_record, chunk, [check] * len(chunk), chunksize=16)
            for record, item in zip(chunk, items):
                bar.update(1)
                if isinstance(item, str):
                    skipped.append(item)
                    continue
                writer.add_item(len(kept), item)
                kept.append([record.path, record.label])
                nbytes += sum(len(v) for v in item.values() if isinstance(v, bytes))
            writer.done()
            index_file = out / f"{writer.rank}.index.json"
            chunks = json.loads(index_file.read_text()) if kept else {"chunks": [], "config": None}
            index_file.unlink(missing_ok=True)
            part = {"chunks": chunks["chunks"], "config": chunks["config"], "kept": kept, "skipped": skipped}
            part["bytes"] = nbytes
            tmp = record_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(part))
            os.replace(tmp, record_file)  # the part is complete only once this file exists
            parts.append(part)
    bar.close()

    chunks = [c for p in parts for c in p["chunks"]]
    config = next((p["config"] for p in parts if p["config"] is not None), None)
    summary.files = sum(len(p["kept"]) for p in parts)
    summary.bytes = sum(p["bytes"] for p in parts)
    summary.shards = len(chunks)
    summary.skipped = list(pre_skipped) + [s for p in parts for s in p["skipped"]]
    if not chunks:
        raise ValueError(f"no readable sample to write to {out}: {summarize(summary.skipped)}")
    (out / "index.json").write_text(json.dumps({"chunks": chunks, "config": config}, sort_keys=True))
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "source": source,
        "classes": list(classes) if classes is not None else None,
        "paths": [path for p in parts for path, _ in p["kept"]],
        "labels": [label for p in parts for _, label in p["kept"]],
        "skipped": summary.skipped,
        "num_records": len(records),
        "bytes": summary.bytes,
        "shards": summary.shards,
        **(extra or {}),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, out / MANIFEST)
    for k in range(n_parts):
        (out / f"{_PART_PREFIX}{k:06d}.json").unlink(missing_ok=True)
    return summary


# ----------------------------------------------------------------------------------------- reading
def _s3_location(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def _s3_client(storage_options: dict | None):
    import boto3

    return boto3.client("s3", **(storage_options or {}))


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning-ssl" / "shards"


class ShardReader:
    """Random access to the items of one sharded split, by shard index, with litdata's
    ``StreamingDataset`` opened lazily in each process (a DataLoader worker opens its own).

    A local split is read in place. For a split on S3, ``fetch="chunk"`` (default) downloads each
    chunk file whole (boto3, to a temporary name, then renamed) into ``cache_dir`` the first time one
    of its samples is read, and litdata reads the cached copy: one request per chunk, and the
    processes of a node share the cache. (litdata's own chunk download is made for its sequential
    streaming order: read in a shuffled order, it waited on its download thread for every sample and
    deleted each chunk as soon as the next sample came from another one.) ``fetch="sample"`` reads
    each sample's bytes with litdata's range requests instead: nothing on disk, one request per sample.
    The cache is not evicted: a shuffled epoch reads every chunk, so it grows to the split's size.
    litdata's batched decoding is off (``batch_decode=False``): it deserializes a window of 256 items
    per read, which a shuffled order throws away (7x slower reads of 32x32 CIFAR-10 JPEGs).
    """

    def __init__(
        self,
        url: str | os.PathLike,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        fetch: str = "chunk",
    ):
        if fetch not in ("chunk", "sample"):
            raise ValueError(f"shard fetch must be 'chunk' or 'sample', got {fetch!r}")
        self.url, self.storage_options, self.fetch = str(url), storage_options, fetch
        self.remote = is_remote(self.url)
        if self.remote and not self.url.startswith("s3://"):
            raise ValueError(f"cannot read shards at {self.url}: object stores are read from s3:// URLs")
        digest = hashlib.sha1(self.url.rstrip("/").encode()).hexdigest()[:16]
        self.cache = Path(cache_dir).expanduser() / digest if cache_dir else _default_cache_dir() / digest
        self._dataset = None
        self._pid = None
        self._client = None
        self._chunks: list[str] = []
        self._ends: list[int] = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None, "_pid": None, "_client": None}

    def _open(self):
        StreamingDataset = _litdata().StreamingDataset
        if not self.remote:
            return StreamingDataset(str(Path(self.url).expanduser().resolve()), batch_decode=False)
        if self.fetch == "sample":
            kwargs: dict[str, Any] = {"cache_dir": str(self.cache), "batch_decode": False}
            if self.storage_options:
                kwargs["storage_options"] = self.storage_options
            return StreamingDataset(self.url, **kwargs)
        self._client = _s3_client(self.storage_options)
        bucket, key = _s3_location(join_url(self.url, "index.json"))
        index = self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        self.cache.mkdir(parents=True, exist_ok=True)
        cached = self.cache / "index.json"
        if not cached.is_file() or cached.read_bytes() != index:
            for old in self.cache.glob("chunk-*"):  # the split was rewritten: its old chunks are stale
                old.unlink(missing_ok=True)
            self._write(cached, index)
        chunks = json.loads(index)["chunks"]
        self._chunks = [c["filename"] for c in chunks]
        self._ends = list(itertools.accumulate(int(c["chunk_size"]) for c in chunks))
        return StreamingDataset(str(self.cache), batch_decode=False)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _ensure_chunk(self, index: int) -> None:
        name = self._chunks[bisect.bisect_right(self._ends, index)]
        path = self.cache / name
        if path.is_file():
            return
        bucket, key = _s3_location(join_url(self.url, name))
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        self._client.download_file(bucket, key, str(tmp))
        os.replace(tmp, path)  # complete or absent: another process never reads half a chunk

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._dataset is None or self._pid != os.getpid():
            self._dataset, self._pid = self._open(), os.getpid()
        if self.remote and self.fetch == "chunk":
            self._ensure_chunk(int(index))
        return self._dataset[int(index)]


class ShardedImageFolder(Dataset):
    """The sharded form of ``RobustImageFolder``: ``(RGB PIL image, label)`` pairs of one split made by
    ``lightning-ssl prepare``, with the same attributes (``samples``, ``targets``, ``classes``,
    ``class_to_idx``, ``skipped``, ``bad_files``) and the same handling of a sample that fails to
    decode. ``classes`` keeps and orders a subset of the split's classes (labels follow it), as for
    the folder. ``encoded(i)`` gives the stored bytes (for decoding on the accelerator).

    Args:
        url: the split's folder or URL (``shards/train``, ``s3://bucket/imagenet/train``).
        classes: class names in label order (default: the split's own).
        storage_options: for an object store, passed to litdata and boto3 (``endpoint_url``, keys).
        cache_dir: where chunks of a remote split are cached (default
            ``~/.cache/lightning-ssl/shards``); it grows to the split's size (see ``ShardReader``).
        fetch: ``"chunk"`` or ``"sample"`` (see ``ShardReader``).
        strict, max_retries: see ``RobustImageFolder``.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        classes: Sequence[str] | None = None,
        transform: Callable | None = None,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        fetch: str = "chunk",
        strict: bool = False,
        max_retries: int = 50,
    ):
        self.root = str(url)
        manifest = read_manifest(url, storage_options, kind="image_folder")
        stored = manifest["classes"]
        self.classes = list(stored) if classes is None else list(classes)
        missing = [c for c in self.classes if c not in stored]
        if missing:
            raise FileNotFoundError(f"class(es) missing in the shards at {url}: {summarize(missing)}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        relabel = [self.class_to_idx.get(c, -1) for c in stored]
        rows = [(i, relabel[t]) for i, t in enumerate(manifest["labels"]) if relabel[t] >= 0]
        if classes is not None:  # a class subset keeps the folder's order: classes in label order
            rows.sort(key=lambda row: row[1])
        self._shard_index = [i for i, _ in rows]
        self.samples = [(manifest["paths"][i], label) for i, label in rows]
        self.targets = [label for _, label in rows]
        self.skipped = list(manifest["skipped"])
        self.transform, self.strict, self.max_retries = transform, strict, max_retries
        self.reader = ShardReader(url, storage_options, cache_dir, fetch)
        self.bad_files: list[str] = []
        if not self.samples:
            raise FileNotFoundError(f"no sample of the classes {summarize(self.classes)} in the shards at {url}")

    def __len__(self) -> int:
        return len(self.samples)

    def encoded(self, index: int) -> tuple[bytes, int]:
        """The stored (encoded) image bytes of sample ``index`` and its label."""
        item = self.reader[self._shard_index[index]]
        return bytes(item["image"]), self.samples[index][1]

    def _decode(self, index: int):
        return load_rgb(io.BytesIO(self.encoded(index)[0]))

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image at ``index`` (or the next one that decodes) and its label."""
        return load_skipping_unreadable(
            self.samples,
            index,
            self._decode,
            DECODE_ERRORS,
            kind="image",
            bad_files=self.bad_files,
            strict=self.strict,
            max_retries=self.max_retries,
            root=self.root,
        )

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def _decode_tensor(data: bytes, mode: ImageReadMode) -> torch.Tensor:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


class ShardedCityscapes:
    """The images (and labelIds masks) of one Cityscapes split made by ``lightning-ssl prepare
    cityscapes``, as the ``CityscapesImages`` and ``CityscapesSegmentation`` datasets read them."""

    def __init__(
        self,
        url: str | os.PathLike,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        fetch: str = "chunk",
    ):
        manifest = read_manifest(url, storage_options, kind="cityscapes")
        self.url, self.paths, self.has_masks = str(url), manifest["paths"], manifest.get("masks", False)
        self.reader = ShardReader(url, storage_options, cache_dir, fetch=fetch)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> torch.Tensor:
        """The ``3 x H x W`` uint8 image."""
        return _decode_tensor(bytes(self.reader[index]["image"]), ImageReadMode.RGB)

    def mask(self, index: int) -> torch.Tensor:
        """The ``1 x H x W`` uint8 labelIds map."""
        if not self.has_masks:
            raise ValueError(f"the Cityscapes shards at {self.url} hold no masks (a split without gtFine)")
        return _decode_tensor(bytes(self.reader[index]["mask"]), ImageReadMode.GRAY)
