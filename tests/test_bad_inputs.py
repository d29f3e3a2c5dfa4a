"""Real-world folders: corrupt, truncated and non-image files, unusual image modes, tiny images,
empty class folders, missing roots and splits. Each case of issue 4 (Cityscapes aside) has a test."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from image_trees import make_tree, random_image
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from lightning_ssl.datamodules import CIFAR10DataModule, ImageNetDataModule
from lightning_ssl.datamodules.image_folder import RobustImageFolder, load_rgb


def _tree(tmp_path: Path, classes=("a", "b"), per_class=3) -> Path:
    return make_tree(tmp_path / "data", {"train": per_class, "val": 1}, list(classes))


def _dm(root, **kw):
    args = dict(
        root=str(root), num_workers=0, batch_size=2, image_size=32, eval_resize=32, eval_crop=32, drop_last=False
    )
    args.update(kw)
    return ImageNetDataModule(**args)


def _pixel_mean(image: Image.Image) -> float:
    return float(np.asarray(image).mean())


def _epoch(dataset) -> int:
    return sum(len(y) for _, y in DataLoader(dataset, batch_size=4, num_workers=0))


# ------------------------------------------------------------------ unreadable files
def test_corrupted_and_non_image_files_are_skipped_with_one_warning(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "a" / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (root / "train" / "b" / "notes.txt").write_text("labels were checked by hand")
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored silently
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = RobustImageFolder(root / "train", transform=_pixel_mean)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert messages[0].startswith("3 file(s)")
    for name in ("garbage.jpg", "notes.txt", "empty.png"):
        assert name in messages[0]
    assert len(ds) == 6 and _epoch(ds) == 6
    with pytest.raises(ValueError, match="garbage.jpg"):
        RobustImageFolder(root / "train", strict=True)


def test_truncated_image_is_replaced_during_the_epoch_never_kills_it(tmp_path):
    root = _tree(tmp_path)
    good = root / "train" / "a" / "a_0.jpg"
    random_image(np.random.default_rng(1), 64, 64).save(good, quality=95)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # a valid header, half the scan data
    ds = RobustImageFolder(root / "train", transform=_pixel_mean)
    assert len(ds) == 6  # the header check cannot see truncation; decoding does
    with pytest.warns(UserWarning, match="a_0.jpg.*replaced by another sample"):
        assert _epoch(ds) == 6
    assert ds.bad_files == [str(good)]
    # the replacement is the next readable sample, with its label
    image, label = ds.load(0)
    assert image.size == (32, 32) and label == 0
    # through the datamodule, both paths run a full epoch
    for gpu in (False, True):
        dm = _dm(root, gpu_augment=gpu)
        with pytest.warns(UserWarning, match="a_0.jpg"):
            batches = list(dm.train_dataloader())
        assert sum(len(b[1] if not gpu else b["target"]) for b in batches) == 6
    # and in a worker process, where the warning is the worker's own
    assert sum(len(y) for _, y in _dm(root, num_workers=1).train_dataloader()) == 6
    with pytest.raises(ValueError, match="cannot decode image .*a_0.jpg.*strict=True"):
        RobustImageFolder(root / "train", strict=True)[0]
    with pytest.warns(UserWarning, match="1 file\\(s\\).*a_0.jpg"):  # decoding everything up front finds it
        assert len(RobustImageFolder(root / "train", verify="full")) == 5


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("kept", [0.3, 0.6, 0.9, 0.99, -2])
@pytest.mark.parametrize("tolerant", [False, True])
def test_a_jpeg_cut_anywhere_fails_to_decode_rather_than_coming_back_gray(
    tmp_path, monkeypatch, progressive, kept, tolerant
):
    """Wherever the file ends (the last 2 bytes, the end-of-image marker, included), ``load_rgb`` raises,
    so the dataset replaces it with the one unreadable-file warning; also where a program turned on
    PIL's ``LOAD_TRUNCATED_IMAGES``, which pads a cut scan with gray (the setting is left as it was)."""
    path = tmp_path / "cut.jpg"
    random_image(np.random.default_rng(0), 64, 64).save(path, quality=95, progressive=progressive)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept)] if kept > 0 else data[:kept])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", tolerant)
    with Image.open(path) as img:  # what PIL alone does
        if tolerant:
            img.load()
        else:
            with pytest.raises(OSError, match="truncated"):
                img.load()
    with pytest.raises(OSError, match="truncated"):
        load_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is tolerant
    ds = RobustImageFolder(_tree(tmp_path / "tree") / "train")
    ds.samples[0] = (str(path), ds.samples[0][1])
    with pytest.warns(UserWarning, match="cut.jpg.*replaced by another sample"):
        ds.load(0)
    assert ds.bad_files == [str(path)]


