"""The embedded quickstart dataset: real digits, fixed split, two-view batches, no download."""

import pytest
import torch

from lightning_ssl.datamodules import DigitsDataModule


def test_split_is_fixed_and_stratified():
    a, b = DigitsDataModule(), DigitsDataModule()
    train_a, train_b, val = a._base_dataset("train"), b._base_dataset("train"), a._base_dataset("val")
    xa, ya, xb, yb, yv = train_a.images, train_a.labels, train_b.images, train_b.labels, val.labels
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(ya) + len(yv) == 1797 and len(yv) == 360
    assert xa.dtype == torch.uint8 and xa.shape[1:] == (3, 32, 32)
    assert yv.bincount().min() >= 34  # every digit is held out in proportion


def test_two_view_batches_and_labeled_loaders():
    dm = DigitsDataModule(batch_size=16)
    views, target = next(iter(dm.train_dataloader()))
    assert len(views) == 2 and views[0].shape == (16, 3, 32, 32) and views[0].dtype == torch.float32
    assert not torch.equal(views[0], views[1])  # independent augmentations
    images, labels = next(iter(dm.labeled_dataloader("val")))
    assert images.shape[1:] == (3, 32, 32) and labels.dtype == torch.long
    again, _ = next(iter(dm.labeled_dataloader("val")))
    assert torch.equal(images, again)  # evaluation images are not augmented


def test_digits_views_on_the_device_path():
    """The digits recipe (rotation and shear included) runs on the on-device path too."""
    dm = DigitsDataModule(batch_size=16, gpu_augment=True)
    batch = next(iter(dm.train_dataloader()))
    views, target = dm.on_after_batch_transfer(batch, 0)
    assert len(views) == 2 and views[0].shape == (16, 3, 32, 32) and target.shape == (16,)
    assert not torch.equal(views[0], views[1])


def test_bad_split_and_fraction():
    with pytest.raises(ValueError, match="split must be"):
        DigitsDataModule().labeled_dataloader("test")
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
