"""MAE (He et al. 2022): the pixel loss (with and without per-patch normalization, removed patches only)
against naive loops over images and patches, the masking of a step (75% per image, the encoder sees the
kept patches and nothing of the removed ones), the decoder (unshuffle, mask tokens, sin-cos positions of
the batch's grid, output shape), reconstructions, AdamW's betas and weight-decay groups, a few Trainer
steps, and bad inputs."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyConvNet, tiny_vit
from helpers import RandomTwoViews, SyncCounter, quiet_trainer

from lightning_ssl.masking import RandomMask, random_masking
from lightning_ssl.methods import mae as mae_module
from lightning_ssl.methods.mae import MAE, MAEDecoder, mae_loss, mae_patch_errors, norm_pix_target
from lightning_ssl.vit import Tokens, encode_tokens, sincos_2d

P = 4  # tiny_vit: 4x4 patches on 16x16 images, a 4x4 grid of 16 patches


def make(**kwargs) -> MAE:
    torch.manual_seed(0)
    args = dict(backbone=tiny_vit(), decoder_dim=16, decoder_depth=1, decoder_heads=2, warmup_epochs=0)
    return MAE(**{**args, **kwargs})


def step(model: MAE, views: list[torch.Tensor]) -> torch.Tensor:
    model.log = lambda *a, **k: None  # outside a Trainer
    return model.training_step((views, None), 0)


def images(n: int = 4, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the loss, naively
def naive_patch(image: torch.Tensor, r: int, c: int, p: int) -> list[float]:
    """The pixels of patch (r, c), rows then columns then channels (MAE's patchify order)."""
    return [float(image[ch, r * p + i, c * p + j]) for i in range(p) for j in range(p) for ch in range(image.shape[0])]


def naive_loss(pred, imgs, mask, p, norm_pix):
    total, count = 0.0, 0
    b, _, h, w = imgs.shape
    cols = w // p
    for n in range(b):
        for r in range(h // p):
            for c in range(cols):
                k = r * cols + c
                if not mask[n, k]:
                    continue
                t = naive_patch(imgs[n], r, c, p)
                if norm_pix:
                    mean = sum(t) / len(t)
                    var = sum((x - mean) ** 2 for x in t) / (len(t) - 1)  # unbiased, as the code's target.var
                    t = [(x - mean) / math.sqrt(var + 1e-6) for x in t]
                total += sum((float(pred[n, k, i]) - t[i]) ** 2 for i in range(len(t))) / len(t)
                count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("size,p", [(8, 4), (12, 2)])
def test_loss_matches_the_naive_loop_over_images_and_patches(norm_pix, size, p):
    g = torch.Generator().manual_seed(size + p)
    imgs = torch.randn(3, 3, size, size, generator=g, dtype=torch.float64)
    n = (size // p) ** 2
    pred = torch.randn(3, n, p * p * 3, generator=g, dtype=torch.float64)
    mask = torch.rand(3, n, generator=g) < 0.6
    mask[:, 0] = True  # every image has a removed patch
    loss = mae_loss(pred, imgs, mask, p, norm_pix_loss=norm_pix)
    assert loss.dtype == torch.float64  # float64 stays float64; 16-bit inputs become float32
    assert loss.item() == pytest.approx(naive_loss(pred, imgs, mask, p, norm_pix), rel=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_only_removed_patches_count(norm_pix):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 8, 8, generator=g)
    pred = torch.randn(2, 4, 48, generator=g)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    base = mae_loss(pred, imgs, mask, 4, norm_pix_loss=norm_pix)
    visible = pred.clone()
    visible[0, 1] += 5.0  # a visible patch's prediction
    visible[1, 0] -= 3.0
    assert torch.equal(mae_loss(visible, imgs, mask, 4, norm_pix_loss=norm_pix), base)
    removed = pred.clone()
    removed[1, 3, 7] += 1.0  # one pixel of a removed patch
    assert mae_loss(removed, imgs, mask, 4, norm_pix_loss=norm_pix) != base
    # the target pixels of a visible patch do not count either
    other = imgs.clone()
    other[0, :, 0:4, 4:8] = 100.0  # patch 1 of image 0
    assert torch.equal(mae_loss(pred, other, mask, 4, norm_pix_loss=norm_pix), base)


def test_norm_pix_target_is_the_codes_formula_with_the_unbiased_variance():
    t = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]]], dtype=torch.float64)
    out = norm_pix_target(t)
    # mean 2, unbiased variance 1 (the biased one would be 2/3); a constant patch maps to 0
    torch.testing.assert_close(out[0, 0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(1 + 1e-6))
    torch.testing.assert_close(out[0, 1], torch.zeros(3, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=g, dtype=torch.float64)
    for b in range(2):
        for k in range(5):
            v = [float(a) for a in x[b, k]]
            mean = sum(v) / 48
            var = sum((a - mean) ** 2 for a in v) / 47
            expected = torch.tensor([(a - mean) / math.sqrt(var + 1e-6) for a in v], dtype=torch.float64)
            torch.testing.assert_close(norm_pix_target(x)[b, k], expected)


def test_patch_errors_and_loss_reject_mismatched_shapes():
    imgs = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="pred must be B x N"):
        mae_patch_errors(torch.randn(2, 4, 47), imgs, 4)
    with pytest.raises(ValueError, match="mask must be B x N"):
        mae_loss(torch.randn(2, 4, 48), imgs, torch.ones(2, 5, dtype=torch.bool), 4)


# ----------------------------------------------------------------------------- the training step
class MaskRecorder:
    def __init__(self, monkeypatch):
        self.masks: list[RandomMask] = []
        original = mae_module.random_masking

        def recorded(*args, **kwargs):
            out = original(*args, **kwargs)
            self.masks.append(out)
            return out

        monkeypatch.setattr(mae_module, "random_masking", recorded)


def test_a_step_removes_exactly_75_percent_of_each_image_and_computes_the_loss_on_them(monkeypatch):
    model = make(norm_pix_loss=False)
    rec = MaskRecorder(monkeypatch)
    x1, x2 = images(4, seed=1), images(4, seed=2)
    loss = step(model, [x1, x2])
    (m,) = rec.masks
    assert m.mask.shape == (4, 16) and m.keep.shape == (4, 4)  # the first view only, one mask per image
    assert (m.mask.sum(dim=1) == 12).all()
    for b in range(4):
        assert not m.mask[b, m.keep[b]].any() and len(set(m.keep[b].tolist())) == 4
    # the loss is the naive loss of the decoder's prediction on the recorded removed patches of the first view
    pred = model.predict_pixels(x1, m)
    assert loss.item() == pytest.approx(naive_loss(pred.detach(), x1, m.mask, P, False), rel=1e-5)
    torch.manual_seed(7)
    alone = step(model, [x1])
    torch.manual_seed(7)
    assert torch.equal(step(model, [x1, x2 * 10]), alone)  # the second view is not used


def test_the_encoder_sees_exactly_the_kept_patches(monkeypatch):
    model = make()
    rec = MaskRecorder(monkeypatch)
    vit = model.backbone.module
    seen, decoded = [], []
    vit.encoder.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    model.decoder.register_forward_pre_hook(lambda mod, args: decoded.append(args[0]))
    x = images(3)
    step(model, [x])
    (m,) = rec.masks
    (tokens,) = seen
    assert tokens.shape == (3, 1 + 4, 32)  # the class token and the 4 kept patches, nothing else
    with torch.no_grad():
        embedded = vit.conv_proj(x).flatten(2).transpose(1, 2) + vit.encoder.pos_embedding[:, 1:]
        cls = vit.class_token[:, 0] + vit.encoder.pos_embedding[:, 0]
    for b in range(3):
        torch.testing.assert_close(tokens[b, 0], cls[0])
        for j in range(4):
            torch.testing.assert_close(tokens[b, 1 + j], embedded[b, m.keep[b, j]])
    # the decoder gets encode_tokens with keep, class token included
    with torch.no_grad():
        expected = encode_tokens(model.backbone, x, keep=m.keep)
    torch.testing.assert_close(decoded[0].patches, expected.patches)
    torch.testing.assert_close(decoded[0].cls, expected.cls)


def test_removed_pixels_do_not_reach_the_encoder():
    model = make()
    x = images(2)
    m = random_masking(2, 16, 0.75)
    changed = x.clone()
    for b in range(2):
        for k in m.mask[b].nonzero().flatten().tolist():
            r, c = divmod(k, 4)
            changed[b, :, r * P : (r + 1) * P, c * P : (c + 1) * P] = 7.0
    with torch.no_grad():
        a = model.predict_pixels(x, m)
        b = model.predict_pixels(changed, m)
    torch.testing.assert_close(a, b)
    assert not torch.equal(model.representation(x), model.representation(changed))


def test_the_encoder_uses_fixed_sincos_positions_and_the_representation_is_the_mean_patch_token():
    model = make()
    vit = model.backbone.module
    pos = vit.encoder.pos_embedding
    assert not pos.requires_grad
    torch.testing.assert_close(pos[0, 1:], sincos_2d(32, (4, 4)))
    assert torch.equal(pos[0, 0], torch.zeros(32))
    x = images(3)
    with torch.no_grad():
        tokens = model.backbone.tokens(x)  # ViTBackbone: class token then patches after the final norm
        expected = torch.stack([sum(tokens[b, 1 + k] for k in range(16)) / 16 for b in range(3)])
        torch.testing.assert_close(model(x), expected)
    assert model.encoder_spec()["pool"] == "mean"


# ----------------------------------------------------------------------------- the decoder
def test_decoder_unshuffles_kept_tokens_and_fills_mask_tokens_with_positions():
    torch.manual_seed(0)
    dec = MAEDecoder(encoder_dim=8, patch_size=2, dim=12, depth=2, heads=3)
    m = random_masking(2, 9, 0.6)  # keeps int(9 * 0.4) = 3
    tokens = Tokens(cls=torch.randn(2, 8), patches=torch.randn(2, 3, 8))
    inputs = []
    dec.blocks[0].register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
    out = dec(tokens, m.restore, (3, 3))
    assert out.shape == (2, 9, 2 * 2 * 3)
    x = inputs[0]
    pos = sincos_2d(12, (3, 3), cls_token=True)
    with torch.no_grad():
        torch.testing.assert_close(x[:, 0], dec.embed(tokens.cls) + pos[0])
        for b in range(2):
            kept = m.keep[b].tolist()
            for k in range(9):
                if k in kept:
                    expected = dec.embed(tokens.patches[b, kept.index(k)])
                else:
                    expected = dec.mask_token[0, 0]
                torch.testing.assert_close(x[b, 1 + k], expected + pos[1 + k])


def test_decoder_without_class_token_and_positions_follow_the_grid():
    torch.manual_seed(0)
    dec = MAEDecoder(encoder_dim=8, patch_size=2, dim=12, depth=1, heads=2)
    assert "positions" not in "".join(dec.state_dict())  # not saved: loads at any size
    assert dec.mask_token.std() > 0  # N(0, 0.02), not zeros
    for grid in ((2, 3), (4, 4), (2, 3)):
        n = grid[0] * grid[1]
        m = random_masking(2, n, 0.5)
        out = dec(Tokens(cls=None, patches=torch.randn(2, m.keep.shape[1], 8)), m.restore, grid)
        assert out.shape == (2, n, 12)
        torch.testing.assert_close(dec.positions, sincos_2d(12, grid))
    fresh = MAEDecoder(encoder_dim=8, patch_size=2, dim=12, depth=1, heads=2)
    fresh.load_state_dict(dec.state_dict(), strict=True)


def test_decoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 4"):
        MAEDecoder(8, 2, dim=10)
    with pytest.raises(ValueError, match="divide the decoder dim"):
        MAEDecoder(8, 2, dim=16, heads=3)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        MAEDecoder(8, 2, dim=16, depth=0)
    dec = MAEDecoder(8, 2, dim=16, heads=2, depth=1)
    with pytest.raises(ValueError, match="restore must be B x N"):
        dec(Tokens(None, torch.randn(2, 3, 8)), torch.arange(8).repeat(2, 1), (3, 3))


# ----------------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruction_pastes_the_visible_patches_and_predicts_the_removed(norm_pix):
    model = make(norm_pix_loss=norm_pix)
    x = images(3)
    torch.manual_seed(5)
    recon, mask = model.reconstruct(x)
    assert recon.shape == x.shape and mask.shape == (3, 16) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == 12).all()
    given = torch.zeros(3, 16, dtype=torch.bool)
    given[:, 4:] = True
    given[1] = given[1].flip(0)  # another pattern, the same count
    recon, mask = model.reconstruct(x, given)
    assert torch.equal(mask, given)
    keep = torch.stack([(~given[b]).nonzero().flatten() for b in range(3)])
    removed = torch.stack([given[b].nonzero().flatten() for b in range(3)])
    restore = torch.argsort(torch.cat([keep, removed], dim=1), dim=1)  # kept first, then the mask tokens
    with torch.no_grad():
        pred = model.decoder(encode_tokens(model.backbone, x, keep=keep), restore, (4, 4))
    for b in range(3):
        for k in range(16):
            r, c = divmod(k, 4)
            patch = recon[b, :, r * P : (r + 1) * P, c * P : (c + 1) * P].permute(1, 2, 0).reshape(-1)
            truth = torch.tensor(naive_patch(x[b], r, c, P))
            if not given[b, k]:
                assert torch.equal(patch, truth)
            elif not norm_pix:
                torch.testing.assert_close(patch, pred[b, k])
            else:  # mapped back with the true patch's mean and (unbiased) standard deviation
                std = math.sqrt(float(truth.var()) + 1e-6)
                torch.testing.assert_close(patch, pred[b, k] * std + truth.mean(), rtol=1e-5, atol=1e-5)


