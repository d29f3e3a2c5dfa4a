"""Cityscapes datamodule on small generated trees in the exact official layout."""

from __future__ import annotations

import warnings

import pytest
import torch
from torchvision.io import write_png

from lightning_ssl.datamodules import CityscapesDataModule
from lightning_ssl.datamodules.cityscapes import (
    CITYSCAPES_CLASSES,
    CityscapesSegmentation,
    cityscapes_pairs,
    label_ids_to_train_ids,
)
from lightning_ssl.datamodules.synthetic_cityscapes import make_synthetic_cityscapes

# cityscapesScripts/helpers/labels.py, verbatim: (name, id, trainId)
OFFICIAL = [
    ("unlabeled", 0, 255),
    ("ego vehicle", 1, 255),
    ("rectification border", 2, 255),
    ("out of roi", 3, 255),
    ("static", 4, 255),
    ("dynamic", 5, 255),
    ("ground", 6, 255),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, 255),
    ("rail track", 10, 255),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, 255),
    ("bridge", 15, 255),
    ("tunnel", 16, 255),
    ("pole", 17, 5),
    ("polegroup", 18, 255),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, 255),
    ("trailer", 30, 255),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
]


def test_label_id_to_train_id_matches_official_table():
    ids = torch.tensor([i for _, i, _ in OFFICIAL], dtype=torch.uint8)
    expected = torch.tensor([t for _, _, t in OFFICIAL])
    assert torch.equal(label_ids_to_train_ids(ids), expected)
    # ids outside the table (e.g. license plate's -1 stored as 255 in some tools) are ignored
    assert label_ids_to_train_ids(torch.arange(34, 256, dtype=torch.uint8)).eq(255).all()
    names = [n for n, _, t in sorted(OFFICIAL, key=lambda r: r[2]) if t != 255]
    assert tuple(names) == CITYSCAPES_CLASSES


@pytest.fixture
def tree(tmp_path):
    return make_synthetic_cityscapes(tmp_path / "cityscapes", num_train=6, num_val=3, width=64, height=32, num_extra=2)


def test_layout_and_masks_are_train_ids(tree):
    pairs = cityscapes_pairs(tree, "train")
    assert len(pairs) == 6
    image, label = pairs[0]
    assert image.relative_to(tree).parts[:2] == ("leftImg8bit", "train") and image.name.endswith("_leftImg8bit.png")
    assert label.relative_to(tree).parts[:2] == ("gtFine", "train") and label.name.endswith("_gtFine_labelIds.png")
    _, mask = CityscapesSegmentation(tree, "val")[0]
    values = set(mask.unique().tolist())
    assert values <= set(range(19)) | {255} and 255 in values and len(values) > 5


def test_missing_root_or_split_names_path_and_layout(tmp_path, tree):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*leftImg8bit/<split>/<city>"):
        CityscapesDataModule(str(tmp_path / "nowhere"))
    dm = CityscapesDataModule(str(tree), mode="segmentation", num_workers=0)
    (tree / "gtFine" / "val").rename(tree / "gtFine" / "val_moved")
    with pytest.raises(FileNotFoundError, match=r"gtFine/val.*gtFine_labelIds"):
        dm.val_dataloader()


def test_image_without_label_is_skipped_with_one_warning_or_raises_when_strict(tree):
    labels = sorted((tree / "gtFine" / "train").glob("*/*_labelIds.png"))
    labels[0].unlink()
    labels[1].unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = cityscapes_pairs(tree, "train")
    relevant = [w for w in caught if "no label file" in str(w.message)]
    assert len(pairs) == 4 and len(relevant) == 1 and labels[0].name in str(relevant[0].message)
    with pytest.raises(FileNotFoundError, match=labels[0].name):
        cityscapes_pairs(tree, "train", strict=True)


def test_ssl_mode_yields_two_unlabeled_views(tree):
    dm = CityscapesDataModule(str(tree), mode="ssl", batch_size=4, num_workers=0, image_size=24, use_train_extra=True)
    assert len(dm.train_dataset()) == 8  # train + train_extra
    views, target = next(iter(dm.train_dataloader()))
    assert len(views) == 2 and views[0].shape == (4, 3, 24, 24) and views[0].dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    assert torch.equal(target, torch.full((4,), -1))
    assert len(CityscapesDataModule(str(tree), mode="ssl").train_dataset()) == 6


def test_segmentation_mode_joint_crop_and_labeled_subset(tree):
    dm = CityscapesDataModule(
        str(tree), mode="segmentation", batch_size=2, num_workers=0, crop_size=24, base_size=32, num_labeled=3
    )
    assert len(dm.train_dataset()) == 3
    assert dm.labeled_indices() == CityscapesDataModule(str(tree), mode="segmentation", num_labeled=3).labeled_indices()
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 24, 24) and masks.shape == (2, 24, 24) and masks.dtype == torch.long
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape[-2:] == masks.shape[-2:] == (32, 64)
    with pytest.raises(ValueError, match="only 6 labeled"):
        CityscapesDataModule(str(tree), mode="segmentation", num_labeled=100).train_dataset()


def test_joint_transform_keeps_image_and_mask_aligned(tmp_path):
    # an image whose left half is white and labeled road (7), right half black and labeled sky (23)
    root = tmp_path / "cs"
    (root / "leftImg8bit" / "train" / "x").mkdir(parents=True)
    (root / "gtFine" / "train" / "x").mkdir(parents=True)
    image = torch.zeros(3, 32, 64, dtype=torch.uint8)
    image[:, :, :32] = 255
    labels = torch.full((1, 32, 64), 23, dtype=torch.uint8)
    labels[:, :, :32] = 7
    write_png(image, str(root / "leftImg8bit" / "train" / "x" / "x_000000_000000_leftImg8bit.png"))
    write_png(labels, str(root / "gtFine" / "train" / "x" / "x_000000_000000_gtFine_labelIds.png"))
    dm = CityscapesDataModule(str(root), mode="segmentation", batch_size=1, num_workers=0, crop_size=40, base_size=32)
    dataset = dm.train_dataset()
    for _ in range(10):
        img, mask = dataset[0]
        value = img.mean(0)  # white is about 3.8 after normalization, black about -1.5
        assert (mask[value > 3.0] == 0).all() and (mask[value < -1.4] != 0).all()
        assert (value[mask == 0] > 0).all() and (value[mask == 10] < 0).all()
        assert (mask == 0).any() or (mask == 10).any()
