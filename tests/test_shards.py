"""Sharded datasets (litdata): ``lightning-ssl prepare`` round trip and resume, the sharded source equal
to the folder it was made from (samples, views, labels, training), disjoint shards per process, and
streaming from an S3-compatible server on the loopback address."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_trees import make_tree
from PIL import Image

from lightning_ssl import SimCLR
from lightning_ssl.cli import main as cli_main
from lightning_ssl.datamodules import CIFAR10DataModule, ImageNetDataModule
from lightning_ssl.datamodules.prepare import prepare_image_folder
from lightning_ssl.datamodules.shards import MANIFEST, ShardedImageFolder, ShardRecord, write_shards

CLASSES = ["ant", "bee", "cat", "dog"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """24 train / 6 val images per class of ImageNet-like sizes, a nested folder, and bad files."""
    root = make_tree(tmp_path_factory.mktemp("tree"), {"train": 24, "val": 6}, CLASSES, size=None)
    nested = root / "train" / "cat" / "more"
    nested.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(nested / "cat_nested.png")
    return root


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare_image_folder(tree, out, splits=("train", "val"), progress=False, workers=2, chunk_bytes="20KB")
    return out


def _bad_tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "bad", {"train": 3}, ["a", "b"])
    (root / "train" / "a" / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = (root / "train" / "b" / "b_0.jpg").read_bytes()
    (root / "train" / "b" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    return root


def test_prepare_round_trip_returns_every_image_and_label(tree, shards):
    """Every file of the tree comes back from the shards byte for byte, with its label and path, in the
    folder's order; the split is many shard files (chunk_bytes), and val uses train's class list."""
    for split in ("train", "val"):
        data = ShardedImageFolder(shards / split)
        files = sorted((tree / split).rglob("*.*"))
        assert len(data) == len(files) == (24 * 4 + 1 if split == "train" else 6 * 4)
        assert data.classes == CLASSES
        for i, (rel, label) in enumerate(data.samples):
            path = tree / split / rel
            assert (
                data.encoded(i)
                == (path.read_bytes(), CLASSES.index(rel.split("/")[0]))
                == (
                    path.read_bytes(),
                    label,
                )
            )
        image, label = data[5]
        assert image.mode == "RGB" and label == data.targets[5]
    assert json.loads((shards / "train" / "index.json").read_text())["chunks"].__len__() > 3


def test_prepare_cli_reports_and_skips_unreadable_files(tmp_path, capsys):
    root = _bad_tree(tmp_path)
    cli_main(["prepare", "image-folder", str(root), str(tmp_path / "out"), "--splits", "train", "--quiet"])
    printed = capsys.readouterr().out
    assert "6 samples" in printed and "skipped 4 unreadable file(s)" in printed
    for name in ("a/garbage.jpg", "b/cut.jpg", "b/empty.jpg", "b/notes.txt"):
        assert name in printed
    assert "BytesIO" not in printed
    data = ShardedImageFolder(tmp_path / "out" / "train")
    assert len(data) == 6 and all("cut" not in p for p, _ in data.samples)
    cli_main(["prepare", "image-folder", str(root), str(tmp_path / "out"), "--splits", "train", "--quiet"])
    assert "complete already" in capsys.readouterr().out


def test_an_interrupted_prepare_resumes_and_equals_an_uninterrupted_one(tree, tmp_path):
    """Interrupted after 2 complete parts of 10: the next run keeps them, writes the rest, and the result
    is the uninterrupted one (index and manifest); an incomplete split is refused by the reader."""
    folder = tree / "train"
    records = [ShardRecord(str(p.relative_to(folder)), 0, {"image": str(p)}) for p in sorted(folder.rglob("*.jpg"))]
    calls = {"n": 0}

    def stop_after_25(name, data):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt

    kwargs = dict(kind="image_folder", classes=CLASSES, part_size=10, workers=1, progress=False, chunk_bytes="20KB")
    with pytest.raises(KeyboardInterrupt):
        write_shards(records, tmp_path / "cut", check=stop_after_25, **kwargs)
    with pytest.raises(FileNotFoundError, match="incomplete: run the same prepare command again"):
        ShardedImageFolder(tmp_path / "cut")
    resumed = write_shards(records, tmp_path / "cut", check=None, **kwargs)
    straight = write_shards(records, tmp_path / "straight", check=None, **kwargs)
    assert resumed.resumed_parts == 2 and straight.resumed_parts == 0
    for name in ("index.json", MANIFEST):
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("cut", "straight"))
        assert a == b, name
    assert not list((tmp_path / "cut").glob(".part-*"))
    a, b = ShardedImageFolder(tmp_path / "cut"), ShardedImageFolder(tmp_path / "straight")
    assert all(a.encoded(i) == b.encoded(i) for i in range(len(a)))


def _batches(dm, n: int = 3):
    dm.setup("fit")
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if i == n:
            break
        out.append(batch)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_sharded_and_folder_sources_give_identical_batches(tree, shards, workers):
    """Same seed: the same samples in the same order with the same views (bitwise) and labels, for the
    pretraining loader (with and without workers) and for the labeled loaders and subsets."""
    common = dict(batch_size=8, image_size=24, eval_resize=28, eval_crop=24, num_workers=workers, class_list=None)
    torch.manual_seed(0)
    folder = _batches(ImageNetDataModule(root=str(tree), **common))
    torch.manual_seed(0)
    sharded = _batches(ImageNetDataModule(shards=str(shards), **common))
    for (va, la), (vb, lb) in zip(folder, sharded, strict=True):
        assert torch.equal(la, lb)
        assert all(torch.equal(a, b) for a, b in zip(va, vb, strict=True))
    for split in ("train", "val"):
        fa = ImageNetDataModule(root=str(tree), labeled_fraction=0.25, **common).labeled_dataloader(split)
        fb = ImageNetDataModule(shards=str(shards), labeled_fraction=0.25, **common).labeled_dataloader(split)
        for (xa, ya), (xb, yb) in zip(fa, fb, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_class_subset_and_labeled_list_work_on_shards(tree, shards, tmp_path):
    (tmp_path / "classes.txt").write_text("dog\nbee\n")
    names = tmp_path / "labeled.txt"
    names.write_text("bee_3.jpg\ndog_0.jpg\n")
    common = dict(class_list=str(tmp_path / "classes.txt"), labeled_list=str(names), num_workers=0)
    a = ImageNetDataModule(root=str(tree), **common)
    b = ImageNetDataModule(shards=str(shards), **common)
    assert a.classes == b.classes == ["bee", "dog"]
    assert a._base_dataset("train").targets == b._base_dataset("train").targets
    assert [p.split("/")[-1] for p, _ in a._base_dataset("val").samples] == [
        p.split("/")[-1] for p, _ in b._base_dataset("val").samples
    ]
    assert a.labeled_indices() == b.labeled_indices()


def test_cifar10_datamodule_reads_shards(tree, shards):
    dm = CIFAR10DataModule(shards=str(shards), val_split="val", num_workers=0, batch_size=4, train_per_class=5)
    dm.setup("fit")
    assert dm._resolved_source() == "shards" and len(dm._base_dataset("train")) == 20
    views, labels = next(iter(dm.train_dataloader()))
    assert views[0].shape == (4, 3, 32, 32)
    images, labels = next(iter(dm.labeled_dataloader("val")))
    assert images.shape[1:] == (3, 32, 32)
    with pytest.raises(ValueError, match="source='shards' needs shards="):
        CIFAR10DataModule(source="shards")


def test_missing_or_wrong_shards_are_one_line_errors(tree, tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=r"no sharded split at .*lightning-ssl prepare"):
        ShardedImageFolder(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="class\\(es\\) missing in the shards"):
        ShardedImageFolder(shards / "train", classes=["cat", "zebra"])
    with pytest.raises(ValueError, match="writes to a local folder"):
        prepare_image_folder(tree, "s3://bucket/x")


def _fit(dm, steps: int = 3) -> dict[str, torch.Tensor]:
    import pytorch_lightning as pl
    from conftest import TinyConvNet
    from helpers import quiet_trainer

    pl.seed_everything(0)
    model = SimCLR(TinyConvNet(), projection_dim=8, projection_hidden_dim=32, warmup_epochs=0)
    quiet_trainer(max_steps=steps).fit(model, datamodule=dm)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_from_shards_equals_training_from_the_folder(tree, shards):
    common = dict(batch_size=8, image_size=16, num_workers=0)
    a = _fit(ImageNetDataModule(root=str(tree), **common))
    b = _fit(ImageNetDataModule(shards=str(shards), **common))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _keys_seen(rank: int, world_size: int, shards: str) -> list[int]:
    torch.manual_seed(1000 + rank)  # ranks seeded differently still shuffle with rank 0's permutation
    dm = ImageNetDataModule(shards=shards, batch_size=5, num_workers=0, image_size=8, drop_last=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    return list(iter(loader.sampler))


@pytest.mark.distributed
def test_two_processes_read_disjoint_samples_that_cover_the_set(shards):
    """Each rank reads its own part of the shards and the epoch covers every sample once, even when the
    processes were seeded differently (the loader shuffles with rank 0's seed)."""
    from dist_utils import run_distributed

    ranks = run_distributed(_keys_seen, 2, str(shards))
    a, b = ({i for i, _ in keys} for keys in ranks)
    n = 24 * 4 + 1  # odd: DistributedSampler repeats one sample so that both ranks take 49
    assert a | b == set(range(n)) and len(a & b) == 1 and len(ranks[0]) == len(ranks[1]) == 49


# ------------------------------------------------------------------------ S3 on the loopback address
@pytest.fixture(scope="module")
def s3_server():
    """An S3-compatible server (moto's server mode) on 127.0.0.1, stopped when the module's tests end;
    its own watchdog stops it after 10 minutes whatever happens."""
    moto_server = pytest.importorskip("moto.server")
    import logging
    import threading

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    watchdog = threading.Timer(600, server.stop)
    watchdog.daemon = True
    watchdog.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    watchdog.cancel()
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    for key, value in dict(
        AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1"
    ).items():
        monkeypatch.setenv(key, value)


def _upload(endpoint: str, local: Path, bucket: str, prefix: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local)}")
    return f"s3://{bucket}/{prefix}"