def test_reconstruction_rejects_bad_masks():
    model = make()
    x = images(2)
    uneven = torch.zeros(2, 16, dtype=torch.bool)
    uneven[0, :3] = True
    with pytest.raises(ValueError, match="as many patches"):
        model.reconstruct(x, uneven)
    with pytest.raises(ValueError, match="at least one visible"):
        model.reconstruct(x, torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a 2 x 16 bool"):
        model.reconstruct(x, torch.zeros(2, 9, dtype=torch.bool))


# ----------------------------------------------------------------------------- optimization
def test_adamw_with_maes_betas_and_weight_decay_on_weights_and_tokens():
    model = make()
    optimizer, _ = model.optimizer_and_schedule(256, 100, 10)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.5e-4 * 0.1)  # 1.5e-4 x 256/256, warmup step 0 of 10
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    vit = model.backbone.module
    assert id(model.decoder.mask_token) in decay and id(vit.class_token) in decay  # add_weight_decay: ndim > 1
    assert id(vit.conv_proj.weight) in decay and id(model.decoder.pred.weight) in decay
    assert id(model.decoder.pred.bias) in no_decay and id(model.decoder.norm.weight) in no_decay
    assert id(vit.encoder.pos_embedding) not in decay | no_decay  # frozen sin-cos
    every = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay | no_decay == every


