"""The embedded quickstart dataset: real digits, fixed split, two-view batches, no download."""
import torch

from datamodules import DigitsDataModule


def test_split_is_fixed_and_stratified():
    a, b = DigitsDataModule(), DigitsDataModule()
    xa, ya = a._split("train")
    xb, yb = b._split("train")
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xv, yv = a._split("val")
    assert len(ya) + len(yv) == 1797 and len(yv) == 360
    assert xa.dtype == torch.uint8 and xa.shape[1:] == (3, 32, 32)
    assert yv.bincount().min() >= 34  # every digit is held out in proportion


def test_two_view_batches_and_labelled_loaders():
    dm = DigitsDataModule(batch_size=16)
    views, target = next(iter(dm.train_dataloader()))
    assert len(views) == 2 and views[0].shape == (16, 3, 32, 32) and views[0].dtype == torch.float32
    assert not torch.equal(views[0], views[1])  # independent augmentations
    images, labels = next(iter(dm.labelled_dataloader("val")))
    assert images.shape[1:] == (3, 32, 32) and labels.dtype == torch.long
    again, _ = next(iter(dm.labelled_dataloader("val")))
    assert torch.equal(images, again)  # evaluation images are not augmented


def test_bad_split_and_fraction():
    import pytest

    with pytest.raises(ValueError, match="split must be"):
        DigitsDataModule().labelled_dataloader("test")
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
