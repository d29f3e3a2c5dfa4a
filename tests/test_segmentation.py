"""FCN-8s head, mIoU, and a short training run on a generated Cityscapes-layout tree."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import quiet_trainer

from lightning_ssl import SimCLR, build_backbone
from lightning_ssl.datamodules import CityscapesDataModule
from lightning_ssl.datamodules.synthetic_cityscapes import make_synthetic_cityscapes
from lightning_ssl.evaluation import FCN8s, SegmentationModule, mean_iou
from lightning_ssl.evaluation.segmentation import BilinearUpsample2x


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_fcn8s_output_has_input_spatial_size(arch):
    encoder, _ = build_backbone(arch)
    model = FCN8s(encoder, num_classes=19).eval()
    for h, w in [(32, 64), (37, 53)]:
        with torch.no_grad():
            out = model(torch.randn(1, 3, h, w))
        assert out.shape == (1, 19, h, w)


def test_fcn8s_fuses_all_three_strides():
    model = FCN8s(torchvision.models.resnet18(), num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    for layer in (model.score8, model.score16, model.score32):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_miou_of_perfect_prediction_is_one_and_ignores_255():
    target = torch.randint(0, 19, (2, 16, 16))
    target[:, :4] = 255
    pred = target.clone()
    pred[:, :4] = 3  # anything where the target is ignored
    assert mean_iou(pred, target) == pytest.approx(1.0)
    pred[0, 8, 8] = (target[0, 8, 8] + 1) % 19
    assert mean_iou(pred, target) < 1.0


def test_backbone_from_ssl_checkpoint_and_supervised_file(tmp_path):
    ssl = SimCLR(backbone="resnet18")
    ckpt = tmp_path / "ssl.ckpt"
    torch.save({"state_dict": ssl.state_dict(), "hyper_parameters": dict(ssl.hparams)}, ckpt)
    seg = SegmentationModule("resnet18", init=str(ckpt))
    assert torch.equal(seg.model.encoder.layer3[0].conv1.weight, ssl.backbone.module.layer3[0].conv1.weight)
    supervised = torchvision.models.resnet18(num_classes=19)  # any classifier size
    torch.save(supervised.state_dict(), tmp_path / "sup.pt")
    seg = SegmentationModule("resnet18", init=str(tmp_path / "sup.pt"))
    assert torch.equal(seg.model.encoder.conv1.weight, supervised.conv1.weight)


def test_training_on_generated_tree_improves_miou(tmp_path):
    torch.set_num_threads(2)
    root = make_synthetic_cityscapes(tmp_path / "cs", num_train=16, num_val=4, width=64, height=32)
    dm = CityscapesDataModule(
        str(root),
        mode="segmentation",
        batch_size=8,
        num_workers=0,
        crop_size=32,
        base_size=32,
        scale_range=(0.75, 1.25),
    )
    # the reference's fixed upsampling: in these 16 steps the learned one (the default) trains slower
    model = SegmentationModule("resnet18", num_classes=19, lr=0.05, learn_upsampling=False)
    trainer = quiet_trainer(
        max_epochs=8,
        num_sanity_val_steps=0,
        inference_mode=False,
    )  # validate() before fit() on one trainer
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/miou"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/miou"]
    print(f"mIoU before {before:.3f} after {after:.3f}")
    assert after > 2 * before + 0.02, (before, after)


@pytest.mark.parametrize("side", [5, 8])
def test_learned_x2_upsampling_starts_as_bilinear_interpolation(side):
    torch.manual_seed(0)
    x = torch.randn(2, 3, side, side + 2)
    up = BilinearUpsample2x(3)
    expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x), expected)
    assert up.weight.requires_grad  # learned (Long et al. 2015: deconvolutions initialized to bilinear)


def test_fcn8s_before_training_equals_fixed_bilinear_fcn8s_and_learns_its_x2_upsamplings():
    """Long et al.: the two x2 upsamplings learn from bilinear initialization; the final x8 is fixed."""
    torch.manual_seed(0)
    model = FCN8s(torchvision.models.resnet18(weights=None), num_classes=4).eval()
    for layer in (model.score8, model.score16):  # non-zero skips, so every path reaches the output
        torch.nn.init.normal_(layer.weight)
    x = torch.randn(1, 3, 64, 96)
    c8, c16, c32 = model.features(x)
    up = lambda t, ref: torch.nn.functional.interpolate(t, size=ref.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
    s16 = model.score16(c16) + up(model.score32(c32), c16)
    fixed = up(model.score8(c8) + up(s16, c8), x)
    torch.testing.assert_close(model(x), fixed)
    learned = {n for n, p in model.named_parameters() if n.startswith("up") and p.requires_grad}
    assert learned == {"up32.weight", "up16.weight"}
    fixed = FCN8s(torchvision.models.resnet18(weights=None), num_classes=4, learn_upsampling=False)
    assert not any(p.requires_grad for n, p in fixed.named_parameters() if n.startswith("up"))
    model(x).sum().backward()
    assert model.up32.weight.grad.abs().sum() > 0 and model.up16.weight.grad.abs().sum() > 0