# ------------------------------------------------------------------------- image modes
def _png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_grayscale_cmyk_rgba_palette_and_16bit_images_become_rgb(tmp_path):
    folder = tmp_path / "data" / "train" / "modes"
    folder.mkdir(parents=True)
    Image.new("L", (8, 8), 77).save(folder / "gray.jpg")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # pure red in CMYK
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # a fully transparent pixel
    rgba.save(folder / "rgba.png")
    Image.fromarray(np.array([[0, 32896], [65535, 0]], dtype=np.uint16)).save(folder / "gray16.png")
    _png16_rgb(folder / "rgb16.png", np.full((4, 4, 3), [65535, 32896, 0], dtype=np.uint16))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(folder / "palette.png", transparency=0)
    Image.new("1", (8, 8), 1).save(folder / "bilevel.png")

    out = {p.stem: load_rgb(p) for p in folder.iterdir()}
    assert all(im.mode == "RGB" for im in out.values())
    assert out["gray"].getpixel((3, 3)) == (77, 77, 77)
    r, g, b = out["cmyk"].getpixel((3, 3))
    assert r > 240 and g < 15 and b < 15
    assert out["rgba"].getpixel((3, 3)) == (0, 0, 255) and out["rgba"].getpixel((0, 0)) == (255, 255, 255)
    assert np.asarray(out["gray16"])[:, :, 0].tolist() == [[0, 128], [255, 0]]  # scaled, not clipped
    assert out["rgb16"].getpixel((1, 1)) == (255, 128, 0)
    assert out["palette"].getpixel((1, 1)) == (0, 255, 0)
    assert out["bilevel"].getpixel((1, 1)) == (255, 255, 255)
    # and they all train: two 3-channel views each
    (tmp_path / "data" / "val" / "modes").mkdir(parents=True)
    Image.new("L", (8, 8), 5).save(tmp_path / "data" / "val" / "modes" / "v.png")
    for gpu in (False, True):
        batch = next(iter(_dm(tmp_path / "data", batch_size=7, gpu_augment=gpu).train_dataloader()))
        views = _dm(tmp_path / "data", gpu_augment=True).on_after_batch_transfer(batch, 0)[0] if gpu else batch[0]
        assert [v.shape for v in views] == [(7, 3, 32, 32)] * 2


def test_image_smaller_than_the_crop(tmp_path):
    root = make_tree(tmp_path / "data", {"train": 2, "val": 1}, ["a"], size=(6, 4))
    for gpu in (False, True):
        dm = _dm(root, image_size=32, gpu_augment=gpu, gpu_load_size=48, eval_resize=40, eval_crop=36)
        batch = next(iter(dm.train_dataloader()))
        views, _ = dm.on_after_batch_transfer(batch, 0)
        assert [v.shape for v in views] == [(2, 3, 32, 32)] * 2 and all(torch.isfinite(v).all() for v in views)
        x, _ = next(iter(dm.labeled_dataloader("val")))
        assert x.shape == (1, 3, 36, 36)
    cifar = CIFAR10DataModule(root=str(root), val_split="val", num_workers=0, batch_size=2)
    assert next(iter(cifar.labeled_dataloader("val")))[0].shape == (1, 3, 32, 32)  # resized only when needed


# ------------------------------------------------------------------------ folder structure
def test_empty_class_folder_keeps_its_label_index(tmp_path):
    root = _tree(tmp_path, classes=("a", "b", "c"))
    for f in (root / "train" / "b").iterdir():
        f.unlink()
    with pytest.warns(UserWarning, match="1 class folder\\(s\\).*hold no readable image: b"):
        dm = _dm(root, labeled_fraction=0.5)
        dm.setup()
    assert dm.classes == ["a", "b", "c"]
    assert sorted(set(dm._base_dataset("train").targets)) == [0, 2]
    _, labels = next(
        iter(
            dm.labeled_dataloader(
                "val",
            )
        )
    )
    assert labels.tolist() == [0, 1, 2]  # val's b image keeps label 1
    assert len(dm.labeled_indices()) == 4  # 2 of a, 2 of c
    for f in (root / "train").rglob("*.jpg"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no readable images"):
        _dm(root).setup()


def test_missing_root_split_or_class_names_the_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*expected layout: <root>/<split>/<class>"):
        _dm(missing).setup()
    root = _tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{root / 'validation'}.*'train', 'val'.*expected layout"):
        _dm(root, val_split="validation").labeled_dataloader("val")
    with pytest.raises(FileNotFoundError, match=f"{root / 'train2'}"):
        _dm(root, train_split="train2").train_dataloader()
    (root / "empty_split").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders in .*empty_split"):
        RobustImageFolder(root / "empty_split")
    (root / "val" / "a").rename(root / "val" / "z")  # val lacks a training class
    with pytest.raises(FileNotFoundError, match="class folder\\(s\\) missing in .*val: a"):
        _dm(root).labeled_dataloader("val")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*<train_split>/<class>"):
        CIFAR10DataModule(root=str(missing)).setup()
