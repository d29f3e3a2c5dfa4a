"""ViT backbones: torchvision's by name and as modules of any size, timm's as ``timm:<name>`` (skipped
without timm), token features, layer-wise lr decay groups, and a ViT trained end to end with multi-crop."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import quiet_trainer
from torch import nn

from lightning_ssl import DINO, SwAV
from lightning_ssl.backbones import ViTBackbone, build_backbone, token_features, vit_depth, vit_parameter_groups
from lightning_ssl.datamodules import InMemoryDataModule


def tiny_vit() -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )


def test_torchvision_vit_by_name_takes_other_sizes():
    backbone, dim = build_backbone("vit_b_16")
    assert isinstance(backbone, ViTBackbone) and dim == 768 and vit_depth(backbone) == 12
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 768)  # position embeddings interpolated


def test_vit_backbone_equals_torchvision_at_its_size():
    reference = tiny_vit().eval()
    reference.heads = nn.Identity()
    backbone, _ = build_backbone(tiny_vit())
    backbone.module.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), reference(x))


def test_tiny_vit_module_tokens_and_feature_dim():
    backbone, dim = build_backbone(tiny_vit())
    assert isinstance(backbone, ViTBackbone) and dim == 16
    x = torch.randn(3, 3, 16, 16)
    backbone.eval()
    cls, patches = token_features(backbone, x)
    assert cls.shape == (3, 16) and patches.shape == (3, 16, 16)
    torch.testing.assert_close(cls, backbone(x))
    assert backbone(torch.randn(2, 3, 8, 8)).shape == (2, 16)  # a local view: 2 x 2 patches
    cnn, _ = build_backbone("resnet18", small_image=True)
    x = torch.randn(2, 3, 16, 16)
    cnn.eval()
    pooled, maps = token_features(cnn, x)
    assert pooled.shape == (2, 512) and maps.shape == (2, 4, 512)
    torch.testing.assert_close(pooled, cnn(x))


def test_timm_vit_by_prefixed_name():
    pytest.importorskip("timm")
    backbone, dim = build_backbone("timm:vit_tiny_patch16_224")
    assert dim == 192 and vit_depth(backbone) == 12
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    with torch.no_grad():
        cls, patches = token_features(backbone, x)
        assert patches.shape == (2, 4, 192)
        torch.testing.assert_close(cls, backbone(x))
    with pytest.raises(ValueError, match="weights_path"):
        build_backbone("timm:vit_tiny_patch16_224", weights_path="w.pt")


def test_layer_wise_decay_groups():
    model = SwAV(tiny_vit(), projection_hidden_dim=8, projection_dim=4, num_prototypes=3, layer_decay=0.5)
    groups = model.parameter_groups(0.1)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())

    def group(name):
        return where[id(named[name])]

    for name, scale, decay in [
        ("backbone.module.conv_proj.weight", 0.125, 0.1),
        ("backbone.module.conv_proj.bias", 0.125, 0.0),
        ("backbone.module.class_token", 0.125, 0.0),
        ("backbone.module.encoder.pos_embedding", 0.125, 0.0),
        ("backbone.module.encoder.layers.encoder_layer_0.mlp.0.weight", 0.25, 0.1),
        ("backbone.module.encoder.layers.encoder_layer_0.ln_1.weight", 0.25, 0.0),
        ("backbone.module.encoder.layers.encoder_layer_1.self_attention.in_proj_weight", 0.5, 0.1),
        ("backbone.module.encoder.ln.weight", 1.0, 0.0),
        ("projector.0.weight", 1.0, 0.1),
        ("prototypes.weight", 1.0, 0.1),
    ]:
        g = group(name)
        assert (g["lr_scale"], g["weight_decay"], g["lars_exclude"]) == (scale, decay, decay == 0.0), name
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="layer_decay"):
        SwAV(tiny_vit(), layer_decay=0.0)


def test_timm_layer_ids():
    pytest.importorskip("timm")
    backbone, _ = build_backbone("timm:vit_tiny_patch16_224")
    groups = vit_parameter_groups(backbone, backbone, 0.05, layer_decay=0.9)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(backbone.named_parameters())
    assert where[id(named["module.pos_embed"])]["lr_scale"] == pytest.approx(0.9**13)
    assert where[id(named["module.pos_embed"])]["weight_decay"] == 0.0
    assert where[id(named["module.cls_token"])]["weight_decay"] == 0.0
    assert where[id(named["module.blocks.11.mlp.fc1.weight"])]["lr_scale"] == pytest.approx(0.9)
    assert where[id(named["module.norm.weight"])]["lr_scale"] == 1.0


def test_dino_with_a_tiny_vit_fits_on_multi_crop_views(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    data = InMemoryDataModule(
        images,
        torch.zeros(16, dtype=torch.long),
        batch_size=4,
        num_workers=0,
        image_size=16,
        local_crops=2,
        local_size=8,
    )
    model = DINO(tiny_vit(), out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, warmup_epochs=0, layer_decay=0.75)
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert trainer.global_step == 3
    groups = trainer.optimizers[0].param_groups
    peak = max(g["initial_lr"] for g in groups)
    scales = {round(g["initial_lr"] / peak, 6) for g in groups}
    assert scales == {1.0, 0.75, round(0.75**2, 6), round(0.75**3, 6)}  # embeddings, 2 blocks, final norm and heads


def test_dino_by_timm_name_fits(tmp_path):
    pytest.importorskip("timm")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    data = InMemoryDataModule(images, torch.zeros(8, dtype=torch.long), batch_size=4, num_workers=0, image_size=32)
    model = DINO("timm:vit_tiny_patch16_224", out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, warmup_epochs=0)
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert trainer.global_step == 2 and model.hparams.backbone == "timm:vit_tiny_patch16_224"
