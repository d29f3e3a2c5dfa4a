"""Multi-crop (Caron et al. 2020): K global and M local views of their own sizes and scales, on the CPU
path and the on-device path (run here on CPU tensors); two views exactly as before when M = 0."""

from __future__ import annotations

import pytest
import torch

from lightning_ssl.datamodules import InMemoryDataModule
from lightning_ssl.datamodules.augmentations import multi_crop, preset
from lightning_ssl.datamodules.gpu_augment import GPUAugment


def _images(n: int = 8, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8), torch.arange(n) % 2


def _datamodule(**kwargs) -> InMemoryDataModule:
    images, labels = _images()
    return InMemoryDataModule(images, labels, batch_size=4, num_workers=0, **kwargs)


def test_defaults_keep_the_recipe_views():
    for name in ("simclr", "byol", "moco_v2"):
        views = preset(name, 32)
        assert multi_crop(views) == views
        assert _datamodule(augmentation=name).views == views


def test_global_and_local_configs():
    views = multi_crop(preset("byol", 224), 3, 6, 96, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))
    assert len(views) == 9
    b1, b2 = preset("byol", 224)
    assert views[0] == b1.replace(scale=(0.4, 1.0)) and views[1] == b2.replace(scale=(0.4, 1.0))
    assert views[2] == views[0]  # cycled
    local = views[3]
    assert all(v == local for v in views[3:])
    assert local.size == 96 and local.scale == (0.05, 0.4)
    assert local.blur_p == 0.5 and local.solarize_p == 0.0 and local.blur_kernel % 2 == 1
    assert multi_crop(preset("mae", 32), 1, 0) == preset("mae", 32)  # one view: MAE, I-JEPA
    assert multi_crop(preset("simclr", 32), 1, 0) == preset("simclr", 32)[:1]
    with pytest.raises(ValueError, match="global_crops"):
        multi_crop(preset("simclr", 32), 0, 4)


def test_cpu_path_views_have_the_configured_sizes_and_counts():
    dm = _datamodule(global_crops=2, local_crops=3, local_size=12, local_scale=(0.1, 0.3))
    views, target = next(iter(dm.train_dataloader()))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 12, 12)] * 3
    assert target.shape == (4,)
    assert not torch.equal(views[2], views[3])  # each local view its own crop


def _device_views(dm):
    batch = next(iter(dm.train_dataloader()))
    batch = dm.on_before_batch_transfer(dict(batch), 0)
    return dm.on_after_batch_transfer(batch, 0)


def test_on_device_path_views_have_the_configured_sizes_and_counts():
    dm = _datamodule(gpu_augment=True, global_crops=2, local_crops=4, local_size=16)
    assert dm.augmenter.counts == [2, 4]  # one batched call per resolution (simclr's globals are equal)
    views, target = _device_views(dm)
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 4
    assert target.shape == (4,)
    assert all(not torch.equal(views[i], views[i + 1]) for i in range(5))
    # byol's two globals differ: each its own call; the locals one call
    assert _datamodule(gpu_augment=True, augmentation="byol", local_crops=2, local_size=8).augmenter.counts == [
        1,
        1,
        2,
    ]


def test_on_device_default_makes_each_view_in_its_own_call_as_before():
    images, _ = _images(4)
    views = preset("simclr", 32)
    plain, grouped = GPUAugment(views), GPUAugment(views, group_identical=True)
    assert plain.counts == [1, 1] and grouped.counts == [2]
    assert _datamodule(gpu_augment=True).augmenter.counts == [1, 1]
    a = plain(images, generator=torch.Generator().manual_seed(3))
    g, x, side = torch.Generator().manual_seed(3), images.float() / 255, torch.full((4,), 32)
    b = [v.apply(x, side, side, v.sample_params(side, side, g)) for v in plain.views]  # the earlier loop
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    grouped_views = grouped(images, generator=torch.Generator().manual_seed(3))
    assert [tuple(v.shape) for v in grouped_views] == [(4, 3, 32, 32)] * 2


@pytest.mark.parametrize("gpu_augment", [False, True])
def test_swav_and_dino_fit_on_multi_crop_batches(tmp_path, gpu_augment):
    from conftest import TinyConvNet
    from helpers import quiet_trainer

    from lightning_ssl import DINO, SwAV

    for method in (
        SwAV(TinyConvNet(), projection_hidden_dim=16, projection_dim=8, num_prototypes=6, warmup_epochs=0),
        DINO(TinyConvNet(), out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, warmup_epochs=0),
    ):
        dm = _datamodule(gpu_augment=gpu_augment, local_crops=3, local_size=12)
        trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
        trainer.fit(method, dm)
        assert trainer.global_step == 2