def test_streaming_from_a_loopback_s3_server_equals_the_local_shards(shards, s3_server, s3_env, tmp_path):
    url = _upload(s3_server, shards, "data", "imagenet")
    options = {"endpoint_url": s3_server}
    remote = ShardedImageFolder(f"{url}/train", storage_options=options, cache_dir=str(tmp_path / "cache"))
    local = ShardedImageFolder(shards / "train")
    assert remote.samples == local.samples
    for i in (0, 50, len(local) - 1):
        assert remote.encoded(i) == local.encoded(i)
    assert any((tmp_path / "cache").rglob("chunk-*.bin"))  # fetch="chunk": whole chunks in the cache
    by_sample = ShardedImageFolder(
        f"{url}/train", storage_options=options, cache_dir=str(tmp_path / "none"), fetch="sample"
    )
    assert all(by_sample.encoded(i) == local.encoded(i) for i in (3, 60))
    assert not any((tmp_path / "none").rglob("chunk-*.bin"))
    with pytest.raises(FileNotFoundError, match="no sharded split at s3://data/nothing"):
        ShardedImageFolder("s3://data/nothing", storage_options=options)


def test_cli_trains_from_s3_and_resumes_exactly(shards, s3_server, s3_env, tmp_path):
    """``lightning-ssl fit`` streaming from the loopback S3 server: 6 straight steps equal 3 steps, a
    stop, and 3 more resumed with ``--ckpt_path last`` (a mid-epoch checkpoint)."""
    url = _upload(s3_server, shards, "resume", "imagenet")

    def fit(root: Path, steps: int, *extra: str) -> None:
        args = [
            "fit",
            "--model=SimCLR",
            "--model.backbone=resnet18",
            "--model.small_image=true",
            "--model.projection_hidden_dim=32",
            "--model.projection_dim=16",
            "--data=ImageNetDataModule",
            f"--data.shards={url}",
            f"--data.storage_options={{endpoint_url: {s3_server}}}",
            f"--data.shard_cache_dir={tmp_path / 'cache'}",
            "--data.batch_size=8",
            "--data.image_size=16",
            "--data.num_workers=0",
            "--trainer.accelerator=cpu",
            f"--trainer.max_steps={steps}",
            "--trainer.callbacks+=ModelCheckpoint",
            f"--trainer.callbacks.dirpath={root / 'checkpoints'}",
            "--trainer.callbacks.every_n_train_steps=3",
            "--trainer.callbacks.save_last=true",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            "--seed_everything=0",
            *extra,
        ]
        env = {"PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "lightning_ssl", *args],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, **env},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]

    fit(tmp_path / "straight", 6)
    fit(tmp_path / "cut", 3)
    fit(tmp_path / "cut", 6, "--ckpt_path=last")
    a, b = (
        torch.load(next((tmp_path / d).rglob("last.ckpt")), map_location="cpu", weights_only=True)
        for d in ("straight", "cut")
    )
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def test_decoded_shard_images_equal_decoded_files(tree, shards):
    data = ShardedImageFolder(shards / "val")
    for i in (0, 7):
        image, _ = data[i]
        reference = Image.open(io.BytesIO((tree / "val" / data.samples[i][0]).read_bytes())).convert("RGB")
        assert np.array_equal(np.asarray(image), np.asarray(reference))


# ------------------------------------------------------------------------ Cityscapes and audio folders
def _same_batches(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, (list, tuple)):
            _same_batches(x, y)
        else:
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))


