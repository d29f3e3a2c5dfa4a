"""``lightning-ssl prepare``: a dataset tree as litdata shards (``lightning_ssl.datamodules.shards``).

    lightning-ssl prepare image-folder ROOT OUT [--splits train val]   # ImageNet, CIFAR-10 JPEGs, any ImageFolder
    lightning-ssl prepare cityscapes ROOT OUT [--splits train val train_extra]
    lightning-ssl prepare audio ROOT OUT                              # speaker folders of audio files

Each split becomes ``OUT/<split>`` (``index.json``, ``chunk-*.bin`` and the manifest). Files are
stored as they are on disk (encoded bytes, no re-encoding), each one decoded once here so that
unreadable files are skipped and named in the summary instead of met during training. An interrupted
run resumes where it stopped when started again with the same arguments. To train from an object
store, copy ``OUT`` there (``aws s3 sync OUT s3://bucket/prefix``) and pass the URL as ``shards``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from lightning_ssl.datamodules.audio import AudioFolder, check_audio_bytes
from lightning_ssl.datamodules.cityscapes import cityscapes_images, cityscapes_pairs
from lightning_ssl.datamodules.image_folder import RobustImageFolder
from lightning_ssl.datamodules.imagenet import read_class_list
from lightning_ssl.datamodules.shards import ShardRecord, ShardSummary, check_image, is_remote, write_shards

__all__ = ["prepare_main", "prepare_image_folder", "prepare_cityscapes", "prepare_audio"]


def _common(out: str | os.PathLike) -> Path:
    if is_remote(out):
        raise ValueError(
            f"prepare writes to a local folder, not {out}: write to a local OUT, then copy it "
            f"(aws s3 sync OUT {out}) and train with shards={out}"
        )
    return Path(out).expanduser()


def prepare_image_folder(
    root: str | os.PathLike,
    out: str | os.PathLike,
    splits: tuple[str, ...] = ("train", "val"),
    class_list: str | None = None,
    **kwargs,
) -> list[ShardSummary]:
    """Shards of ``root/<split>/<class>/<image>`` for each split; every split uses the class list of the
    first one (or of ``class_list``), so labels agree across splits."""
    root, out = Path(root).expanduser(), _common(out)
    classes = read_class_list(class_list) if class_list else None
    summaries = []
    for split in splits:
        folder = root / split
        with warnings.catch_warnings(record=True) as caught:  # listing skips are reported in the summary
            warnings.simplefilter("always")
            tree = RobustImageFolder(folder, classes=classes, verify="none")
        for w in caught:
            if "hold no readable image" in str(w.message):
                warnings.warn(str(w.message), stacklevel=2)
        classes = tree.classes
        records = [ShardRecord(os.path.relpath(path, folder), label, {"image": path}) for path, label in tree.samples]
        summary = write_shards(
            records,
            out / split,
            kind="image_folder",
            classes=classes,
            check=check_image,
            source=str(folder),
            pre_skipped=[_relative(s, folder) for s in tree.skipped],
            **kwargs,
        )
        summaries.append(summary)
    return summaries


def _relative(skipped: str, folder: Path) -> str:
    return skipped.replace(str(folder) + os.sep, "", 1)


def prepare_cityscapes(
    root: str | os.PathLike, out: str | os.PathLike, splits: tuple[str, ...] = ("train", "val"), **kwargs
) -> list[ShardSummary]:
    """Shards of a Cityscapes tree: per split, each ``leftImg8bit`` image with its ``gtFine`` labelIds
    mask where the split has masks (``train``, ``val``; ``train_extra`` and ``test`` store images only)."""
    root, out = Path(root).expanduser(), _common(out)
    summaries = []
    for split in splits:
        base = root / "leftImg8bit" / split
        masks = (root / "gtFine" / split).is_dir()
        if masks:
            pairs = cityscapes_pairs(root, split)
            records = [ShardRecord(os.path.relpath(i, base), 0, {"image": str(i), "mask": str(m)}) for i, m in pairs]
        else:
            images = cityscapes_images(root, split)
            records = [ShardRecord(os.path.relpath(i, base), 0, {"image": str(i)}) for i in images]
        summaries.append(
            write_shards(
                records,
                out / split,
                kind="cityscapes",
                check=check_image,
                source=str(base),
                extra={"masks": masks},
                **kwargs,
            )
        )
    return summaries


def prepare_audio(root: str | os.PathLike, out: str | os.PathLike, **kwargs) -> list[ShardSummary]:
    """Shards of a folder of speaker folders (``root/<speaker>/**/<utterance>.wav``), as ``AudioFolder``
    reads it; each file is decoded once to skip unreadable ones."""
    root, out = Path(root).expanduser(), _common(out)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        folder = AudioFolder(root, verify="none")
    records = [ShardRecord(os.path.relpath(path, root), label, {"audio": path}) for path, label in folder.samples]
    summary = write_shards(
        records,
        out,
        kind="audio",
        classes=folder.speakers,
        check=check_audio_bytes,
        source=str(root),
        pre_skipped=[_relative(s, root) for s in folder.skipped],
        **kwargs,
    )
    return [summary]


_KINDS = {"image-folder": prepare_image_folder, "cityscapes": prepare_cityscapes, "audio": prepare_audio}


def prepare_main(argv: list[str]) -> list[ShardSummary]:
    """``lightning-ssl prepare KIND ROOT OUT``: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="lightning-ssl prepare", description="Convert a dataset tree into litdata shards (docs/data.md)"
    )
    parser.add_argument("kind", choices=sorted(_KINDS), help="layout of ROOT")
    parser.add_argument("root", help="the dataset tree")
    parser.add_argument("out", help="local folder for the shards (one sub-folder per split)")
    parser.add_argument("--splits", nargs="+", help="split folders (image-folder: train val; cityscapes: train val)")
    parser.add_argument("--class-list", help="image-folder: text file of class folders to keep (e.g. ImageNet-100)")
    parser.add_argument("--chunk-bytes", default="64MB", help="target size of a shard file (default 64MB)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(8, cores))")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    kwargs = {"chunk_bytes": args.chunk_bytes, "workers": args.workers, "progress": not args.quiet}
    if args.kind == "image-folder":
        kwargs["class_list"] = args.class_list
    elif args.class_list:
        parser.error("--class-list is for image-folder trees")
    if args.splits and args.kind != "audio":
        kwargs["splits"] = tuple(args.splits)
    elif args.splits:
        parser.error("an audio folder has no splits")
    summaries = _KINDS[args.kind](args.root, args.out, **kwargs)
    for summary in summaries:
        sys.stdout.write(f"prepared {summary}\n")
    return summaries
