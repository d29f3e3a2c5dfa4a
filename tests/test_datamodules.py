"""ImageNet and CIFAR-10 datamodules on generated trees in their on-disk layouts, the configs, and
CLI fits of SimCLR on CIFAR-10 image trees (generated, and the real copy when present)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from image_trees import CIFAR_CLASSES, make_tree

from lightning_ssl.datamodules import CIFAR10DataModule, DigitsDataModule, ImageNetDataModule
from lightning_ssl.datamodules.imagenet import balanced_fraction

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory) -> Path:
    """``train/<wnid>/*.JPEG`` (20 per class) and ``val/<wnid>/*.JPEG`` (4 per class), varied sizes."""
    return make_tree(tmp_path_factory.mktemp("imagenet"), {"train": 20, "val": 4}, WNIDS, size=None, ext=".JPEG")


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory) -> Path:
    """The CIFAR-10 JPEG copy's layout: ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` at 32x32."""
    return make_tree(tmp_path_factory.mktemp("cifar"), {"train": 4, "test": 2}, CIFAR_CLASSES)


def _imagenet(root, **kw):
    args = dict(
        root=str(root), num_workers=0, batch_size=8, image_size=32, eval_resize=36, eval_crop=32, eval_batch_size=16
    )
    args.update(kw)
    return ImageNetDataModule(**args)


def test_public_names():
    import lightning_ssl.datamodules as datamodules

    assert {"ImageNetDataModule", "CIFAR10DataModule", "DigitsDataModule"} <= set(datamodules.__all__)
    assert DigitsDataModule is datamodules.DigitsDataModule


def test_imagenet_two_view_batches_and_labeled_loaders(imagenet_tree):
    dm = _imagenet(imagenet_tree)
    dm.setup("fit")
    assert dm.classes == WNIDS and len(dm._base_dataset("train")) == 60
    loader = dm.train_dataloader()
    assert loader.drop_last and len(loader) == 60 // 8
    views, target = next(iter(loader))
    assert len(views) == 2 and all(v.shape == (8, 3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert not torch.allclose(views[0], views[1]) and target.shape == (8,)
    images, labels = next(iter(dm.labeled_dataloader("val")))
    assert images.shape == (12, 3, 32, 32) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # un-augmented: two passes give the same tensors
    again, _ = next(iter(dm.labeled_dataloader("val")))
    torch.testing.assert_close(images, again)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        dm.labeled_dataloader("test")


def test_imagenet_split_names_drop_last_and_eval_sizes(cifar_tree):
    dm = _imagenet(cifar_tree, val_split="test", batch_size=7, drop_last=False, eval_resize=None, eval_crop=None)
    assert len(dm.train_dataloader()) == int(np.ceil(40 / 7))
    x, y = next(iter(dm.labeled_dataloader("val")))
    assert x.shape == (16, 3, 32, 32)
    dm = _imagenet(cifar_tree, val_split="test", batch_size=7, drop_last=True, eval_resize=64, eval_crop=48)
    assert len(dm.train_dataloader()) == 40 // 7
    assert next(iter(dm.labeled_dataloader("val")))[0].shape[-2:] == (48, 48)


def test_imagenet_class_subset_from_file(imagenet_tree, tmp_path):
    listing = tmp_path / "imagenet100.txt"
    listing.write_text(f"# a subset\n{WNIDS[2]} tench\n\n{WNIDS[0]}\n")
    dm = _imagenet(imagenet_tree, class_list=str(listing))
    assert dm.classes == [WNIDS[0], WNIDS[2]]
    _, labels = next(iter(dm.labeled_dataloader("val")))
    assert labels.tolist() == [0] * 4 + [1] * 4
    listing.write_text("n99999999\n")
    with pytest.raises(FileNotFoundError, match="n99999999"):
        _imagenet(imagenet_tree, class_list=str(listing)).setup()


def test_labeled_fraction_is_class_balanced_and_deterministic(imagenet_tree):
    dm = _imagenet(imagenet_tree, labeled_fraction=0.1)
    idx = dm.labeled_indices()
    targets = np.asarray(dm._base_dataset("train").targets)
    assert np.bincount(targets[idx]).tolist() == [2, 2, 2]
    assert idx == _imagenet(imagenet_tree, labeled_fraction=0.1).labeled_indices()
    assert idx != _imagenet(imagenet_tree, labeled_fraction=0.1, fraction_seed=1).labeled_indices()
    images, labels = next(iter(dm.labeled_dataloader("train")))
    assert images.shape[0] == 6 and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    # fine-tuning views of the labeled subset
    x, _ = next(iter(dm.labeled_dataloader("train", augment=True)))
    assert x.shape == (6, 3, 32, 32)
    # 1% of 1,300 per class -> 13 per class, as in SimCLR's semi-supervised setting
    assert np.bincount(
        np.asarray([0] * 1300 + [1] * 1300)[balanced_fraction([0] * 1300 + [1] * 1300, 0.01)]
    ).tolist() == [13, 13]
    with pytest.raises(ValueError, match="labeled_fraction"):
        _imagenet(imagenet_tree, labeled_fraction=0.0)


def test_labeled_list_file(imagenet_tree, tmp_path):
    names = tmp_path / "1percent.txt"
    names.write_text(f"{WNIDS[0]}_3.JPEG\n{WNIDS[1]}_7.JPEG\n")
    dm = _imagenet(imagenet_tree, labeled_list=str(names))
    _, labels = next(iter(dm.labeled_dataloader("train")))
    assert labels.tolist() == [0, 1]


def test_gpu_augment_path_ships_uint8_and_makes_views_after_transfer(imagenet_tree):
    dm = _imagenet(imagenet_tree, gpu_augment=True, gpu_load_size=40, augmentation="byol")
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["uint8_images"].dtype == torch.uint8 and batch["uint8_images"].shape == (8, 3, 40, 40)
    widths = batch["sizes"][:, 1]
    assert ((widths >= 40) & (widths < 90)).all()  # the original sizes travel with the pixels
    assert batch["seed"].shape == (8,)  # each sample's seed in this epoch

    def views(b):
        b = dm.on_before_batch_transfer(dict(b), 0)
        return dm.on_after_batch_transfer(b, 0)

    first, target = views(batch)
    assert [v.shape for v in first] == [(8, 3, 32, 32)] * 2 and target.shape == (8,)
    # the views depend on the samples (their seeds) only: the same batch gives the same views
    torch.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(first, views(batch)[0]))
    # other batches pass through untouched
    plain = (torch.zeros(2, 3, 4, 4), torch.zeros(2))
    assert dm.on_after_batch_transfer(plain, 0) is plain


def test_cifar10_image_tree_is_detected(cifar_tree):
    dm = CIFAR10DataModule(root=str(cifar_tree), num_workers=0, batch_size=8)
    dm.setup()
    assert dm._resolved_source() == "folder"
    views, _ = next(iter(dm.train_dataloader()))
    assert [v.shape for v in views] == [(8, 3, 32, 32)] * 2
    images, labels = next(iter(dm.labeled_dataloader("val")))
    assert images.shape == (20, 3, 32, 32) and labels.max() == 9


def _fake_cifar_binaries(root: Path, per_batch: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES}, f)
    return root


def test_cifar10_binaries_are_read_without_download(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # fake files in the real format: only the md5 checks are bypassed
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    root = _fake_cifar_binaries(tmp_path)
    dm = CIFAR10DataModule(root=str(root), num_workers=0, batch_size=6, gpu_augment=True)
    assert dm._resolved_source() == "binary"
    batch = next(iter(dm.train_dataloader()))
    views, _ = dm.on_after_batch_transfer(batch, 0)
    assert [v.shape for v in views] == [(6, 3, 32, 32)] * 2
    images, labels = next(iter(dm.labeled_dataloader("val")))
    assert images.shape == (6, 3, 32, 32)


def test_cifar10_never_downloads_unless_asked(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "download", lambda self: pytest.fail("download attempted"))
    with pytest.raises(FileNotFoundError, match="download=True"):
        CIFAR10DataModule(root=str(tmp_path / "nothing"), num_workers=0).setup()
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="not found or corrupted"):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup()


# --------------------------------------------------------------------------------- configs & CLI
CONFIGS = {
    "simclr_cifar10": ("SimCLR", "CIFAR10DataModule", "resnet18", "simclr", {"temperature": 0.5}),
    "moco_cifar10": ("MoCo", "CIFAR10DataModule", "resnet18", "moco_cifar", {"temperature": 0.1}),
    "mocov2_cifar10": ("MoCoV2", "CIFAR10DataModule", "resnet18", "moco_v2", {"temperature": 0.2}),
    "byol_cifar10": ("BYOL", "CIFAR10DataModule", "resnet18", "byol", {}),
    "simclr_imagenet": ("SimCLR", "ImageNetDataModule", "resnet50", "simclr", {"temperature": 0.1}),
    "moco_imagenet": ("MoCo", "ImageNetDataModule", "resnet50", "moco_v1", {"temperature": 0.07}),
    "mocov2_imagenet": ("MoCoV2", "ImageNetDataModule", "resnet50", "moco_v2", {"temperature": 0.2}),
    "byol_imagenet": ("BYOL", "ImageNetDataModule", "resnet50", "byol", {"ema_tau": 0.996}),
    "cpc_cifar10": ("CPC", "CIFAR10DataModule", "resnet18", "cpc", {"bidirectional": False}),
    "cpcv2_cifar10": ("CPCv2", "CIFAR10DataModule", "resnet18", "cpc_v2", {"bidirectional": True}),
    "cpc_imagenet": ("CPC", "ImageNetDataModule", "resnet50", "cpc", {"encoder_norm": "batch"}),
    "cpcv2_imagenet": ("CPCv2", "ImageNetDataModule", "resnet50", "cpc_v2", {"encoder_norm": "layer"}),
    "swav_cifar10": ("SwAV", "CIFAR10DataModule", "resnet18", "simclr", {"queue_length": 3840}),
    "swav_imagenet": ("SwAV", "ImageNetDataModule", "resnet50", "simclr", {"epsilon": 0.05, "iterations": 3}),
    "dino_cifar10": ("DINO", "CIFAR10DataModule", "resnet18", "byol", {"student_temperature": 0.1}),
    "dino_imagenet": ("DINO", "ImageNetDataModule", "vit_b_16", "byol", {"clip_grad": 3.0}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_instantiate(name, monkeypatch):
    """Every config parses against the constructors and builds its method and datamodule."""
    import sys

    from lightning_ssl.cli import SSLCLI
    from lightning_ssl.datamodules.augmentations import preset
    from lightning_ssl.methods.base import SSLMethod

    monkeypatch.setattr(sys, "argv", ["lightning-ssl"])
    method, datamodule, backbone, augmentation, attrs = CONFIGS[name]
    cli = SSLCLI(
        SSLMethod,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        auto_configure_optimizers=False,
        args=[
            "--config",
            str(REPO / "configs" / f"{name}.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.strategy",
            "auto",
            "--trainer.precision",
            "32",
            "--trainer.sync_batchnorm",
            "false",
            "--trainer.logger",
            "false",
        ],
    )
    assert type(cli.model).__name__ == method and type(cli.datamodule).__name__ == datamodule
    assert cli.model.hparams.backbone == backbone
    for key, value in attrs.items():
        assert getattr(cli.model, key) == value
    small = name.endswith("cifar10")
    assert cli.model.hparams.small_image is small
    dm = cli.datamodule
    if name.startswith("cpc"):
        return  # CPC's views: tests/test_configs.py checks them against the config headers
    expected = preset(
        augmentation, 32 if small else 224, 0.5 if name == "simclr_cifar10" else 1.0, small, dm.mean, dm.std
    )
    if dm.local_crops:  # multi-crop: the recipe's global views at their own scale, then the local views
        assert len(dm.views) == dm.global_crops + dm.local_crops
        assert all(v.size == dm.hparams.local_size for v in dm.views[dm.global_crops :])
        expected = [v.replace(scale=w.scale) for v, w in zip(expected, dm.views)]
    assert dm.views[: len(expected)] == expected


def _fit_args(root, *extra, config="simclr_cifar10"):
    return [
        "fit",
        "--config",
        str(REPO / "configs" / f"{config}.yaml"),
        "--data.init_args.root",
        str(root),
        "--trainer.max_steps",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "[]",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        *extra,
    ]


@pytest.mark.parametrize("gpu_augment", ["false", "true"])
def test_cli_fit_simclr_on_a_cifar10_tree(cifar_tree, gpu_augment, monkeypatch, tmp_path):
    import sys

    from lightning_ssl.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-ssl"])
    monkeypatch.chdir(tmp_path)
    seen = {}
    original = pl.LightningModule.optimizer_step

    def spy(self, *args, **kwargs):
        seen.setdefault("steps", 0)
        seen["steps"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "optimizer_step", spy)
    main(_fit_args(cifar_tree, "--data.init_args.gpu_augment", gpu_augment))
    assert seen["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("config", ["moco_cifar10", "mocov2_cifar10", "byol_cifar10", "swav_cifar10", "dino_cifar10"])
def test_cli_fit_other_cifar10_configs(cifar_tree, config, monkeypatch, tmp_path):
    import sys

    from lightning_ssl.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-ssl"])
    monkeypatch.chdir(tmp_path)
    # batch 4 here: MoCo's 8 simulated devices need a batch that 8 divides
    split = ("--model.init_args.split_bn_groups", "2") if config.startswith("moco") else ()
    main(_fit_args(cifar_tree, "--data.init_args.gpu_augment", "true", *split, config=config))


@pytest.mark.real_data
def test_cli_fit_simclr_on_the_real_cifar10_copy(cifar10_root, monkeypatch, tmp_path):
    import sys

    from lightning_ssl.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-ssl"])
    monkeypatch.chdir(tmp_path)
    main(_fit_args(cifar10_root, "--data.init_args.gpu_augment", "true"))
    dm = CIFAR10DataModule(root=str(cifar10_root), num_workers=0)
    dm.setup()
    assert len(dm._base_dataset("train")) == 50000 and len(dm._base_dataset("val")) == 10000