def test_cityscapes_shards_give_the_trees_batches(tmp_path):
    from lightning_ssl.datamodules import CityscapesDataModule
    from lightning_ssl.datamodules.prepare import prepare_cityscapes
    from lightning_ssl.datamodules.synthetic_cityscapes import make_synthetic_cityscapes

    tree = make_synthetic_cityscapes(tmp_path / "cs", num_train=6, num_val=3, width=64, height=32, num_extra=2)
    prepare_cityscapes(tree, tmp_path / "shards", splits=("train", "val", "train_extra"), progress=False, workers=1)
    for mode, extra in (("ssl", dict(use_train_extra=True, image_size=16)), ("segmentation", dict(crop_size=16))):
        loaders = []
        for source in (dict(root=str(tree)), dict(shards=str(tmp_path / "shards"))):
            torch.manual_seed(0)
            dm = CityscapesDataModule(mode=mode, batch_size=2, num_workers=0, num_labeled=4, **source, **extra)
            batches = list(dm.train_dataloader())
            if mode == "segmentation":
                batches += list(dm.val_dataloader())
            loaders.append(batches)
        assert len(loaders[0]) > 1
        _same_batches(*loaders)
    with pytest.raises(ValueError, match="root=<folder> or its shards"):
        CityscapesDataModule()