def test_mae_init_follows_the_code():
    model = make()
    vit = model.backbone.module
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    w = vit.conv_proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))  # Xavier-uniform on the D x (p * p * 3) view
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert vit.class_token.abs().max() > 0
    torch.manual_seed(0)
    plain = tiny_vit()
    kept = MAE(backbone=plain, mae_init=False, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert torch.equal(kept.backbone.module.class_token, torch.zeros(1, 1, 32))  # torchvision's own init


# ----------------------------------------------------------------------------- training
class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def test_a_few_trainer_steps_train_with_finite_loss(tmp_path):
    model, rec = make(), LossRecorder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_steps=4, default_root_dir=tmp_path, callbacks=[rec])
    trainer.fit(model, RandomTwoViews(num_samples=16, batch_size=4, image_size=16))
    assert trainer.global_step == 4 and len(rec.losses) == 4
    assert all(math.isfinite(x) for x in rec.losses) and len(set(rec.losses)) > 1
    after = model.state_dict()
    assert not torch.equal(after["decoder.mask_token"], before["decoder.mask_token"])
    assert not torch.equal(after["backbone.module.conv_proj.weight"], before["backbone.module.conv_proj.weight"])
    assert torch.equal(after["backbone.module.encoder.pos_embedding"], before["backbone.module.encoder.pos_embedding"])
    assert all(g["betas"] == (0.9, 0.95) for g in trainer.optimizers[0].param_groups)


