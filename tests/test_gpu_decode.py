"""Decoding on the accelerator (``gpu_decode=True``), run here on the CPU: the loader ships encoded bytes,
the views equal those of ``gpu_augment=True`` alone within a tolerance, other formats and unreadable
files are handled; a CUDA-only test compares nvjpeg with the CPU decoder."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from image_trees import make_tree, random_image
from lightning_fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from lightning_ssl.datamodules import ImageNetDataModule, InMemoryDataModule
from lightning_ssl.datamodules.gpu_decode import (
    ENCODED_KEY,
    EncodedBatch,
    EncodedViewsDataset,
    collate_encoded,
    decode_batch,
    decode_images,
    jpeg_problem,
    read_encoded,
    resize_square,
)
from lightning_ssl.datamodules.image_folder import RobustImageFolder, load_rgb
from lightning_ssl.datamodules.two_view_datamodule import FixedSizeUint8

# Mean |difference| between the two paths' normalized views (all pixels of an epoch), and between the
# squashed uint8 images (levels). Both decoders are libjpeg-turbo and agree exactly here; the resizes
# round differently. Measured on this tree (torch 2.14.1, torchvision 0.29.1, Pillow 13.0), views:
# mean 0.00056 (max 0.044, 99th percentile 0.012) with the CPU's uint8 resize, mean 0.0021 (max 0.057)
# with the float resize CUDA uses (run on the CPU); images: mean 0.046 and 0.17, max 1 level for both.
# About 5x the float figures; one batch seed off gives a mean of 1.3 on the views.
VIEW_TOLERANCE = 0.01
PIXEL_TOLERANCE, PIXEL_MAX = 0.5, 2


def _tree(root: Path) -> Path:
    """Three classes of JPEGs of varied sizes, plus a grayscale and a CMYK JPEG, a PNG, a wide, a tall
    and a large image, and a truncated JPEG."""
    make_tree(root, {"train": 5, "val": 1}, ["a", "b", "c"], size=None)
    rng = np.random.default_rng(7)
    train = root / "train"
    random_image(rng, 70, 40).convert("L").save(train / "a" / "a_gray.jpg", quality=90)
    random_image(rng, 60, 60).convert("CMYK").save(train / "b" / "b_cmyk.jpg", quality=90)
    random_image(rng, 50, 80).save(train / "c" / "c_png.png")
    random_image(rng, 160, 40).save(train / "a" / "a_wide.jpg", quality=90)
    random_image(rng, 30, 120).save(train / "b" / "b_tall.jpg", quality=90)
    random_image(rng, 300, 200).save(train / "c" / "c_large.jpg", quality=90)
    data = io.BytesIO()
    random_image(rng, 64, 48).save(data, format="JPEG", quality=90)
    (train / "a" / "a_cut.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _tree(tmp_path_factory.mktemp("gpu_decode"))


def _dm(root: Path, **kw) -> ImageNetDataModule:
    args = dict(root=str(root), num_workers=0, batch_size=8, image_size=32, gpu_augment=True, drop_last=False)
    return ImageNetDataModule(**{**args, **kw})


def _views(dm, batch):
    batch = dm.on_before_batch_transfer(batch, 0)
    return dm.on_after_batch_transfer(batch, 0)


def _epoch(dm) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [_views(dm, batch) for batch in dm.train_dataloader()]
    return out, [str(w.message) for w in caught if "cannot decode" in str(w.message)]


def test_views_equal_the_uint8_path_within_tolerance(tree):
    pixels, decoded = _epoch(_dm(tree)), _epoch(_dm(tree, gpu_decode=True))
    (a, a_warnings), (b, b_warnings) = pixels, decoded
    assert len(a) == len(b) == 3  # 15 + 6 readable images (the cut one replaced), batches of 8
    assert len(a_warnings) == len(b_warnings) == 1 and "a_cut.jpg" in b_warnings[0]
    diffs = []
    for (views_a, target_a), (views_b, target_b) in zip(a, b):
        assert torch.equal(target_a, target_b)  # the same samples in the same order
        for va, vb in zip(views_a, views_b):
            assert va.shape == vb.shape and vb.dtype == torch.float32
            diffs.append((va - vb).abs().flatten())
    diff = torch.cat(diffs)
    assert diff.mean() < VIEW_TOLERANCE, f"mean {diff.mean():.4f}, max {diff.max():.3f}"


def test_squashed_images_equal_fixed_size_uint8_within_tolerance(tree):
    folder = RobustImageFolder(tree / "train")
    keep = [i for i, (p, _) in enumerate(folder.samples) if not p.endswith("a_cut.jpg")]
    batch = collate_encoded([EncodedViewsDataset(folder)[i] for i in keep])[ENCODED_KEY]
    expected = [FixedSizeUint8(37)(load_rgb(folder.samples[i][0])) for i in keep]  # the uint8 path's (PIL)
    pil = torch.stack([x for x, _ in expected]).float()
    images, sizes, source = decode_batch(batch, 37, "cpu")
    assert source is None and torch.equal(sizes, torch.stack([s for _, s in expected]))
    # the CPU kernel (uint8) and the one CUDA uses (float, FixedSizeUint8 on tensors), here on the CPU
    decoded, _ = decode_images(batch.tensors(), "cpu")
    in_float = resize_square(decoded, 37, in_float=True)
    assert torch.equal(in_float, torch.stack([FixedSizeUint8(37)(x)[0] for x in decoded]))
    for squashed in (images.float(), in_float.float()):
        diff = (squashed - pil).abs()
        assert diff.mean() < PIXEL_TOLERANCE and diff.max() <= PIXEL_MAX, (
            f"mean {diff.mean():.3f}, max {diff.max():.0f}"
        )


def test_the_loader_ships_bytes_not_pixels(tree):
    dm = _dm(tree, gpu_decode=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the cut file's, tested below
        batch = next(iter(dm.train_dataloader()))
    encoded = batch[ENCODED_KEY]
    assert isinstance(encoded, EncodedBatch) and set(batch) == {ENCODED_KEY, "target", "seed"}
    assert encoded.data.dtype == torch.uint8 and encoded.data.ndim == 1 and len(encoded) == 8
    for name, blob in zip(encoded.names, encoded.tensors()):
        assert bytes(blob.numpy()) == Path(name).read_bytes()  # the file as stored
    # Lightning's transfer leaves the bytes on the host (decode_jpeg reads them there)
    moved = move_data_to_device(dm.on_before_batch_transfer(dict(batch), 0), torch.device("cpu"))
    assert moved[ENCODED_KEY] is encoded
    # the same bytes from a worker process
    worker = next(iter(_dm(tree, gpu_decode=True, num_workers=1).train_dataloader()))
    assert torch.equal(worker[ENCODED_KEY].data, encoded.data) and worker[ENCODED_KEY].names == encoded.names


def test_a_truncated_jpeg_is_replaced_with_the_one_warning(tree):
    dataset = EncodedViewsDataset(RobustImageFolder(tree / "train"))
    cut = next(i for i, (p, _) in enumerate(dataset.source.samples) if p.endswith("a_cut.jpg"))
    with pytest.warns(UserWarning, match="a_cut.jpg .*truncated JPEG.*replaced by another sample"):
        item = dataset[cut]
    assert item["name"] == dataset.source.samples[cut + 1][0]  # the next readable file, with its label
    assert dataset.source.bad_files == [str(tree / "train" / "a" / "a_cut.jpg")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file
        dataset[cut]


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("kept", [0.3, 0.6, 0.9, 0.99, -2])
def test_the_worker_check_finds_a_jpeg_cut_anywhere(progressive, kept):
    data = io.BytesIO()
    random_image(np.random.default_rng(0), 64, 64).save(data, format="JPEG", quality=95, progressive=progressive)
    whole = data.getvalue()
    assert jpeg_problem(whole) is None
    assert "truncated" in jpeg_problem(whole[: int(len(whole) * kept)] if kept > 0 else whole[:kept])
    assert jpeg_problem(b"") == "empty file"


def test_undecodable_bytes_are_replaced_by_another_image_of_the_batch(tree):
    dataset = EncodedViewsDataset(RobustImageFolder(tree / "train"))
    items = [dataset[i] for i in range(3)]
    # JPEG markers in place but no image inside: passes the worker check, fails every decoder
    items[1] = {**items[1], ENCODED_KEY: torch.tensor(list(b"\xff\xd8\xff\xda junk \xff\xd9"), dtype=torch.uint8)}
    items[1]["name"] = "junk.jpg"
    batch = collate_encoded(items)
    bad: list[str] = []
    with pytest.warns(UserWarning, match="cannot decode image junk.jpg .*replaced by another image of its batch"):
        images, sizes, source = decode_batch(batch[ENCODED_KEY], 37, "cpu", bad)
    assert source == [0, 2, 2] and bad == ["junk.jpg"] and torch.equal(images[1], images[2])
    # through the datamodule, the label follows the image
    dm = _dm(tree, gpu_decode=True)
    with pytest.warns(UserWarning, match="junk.jpg"):
        views, target = dm.on_after_batch_transfer(collate_encoded(items), 0)
    assert target.tolist() == [items[0]["target"], items[2]["target"], items[2]["target"]]
    assert [v.shape for v in views] == [(3, 3, 32, 32)] * 2


def test_grayscale_cmyk_and_png_decode_as_the_cpu_path(tree):
    paths = [
        tree / "train" / "a" / "a_gray.jpg",
        tree / "train" / "b" / "b_cmyk.jpg",
        tree / "train" / "c" / "c_png.png",
    ]
    blobs = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    images, errors = decode_images(blobs, "cpu")
    assert not errors
    for path, image in zip(paths, images):
        expected = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert image.shape == expected.shape  # RGB, original size
        assert (image.int() - expected.int()).abs().max() <= 1


def test_read_encoded_through_subsets_and_the_encoded_protocol(tree):
    folder = RobustImageFolder(tree / "train")
    data, label = read_encoded(Subset(Subset(folder, [4, 9, 2]), [1]), 0)
    assert data == Path(folder.samples[9][0]).read_bytes() and label == folder.samples[9][1]

    class Records:
        def __init__(self):
            self.records = [(b"", 0), (Path(folder.samples[0][0]).read_bytes(), 5)]

        def __len__(self):
            return len(self.records)

        def encoded(self, index):
            return self.records[index]

    assert read_encoded(Records(), 1)[1] == 5
    dataset = EncodedViewsDataset(Records())
    with pytest.warns(UserWarning, match=r"Records\[0\] \(OSError: empty file\); replaced"):
        item = dataset[0]
    assert item["name"] == "Records[1]" and item["target"] == 5 and dataset.bad_files == ["Records[0]"]
    with pytest.raises(ValueError, match="gpu_decode needs an image folder or shards .*TensorDataset"):
        read_encoded(TensorDataset(torch.zeros(2)), 0)


def test_gpu_decode_needs_gpu_augment_and_encoded_bytes():
    with pytest.raises(ValueError, match="gpu_decode needs gpu_augment=True"):
        InMemoryDataModule(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4), gpu_decode=True)
    dm = InMemoryDataModule(
        torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4), gpu_augment=True, gpu_decode=True
    )
    with pytest.raises(ValueError, match="gpu_decode needs an image folder or shards .*TensorImageDataset"):
        dm.train_dataloader()


def test_fit_runs_on_decoded_batches(tree, tmp_path):
    from conftest import TinyConvNet
    from helpers import quiet_trainer

    from lightning_ssl import SimCLR

    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the cut file's warning, among others
        trainer.fit(SimCLR(TinyConvNet(), projection_hidden_dim=16, projection_dim=8), _dm(tree, gpu_decode=True))
    assert trainer.global_step == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_cuda_decode_matches_cpu_decode(tree):
    folder = RobustImageFolder(tree / "train")
    dataset = EncodedViewsDataset(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        batch = collate_encoded([dataset[i] for i in range(len(dataset))])
    cpu, cpu_sizes, _ = decode_batch(batch[ENCODED_KEY], 37, "cpu")
    cuda, cuda_sizes, source = decode_batch(batch[ENCODED_KEY], 37, "cuda")
    assert cuda.device.type == "cuda" and source is None and torch.equal(cuda_sizes.cpu(), cpu_sizes)
    # nvjpeg's and libjpeg-turbo's IDCT and chroma upsampling differ slightly; a wrong color conversion
    # (grayscale, CMYK) would differ by tens of levels
    for name, x, y in zip(batch[ENCODED_KEY].names, cuda.cpu().float(), cpu.float()):
        assert (x - y).abs().mean() < 2.0, f"{name}: mean {(x - y).abs().mean():.3f}, max {(x - y).abs().max():.0f}"
    dm = _dm(tree, gpu_decode=True)
    views, target = dm.on_after_batch_transfer(move_data_to_device(batch, torch.device("cuda")), 0)
    assert all(v.device.type == "cuda" and torch.isfinite(v).all() for v in views) and target.is_cuda


def test_decoded_images_keep_their_original_size(tree):
    batch = collate_encoded([EncodedViewsDataset(RobustImageFolder(tree / "train"))[i] for i in range(4)])
    _, sizes, _ = decode_batch(batch[ENCODED_KEY], 37, "cpu")
    assert sizes.tolist() == [list(Image.open(n).size[::-1]) for n in batch[ENCODED_KEY].names]