def test_audio_shards_give_the_folders_batches(tmp_path):
    pytest.importorskip("soundfile")
    from audio_trees import write_tree

    from lightning_ssl.datamodules import AudioFolderDataModule
    from lightning_ssl.datamodules.prepare import prepare_audio

    write_tree(tmp_path / "train", speakers=3, utterances=3)
    write_tree(tmp_path / "val", speakers=2, utterances=2, first_speaker=5, layout="flat")
    (tmp_path / "train" / "0" / "broken.flac").write_bytes(b"fLaC not audio")
    for split in ("train", "val"):
        prepare_audio(tmp_path / split, tmp_path / f"{split}-shards", progress=False, workers=1)
    common = dict(crop_samples=4000, eval_crop_samples=8000, batch_size=3, num_workers=0)
    runs, names = [], []
    for source in (
        dict(root=str(tmp_path / "train"), val_root=str(tmp_path / "val"), verify="full"),
        dict(shards=str(tmp_path / "train-shards"), val_shards=str(tmp_path / "val-shards")),
    ):
        torch.manual_seed(0)
        dm = AudioFolderDataModule(**common, **source)
        runs.append([*dm.train_dataloader(), *dm.labeled_dataloader("train"), *dm.labeled_dataloader("val")])
        names.append((dm.dataset("train").relative_paths, dm.dataset("val").relative_paths))
    assert names[0] == names[1] and len(names[0][0]) == 9 and len(names[0][1]) == 4
    _same_batches(*runs)


@pytest.mark.distributed
def test_world_size_change_between_checkpoint_and_resume(shards, tmp_path):
    """Two processes (torchrun) checkpoint mid-epoch and at the end of their first epoch; one process
    resumes from the end-of-epoch checkpoint and trains on (the next epoch is dealt out anew), and from
    the mid-epoch one stops at once with a one-line message naming both layouts."""
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    args = [
        "fit",
        "--model=SimCLR",
        "--model.backbone=resnet18",
        "--model.small_image=true",
        "--model.projection_hidden_dim=16",
        "--model.projection_dim=8",
        "--data=ImageNetDataModule",
        f"--data.shards={shards}",
        "--data.batch_size=8",
        "--data.image_size=16",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'checkpoints'}",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=-1",
        "--seed_everything=0",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # 97 images, 2 processes x batch 8: 6 steps per epoch (49 samples per rank, drop_last)
    two = subprocess.run(
        [*torchrun, "-m", "lightning_ssl", *args, "--trainer.max_steps=6"], env=env, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-3000:]
    end_of_epoch, mid_epoch = (
        tmp_path / "checkpoints" / "epoch=0-step=6.ckpt",
        tmp_path / "checkpoints" / "epoch=0-step=3.ckpt",
    )
    assert end_of_epoch.is_file() and mid_epoch.is_file()
    one = [sys.executable, "-m", "lightning_ssl", *args, "--trainer.max_steps=9"]
    resumed = subprocess.run([*one, f"--ckpt_path={end_of_epoch}"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "epoch=1-step=9.ckpt", weights_only=True)["global_step"] == 9
    refused = subprocess.run([*one, f"--ckpt_path={mid_epoch}"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "taken mid-epoch with 2 process(es) x batch 8, this run has 1 x 8" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_gpu_decode_reads_the_shards_encoded_bytes(tree, shards):
    """``gpu_decode=True`` (views decoded and made after the transfer) gives the same batches from the
    shards as from the folder: the loader ships the stored bytes of the same samples."""
    common = dict(batch_size=8, image_size=16, num_workers=0, gpu_augment=True, gpu_decode=True, gpu_load_size=20)
    runs = []
    for source in (dict(root=str(tree)), dict(shards=str(shards))):
        torch.manual_seed(0)
        dm = ImageNetDataModule(**source, **common)
        dm.setup("fit")
        batches = []
        for i, batch in enumerate(dm.train_dataloader()):
            if i == 2:
                break
            batches.append(dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0))
        runs.append(batches)
    _same_batches(*runs)