class ReadyViews(torch.utils.data.Dataset):
    """Ready-made views: loading makes no tensor operation the counter could see (as tests/test_contracts.py)."""

    def __init__(self, n: int = 16):
        self.views = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return self.views.shape[0]

    def __getitem__(self, i):
        return [self.views[i]], 0


def test_steps_make_no_host_sync(tmp_path, monkeypatch):
    counter = SyncCounter()
    trainer = quiet_trainer(max_steps=4, log_every_n_steps=100, default_root_dir=tmp_path, callbacks=[counter])
    model = make()
    counter.patch(monkeypatch)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(ReadyViews(), batch_size=4))
    assert counter.per_step == [0, 0, 0], counter.per_step


def test_bf16_autocast_step_is_close_to_float32():
    model = make()
    x = images(4)
    torch.manual_seed(3)
    full = step(model, [x])
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = step(model, [x])
    assert half.dtype == torch.float32 and torch.isfinite(half)
    torch.testing.assert_close(half, full, rtol=0.03, atol=0.02)


def test_named_small_image_vit_rebuilds_from_its_hyperparameters():
    torch.manual_seed(0)
    model = MAE(backbone="vit_ti_16", small_image=True, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    rebuilt = MAE(**model.hparams)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    torch.manual_seed(1)
    a = step(model, [images(2, size=32)])  # 8x8 grid: 64 patches, 16 kept
    torch.manual_seed(1)
    b = step(rebuilt, [images(2, size=32)])
    assert torch.equal(a, b)


@pytest.mark.parametrize("class_token", [True, False])
def test_timm_vits_with_and_without_class_token(class_token):
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=0,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
        dynamic_img_size=True,
    )
    model = make(backbone=vit)
    loss = step(model, [images(2)])
    assert torch.isfinite(loss)
    loss.backward()
    assert model.decoder.mask_token.grad is not None
    assert model.representation(images(2)).shape == (2, 32)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("ratio", [-0.1, 0.0, 1.0, 1.5])
def test_rejects_mask_ratio_outside_the_open_unit_interval(ratio):
    with pytest.raises(ValueError, match="mask_ratio must lie in"):
        make(mask_ratio=ratio)


def test_rejects_a_non_vit_backbone():
    with pytest.raises(ValueError, match="MAE needs a ViT backbone.*vit_b_16.*TinyConvNet"):
        make(backbone=TinyConvNet())


def test_rejects_images_that_are_not_whole_patches_and_bad_views():
    model = make()
    with pytest.raises(ValueError, match="not a whole number of 4x4 patches"):
        step(model, [torch.randn(2, 3, 18, 18)])
    with pytest.raises(ValueError, match="non-empty list"):
        step(model, [])


def test_rejects_bad_betas_and_decoder_settings():
    with pytest.raises(ValueError, match="betas must both lie in"):
        make(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="betas must be a pair"):
        make(betas=(0.9,))
    with pytest.raises(ValueError, match="divide the decoder dim"):
        make(decoder_dim=16, decoder_heads=3)
