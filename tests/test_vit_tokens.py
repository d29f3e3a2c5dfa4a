"""Token access to ViTs (``lightning_ssl.vit``): dropping patches, mask tokens, sin-cos positions, the frozen
patch projection, patchify, for torchvision and timm ViTs; the ``vit_<size>_<patch>`` backbone names."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from lightning_ssl.backbones import (
    VIT_SIZES,
    build_backbone,
    interpolate_positions,
    reset_parameters,
    vision_transformer,
)
from lightning_ssl.vit import (
    encode_tokens,
    freeze_patch_projection,
    is_vit,
    patch_grid,
    patchify,
    sincos_1d,
    sincos_2d,
    unpatchify,
    use_sincos_positions,
    vit_patch_size,
    vit_width,
)


def tiny_vit(image_size: int = 16) -> nn.Module:
    torch.manual_seed(0)
    module = torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    return build_backbone(module)[0].eval()


def timm_vit() -> nn.Module:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    return build_backbone("timm:vit_tiny_patch16_224")[0].eval()


BACKBONES = {"torchvision": (tiny_vit, 16), "timm": (timm_vit, 224)}  # timm at its own grid: no resizing


def reference_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All tokens the library's plain forward computes (``ViTBackbone.tokens`` / timm's ``forward_features``)."""
    inner = backbone.module
    if isinstance(inner, torchvision.models.VisionTransformer):
        return backbone.tokens(images)
    return inner.forward_features(images)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_unmasked_tokens_equal_the_plain_forward(kind):
    make, size = BACKBONES[kind]
    backbone = make()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tokens = encode_tokens(backbone, x)
        reference = reference_tokens(backbone, x)
    torch.testing.assert_close(tokens.cls, reference[:, 0])
    torch.testing.assert_close(tokens.patches, reference[:, 1:])
    torch.testing.assert_close(tokens.cls, backbone(x))
    torch.testing.assert_close(tokens.mean_patches(), reference[:, 1:].mean(1))


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_kept_patches_equal_a_forward_over_those_tokens_only(kind):
    """Dropping patches equals running the transformer on [cls] + the kept embedded patches: computed here by
    hand from the ViT's own layers, and different from the full forward (attention no longer sees the rest)."""
    make, size = BACKBONES[kind]
    backbone = make()
    inner = backbone.module
    x = torch.randn(2, 3, size, size)
    n = (size // vit_patch_size(backbone)) ** 2
    keep = torch.stack([torch.randperm(n)[: n // 4] for _ in range(2)])
    with torch.no_grad():
        got = encode_tokens(backbone, x, keep=keep)
        if isinstance(inner, torchvision.models.VisionTransformer):
            emb = inner.conv_proj(x).flatten(2).transpose(1, 2) + inner.encoder.pos_embedding[:, 1:]
            cls = inner.class_token + inner.encoder.pos_embedding[:, :1]
            rows = [torch.cat([cls[0], emb[b, keep[b]]]) for b in range(2)]
            expected = inner.encoder.ln(inner.encoder.layers(torch.stack(rows)))
        else:
            emb = inner.patch_embed(x).reshape(2, n, -1) + inner.pos_embed[:, 1:]
            cls = inner.cls_token + inner.pos_embed[:, :1]
            rows = [torch.cat([cls[0], emb[b, keep[b]]]) for b in range(2)]
            expected = inner.norm(inner.blocks(torch.stack(rows)))
        full = encode_tokens(backbone, x)
    assert got.patches.shape == (2, n // 4, vit_width(backbone))
    torch.testing.assert_close(got.cls, expected[:, 0])
    torch.testing.assert_close(got.patches, expected[:, 1:])
    assert not torch.allclose(got.patches, torch.gather(full.patches, 1, keep[..., None].expand_as(got.patches)))


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_mask_token_replaces_exactly_the_masked_patch_embeddings(kind):
    make, size = BACKBONES[kind]
    backbone = make()
    x = torch.randn(2, 3, size, size)
    n = (size // vit_patch_size(backbone)) ** 2
    token = torch.randn(vit_width(backbone))
    none = torch.zeros(2, n, dtype=torch.bool)
    mask = none.clone()
    mask[0, :3] = True
    mask[1, -1] = True
    with torch.no_grad():
        torch.testing.assert_close(encode_tokens(backbone, x, mask=none, mask_token=token).patches,
                                   encode_tokens(backbone, x).patches)  # fmt: skip
        masked = encode_tokens(backbone, x, mask=mask, mask_token=token)
        # the masked patches' pixels no longer matter; an unmasked patch's do
        p = vit_patch_size(backbone)
        cols = size // p
        y = x.clone()
        y[0, :, :p, : 3 * p] = torch.randn(3, p, 3 * p)  # the three masked patches of image 0 (row 0, cols 0-2)
        torch.testing.assert_close(encode_tokens(backbone, y, mask=mask, mask_token=token).patches, masked.patches)
        y[0, :, p : 2 * p, :p] = 5.0  # patch (1, 0): not masked
        assert not torch.allclose(encode_tokens(backbone, y, mask=mask, mask_token=token).patches, masked.patches)
    assert cols >= 3


def test_mask_token_gets_gradient_only_through_masked_patches():
    backbone = tiny_vit().train()
    token = nn.Parameter(torch.zeros(16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    encode_tokens(backbone, torch.randn(2, 3, 16, 16), mask=mask, mask_token=token).patches.sum().backward()
    assert token.grad is not None and torch.count_nonzero(token.grad) == 0
    mask[:, 5] = True
    encode_tokens(backbone, torch.randn(2, 3, 16, 16), mask=mask, mask_token=token).patches.sum().backward()
    assert torch.count_nonzero(token.grad) > 0


def test_other_input_sizes_interpolate_the_positions():
    backbone = tiny_vit()
    x = torch.randn(2, 3, 8, 12)  # a 2 x 3 grid
    with torch.no_grad():
        tokens = encode_tokens(backbone, x)
        inner = backbone.module
        emb = inner.conv_proj(x).flatten(2).transpose(1, 2)
        pos = interpolate_positions(inner.encoder.pos_embedding, (2, 3))
        expected = inner.encoder.ln(
            inner.encoder.layers(torch.cat([(inner.class_token + pos[:, :1]).expand(2, -1, -1), emb + pos[:, 1:]], 1))
        )
    assert tokens.patches.shape == (2, 6, 16)
    torch.testing.assert_close(tokens.patches, expected[:, 1:])
    assert patch_grid(backbone, 8, 12) == (2, 3)


def naive_sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed`` written out entry by entry."""
    out = torch.zeros(rows * cols, dim, dtype=torch.float64)
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            for i in range(quarter):
                omega = 1.0 / 10000 ** (i / quarter)
                out[r * cols + c, i] = math.sin(c * omega)
                out[r * cols + c, quarter + i] = math.cos(c * omega)
                out[r * cols + c, 2 * quarter + i] = math.sin(r * omega)
                out[r * cols + c, 3 * quarter + i] = math.cos(r * omega)
    return out.float()


def test_sincos_tables_against_a_naive_computation():
    torch.testing.assert_close(sincos_2d(16, (3, 5)), naive_sincos_2d(16, 3, 5))
    with_cls = sincos_2d(8, (2, 2), cls_token=True)
    assert with_cls.shape == (5, 8) and torch.equal(with_cls[0], torch.zeros(8))
    assert sincos_1d(4, torch.tensor([0.0])).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, (2, 2))


def test_use_sincos_positions_writes_the_table_and_freezes_it():
    backbone = tiny_vit()
    use_sincos_positions(backbone)
    pos = backbone.module.encoder.pos_embedding
    assert not pos.requires_grad
    torch.testing.assert_close(pos[0, 1:], sincos_2d(16, (4, 4)))
    assert torch.equal(pos[0, 0], torch.zeros(16))
    assert set(backbone.module.state_dict()) == set(tiny_vit().module.state_dict())  # same keys as the plain ViT


def test_use_sincos_positions_on_timm():
    backbone = timm_vit()
    use_sincos_positions(backbone)
    torch.testing.assert_close(backbone.module.pos_embed[0, 1:], sincos_2d(192, (14, 14)))
    assert not backbone.module.pos_embed.requires_grad


def test_frozen_patch_projection_gets_no_update():
    backbone = tiny_vit().train()
    freeze_patch_projection(backbone)
    before = backbone.module.conv_proj.weight.clone()
    opt = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=1.0)
    backbone(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    assert backbone.module.conv_proj.weight.grad is None
    assert torch.equal(backbone.module.conv_proj.weight, before)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, 4)
    assert patches.shape == (2, 6, 48)
    # patch (row 1, col 2) holds the pixels [4:8, 8:12] as (p, p, C)
    torch.testing.assert_close(patches[:, 5].reshape(2, 4, 4, 3), x[:, :, 4:8, 8:12].permute(0, 2, 3, 1))
    torch.testing.assert_close(unpatchify(patches, 4, (2, 3)), x)
    with pytest.raises(ValueError, match="whole number"):
        patchify(torch.randn(1, 3, 10, 8), 4)


def test_bad_inputs_are_named():
    backbone = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="mask_token"):
        encode_tokens(backbone, x, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 x 16 bool"):
        encode_tokens(backbone, x, mask=torch.zeros(2, 9, dtype=torch.bool), mask_token=torch.zeros(16))
    with pytest.raises(ValueError, match="keep must be"):
        encode_tokens(backbone, x, keep=torch.zeros(3, 4, dtype=torch.long))
    cnn = build_backbone("resnet18", small_image=True)[0]
    assert is_vit(backbone) and not is_vit(cnn)
    with pytest.raises(ValueError, match="needs a ViT backbone"):
        encode_tokens(cnn, x)


@pytest.mark.parametrize("name", ["vit_ti_16", "vit_s_16"])
def test_named_vit_sizes(name):
    layers, heads, width, mlp = VIT_SIZES[name.split("_")[1]]
    model = vision_transformer(name)
    assert (len(model.encoder.layers), model.hidden_dim, model.mlp_dim, model.patch_size) == (layers, width, mlp, 16)
    assert model.encoder.layers[0].num_heads == heads
    small = vision_transformer(name, small_image=True)
    assert (small.patch_size, small.image_size) == (4, 32)
    backbone, dim = build_backbone(name, small_image=True)
    assert dim == width and vit_patch_size(backbone) == 4
    assert vision_transformer("resnet18") is None
    assert type(vision_transformer("vit_b_16")) is type(torchvision.models.vit_b_16())


def test_reset_parameters_reinitializes_a_vits_tokens_and_positions():
    backbone = tiny_vit()
    with torch.no_grad():
        backbone.module.encoder.pos_embedding.fill_(1.0)
        backbone.module.class_token.fill_(1.0)
    fresh = reset_parameters(backbone, seed=0)
    assert torch.equal(fresh.module.class_token, torch.zeros_like(fresh.module.class_token))
    assert abs(fresh.module.encoder.pos_embedding.std().item() - 0.02) < 0.005
    assert torch.equal(backbone.module.class_token, torch.ones_like(backbone.module.class_token))  # a copy
