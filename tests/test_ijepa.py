"""I-JEPA (Assran et al. 2023): the losses and the targets against naive loops, what each encoder sees (the
target encoder all patches, layer-normed and gathered at the target blocks; the context encoder the context
patches only), the predictor, the linear EMA schedule step by step, the warmup from start_lr, masks that
repeat from the saved seed, epoch and batch index, an exact resume, a few Trainer steps, bf16, no host
reads but the mask sampler's, and bad inputs."""

from __future__ import annotations

import math
import sys

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from conftest import TinyConvNet
from helpers import RandomTwoViews, quiet_trainer

import lightning_ssl.methods.ijepa as ijepa_module
from lightning_ssl.callbacks import EMAUpdate
from lightning_ssl.ema import linear_ema_tau
from lightning_ssl.mask_sampling import mask_generator
from lightning_ssl.masking import MultiBlockMasks, multi_block_masks
from lightning_ssl.methods.ijepa import IJEPA, IJEPAPredictor, ijepa_loss, ijepa_targets
from lightning_ssl.vit import sincos_2d

# 4x4 grid of the 16-pixel tiny ViT: 4 targets of up to 2 patches leave >= 8 patches for the context
SMALL = dict(predictor_dim=16, predictor_depth=1, target_scale=(0.1, 0.15), min_keep=4, warmup_epochs=0)


def tiny_vit(image_size: int = 16) -> torchvision.models.VisionTransformer:
    return torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def make(image_size: int = 16, trainer: bool = False, **kwargs) -> IJEPA:
    """The tiny model; outside a Trainer (``trainer=False``) its ``log`` does nothing."""
    torch.manual_seed(0)
    model = IJEPA(tiny_vit(image_size), **{**SMALL, **kwargs})
    if not trainer:
        model.log = lambda *a, **k: None
    return model


def images(n: int = 4, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb_target_encoder(model: IJEPA) -> None:
    """Make the EMA copy differ from the online encoder, so a test can tell which one ran."""
    for p in model.backbone_ema.parameters():
        if p.ndim > 1 and p.shape != model.backbone_ema.module.encoder.pos_embedding.shape:
            p.add_(torch.randn_like(p) * 0.5)


class Spy:
    """Records the masks and the loss inputs of a training step (monkeypatched into the method's module)."""

    def __init__(self, monkeypatch):
        self.masks: list[MultiBlockMasks] = []
        self.loss_args: list[tuple[torch.Tensor, torch.Tensor]] = []
        draw, loss = ijepa_module.multi_block_masks, ijepa_module.ijepa_loss

        def spy_masks(*a, **k):
            self.masks.append(draw(*a, **k))
            return self.masks[-1]

        def spy_loss(p, t, *a, **k):
            self.loss_args.append((p.detach().clone(), t.detach().clone()))
            return loss(p, t, *a, **k)

        monkeypatch.setattr(ijepa_module, "multi_block_masks", spy_masks)
        monkeypatch.setattr(ijepa_module, "ijepa_loss", spy_loss)


# ----------------------------------------------------------------------------------------- losses
def test_l2_and_smooth_l1_losses_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    m, b, kt, d = 3, 2, 4, 5
    pred = torch.randn(m * b, kt, d, generator=g, dtype=torch.float64) * 2
    target = torch.randn(m * b, kt, d, generator=g, dtype=torch.float64)
    squares, smooth, count = 0.0, 0.0, 0
    for i in range(m * b):
        for j in range(kt):
            for c in range(d):
                diff = float(pred[i, j, c]) - float(target[i, j, c])
                squares += diff**2
                smooth += 0.5 * diff**2 if abs(diff) < 1 else abs(diff) - 0.5
                count += 1
    assert ijepa_loss(pred, target, "l2").item() == pytest.approx(squares / count, rel=1e-6)
    assert ijepa_loss(pred, target, "smooth_l1").item() == pytest.approx(smooth / count, rel=1e-6)
    assert any(abs(float(x)) >= 1 for x in (pred - target).flatten())  # both branches of smooth L1 ran
    # the paper's eq. 4: (1 / M) sum over blocks of the summed squared L2 norms = l2 x |B_i| x D
    paper = sum(float((pred[i] - target[i]).pow(2).sum()) for i in range(m * b)) / (m * b)
    assert ijepa_loss(pred, target).item() * kt * d == pytest.approx(paper, rel=1e-6)


def test_loss_is_float32_for_bf16_inputs_and_rejects_bad_arguments():
    pred, target = torch.randn(4, 3, 8).bfloat16(), torch.randn(4, 3, 8).bfloat16()
    out = ijepa_loss(pred, target)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx((pred.float() - target.float()).pow(2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of 'l2', 'smooth_l1'"):
        ijepa_loss(pred, target, "l1")
    with pytest.raises(ValueError, match="differ in shape"):
        ijepa_loss(pred, target[:, :2])


def naive_layer_norm(v: torch.Tensor) -> list[float]:
    values = [float(x) for x in v]
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / len(values)
    return [(x - mean) / math.sqrt(var + 1e-5) for x in values]


def test_ijepa_targets_layer_norms_and_gathers_block_major():
    g = torch.Generator().manual_seed(0)
    b, n, d = 3, 10, 6
    patches = torch.randn(b, n, d, generator=g) * 3 + 1
    blocks = [torch.randint(0, n, (b, 4), generator=g) for _ in range(2)]
    out = ijepa_targets(patches, blocks)
    assert out.shape == (2 * b, 4, d) and out.dtype == torch.float32
    for m, block in enumerate(blocks):
        for i in range(b):
            for j in range(4):
                expected = naive_layer_norm(patches[i, int(block[i, j])])
                assert out[m * b + i, j].tolist() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------------------- the step
def test_loss_sees_the_layer_normed_target_encoder_tokens_at_the_target_indices(monkeypatch):
    model = make()
    perturb_target_encoder(model)
    spy = Spy(monkeypatch)
    x = images()
    model.training_step(([x], None), 0)
    (masks,), ((pred, target),) = spy.masks, spy.loss_args
    with torch.no_grad():
        tokens = model.backbone_ema.tokens(x)[:, 1:]  # the target encoder on all patches, class token dropped
        online = model.backbone.tokens(x)[:, 1:]
    b, kt = x.shape[0], masks.targets[0].shape[1]
    assert target.shape == pred.shape == (len(masks.targets) * b, kt, 32)
    assert len(masks.targets) == 4
    for m, block in enumerate(masks.targets):
        for i in range(b):
            for j in range(kt):
                patch = int(block[i, j])
                assert target[m * b + i, j].tolist() == pytest.approx(naive_layer_norm(tokens[i, patch]), abs=1e-4)
                wrong = naive_layer_norm(online[i, patch])  # not the online encoder's
                assert target[m * b + i, j].tolist() != pytest.approx(wrong, abs=1e-2)


def test_context_encoder_sees_only_context_patches_and_the_target_encoder_all(monkeypatch):
    model = make()
    spy = Spy(monkeypatch)
    calls, lengths = [], []
    encode = ijepa_module.encode_tokens

    def spy_encode(backbone, imgs, keep=None, **k):
        calls.append((backbone, None if keep is None else keep.clone()))
        return encode(backbone, imgs, keep=keep, **k)

    monkeypatch.setattr(ijepa_module, "encode_tokens", spy_encode)
    model.backbone.module.encoder.layers.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    x = images()
    model.training_step(([x], None), 0)
    (masks,) = spy.masks
    assert [c[0] for c in calls] == [model.backbone_ema, model.backbone]
    assert calls[0][1] is None  # the target encoder: every patch
    assert torch.equal(calls[1][1], masks.context)
    assert lengths == [1 + masks.context.shape[1]]  # the class token and the context patches, nothing else
    for i in range(x.shape[0]):
        context = set(masks.context[i].tolist())
        assert context and all(not context & set(t[i].tolist()) for t in masks.targets)


def test_predictions_do_not_depend_on_pixels_outside_the_context(monkeypatch):
    model = make()
    x = images()
    masks = model.sample_masks(x.shape[0], (4, 4), 0, 5)
    monkeypatch.setattr(model, "sample_masks", lambda *a: masks)
    spy = Spy(monkeypatch)
    changed = x.clone()
    for i in range(x.shape[0]):  # new pixels in every patch that is not in image i's context
        for patch in set(range(16)) - set(masks.context[i].tolist()):
            r, c = divmod(patch, 4)
            changed[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = torch.randn(3, 4, 4)
    model.training_step(([x], None), 0)
    model.training_step(([changed], None), 0)
    (pred_a, target_a), (pred_b, target_b) = spy.loss_args
    torch.testing.assert_close(pred_a, pred_b)
    assert not torch.allclose(target_a, target_b)  # the targets did see the change


def test_target_encoder_gets_no_gradient_the_online_networks_do():
    model = make()
    model.training_step(([images()], None), 0).backward()
    assert all(p.grad is None for p in model.backbone_ema.parameters())
    assert all(not p.requires_grad for p in model.backbone_ema.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    vit = model.backbone.module
    assert vit.conv_proj.weight.grad is not None and vit.encoder.layers[0].mlp[0].weight.grad is not None


def test_encoder_gets_the_code_initialization():
    model = make(predictor_dim=64, predictor_heads=2)
    vit = model.backbone.module
    for weight in (
        vit.conv_proj.weight,
        vit.encoder.layers[1].mlp[3].weight,
        vit.encoder.layers[0].self_attention.in_proj_weight,
    ):
        assert weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert vit.conv_proj.bias.abs().sum() == 0 and vit.encoder.layers[0].mlp[0].bias.abs().sum() == 0
    for name, p in model.backbone.state_dict().items():
        assert torch.equal(p, model.backbone_ema.state_dict()[name]), name  # the target starts as a copy
    torch.manual_seed(0)
    kept = IJEPA(tiny_vit(), **SMALL, ijepa_init=False).backbone.module
    torch.manual_seed(0)
    assert torch.equal(kept.conv_proj.weight, tiny_vit().conv_proj.weight)  # torchvision's own


def test_sincos_positions_are_fixed_in_both_encoders():
    model = make()
    for backbone in (model.backbone, model.backbone_ema):
        pos = backbone.module.encoder.pos_embedding
        assert not pos.requires_grad
        torch.testing.assert_close(pos[0, 1:], sincos_2d(32, (4, 4)))
        assert torch.equal(pos[0, 0], torch.zeros(32))
    torch.testing.assert_close(model.predictor.positions((4, 4), torch.device("cpu")), sincos_2d(16, (4, 4)))


# ----------------------------------------------------------------------------------------- predictor
def _predictor_inputs(b: int = 3, kc: int = 5, kt: int = 2, blocks: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(b, kc, 32, generator=g)
    context_index = torch.stack([torch.randperm(16, generator=g)[:kc] for _ in range(b)])
    targets = [torch.stack([torch.randperm(16, generator=g)[:kt] for _ in range(b)]) for _ in range(blocks)]
    return context, context_index, targets


def test_predictor_shape_and_one_prediction_per_target_index():
    torch.manual_seed(0)
    predictor = IJEPAPredictor(32, predictor_dim=16, depth=2, num_heads=2).eval()
    context, context_index, targets = _predictor_inputs()
    out = predictor(context, context_index, targets, (4, 4))
    assert out.shape == (4 * 3, 2, 32)
    b = context.shape[0]
    for m, block in enumerate(targets):  # each block is predicted from the context alone, block-major
        alone = predictor(context, context_index, [block], (4, 4))
        torch.testing.assert_close(out[m * b : (m + 1) * b], alone, atol=1e-5, rtol=1e-5)
    # reversing a block's indices reverses its predictions: each prediction belongs to its index
    flipped = predictor(context, context_index, [targets[0].flip(1)], (4, 4))
    torch.testing.assert_close(flipped, out[:b].flip(1), atol=1e-5, rtol=1e-5)
    # a context token moved to another position changes the predictions (positions are used)
    moved = predictor(context, (context_index + 1) % 16, targets[:1], (4, 4))
    assert not torch.allclose(moved, out[:b], atol=1e-4)


def test_predictor_initialization_and_bad_arguments():
    torch.manual_seed(0)
    predictor = IJEPAPredictor(32, predictor_dim=64, depth=3, num_heads=4)
    assert predictor.mask_token.shape == (1, 1, 64)
    assert 0.01 < predictor.mask_token.std().item() < 0.03 and predictor.embed.bias.abs().sum() == 0
    # the code's final initialization: every linear layer N(0, 0.02) (init_model undoes fix_init_weight)
    for block in predictor.blocks:
        for weight in (block.mlp[3].weight, block.self_attention.out_proj.weight, block.self_attention.in_proj_weight):
            assert weight.std().item() == pytest.approx(0.02, rel=0.1) and weight.abs().max() < 0.2
        assert block.mlp[0].bias.abs().sum() == 0 and torch.equal(block.ln_1.weight, torch.ones(64))
    with pytest.raises(ValueError, match="multiple of 4"):
        IJEPAPredictor(32, predictor_dim=18)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        IJEPAPredictor(32, predictor_dim=20, num_heads=3)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        IJEPAPredictor(32, predictor_dim=16, depth=0, num_heads=2)
    context, context_index, targets = _predictor_inputs()
    with pytest.raises(ValueError, match="at least one"):
        predictor(context, context_index, [], (4, 4))
    with pytest.raises(ValueError, match="every target block"):
        predictor(context, context_index, [targets[0], targets[1][:, :1]], (4, 4))


# ----------------------------------------------------------------------------------------- schedules
def test_linear_ema_tau_is_the_code_momentum_scheduler():
    ema, ipe, epochs = (0.996, 1.0), 7, 3
    total = ipe * epochs
    code = [ema[0] + i * (ema[1] - ema[0]) / total for i in range(total + 1)]  # src/train.py
    for step in range(1, total + 1):  # trainer.global_step after the step-th optimizer step
        assert linear_ema_tau(step, total, *ema) == pytest.approx(code[step - 1], abs=1e-15)
    assert linear_ema_tau(total + 5, total, *ema) == 1.0


class Recorder(pl.Callback):
    def __init__(self):
        self.ema, self.online, self.lrs, self.decays, self.losses = [], [], [], [], []

    @staticmethod
    def _weights(module):
        return [p.detach().clone() for p in module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ema.append(self._weights(pl_module.backbone_ema))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # the step's weight decay
        self.decays.append([g["weight_decay"] for g in trainer.optimizers[0].param_groups])
        self.online.append(self._weights(pl_module.backbone))  # after the optimizer step
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        self.ema.append(self._weights(pl_module.backbone_ema))


def test_fit_ema_lr_and_weight_decay_schedules_step_by_step(tmp_path):
    rec = Recorder()
    model = make(
        trainer=True,
        ema_tau=0.5,
        warmup_epochs=1,
        base_lr=0.01,
        warmup_start_lr=0.002,
        final_lr=0.0,
        weight_decay=0.04,
        weight_decay_final=0.4,
    )
    trainer = quiet_trainer(max_steps=6, default_root_dir=tmp_path, callbacks=[rec])
    trainer.fit(model, RandomTwoViews(16, 4, image_size=16))  # 4 steps per epoch: the warmup is 4 steps
    assert EMAUpdate in {type(c) for c in trainer.callbacks}
    # EMA: after step k, target <- tau_k target + (1 - tau_k) online, tau_k = 0.5 + (k - 1) 0.5 / 6
    taus = [0.5 + (k - 1) * 0.5 / 6 for k in range(1, 7)]
    for k, tau in enumerate(taus):
        for before, online, after in zip(rec.ema[k], rec.online[k], rec.ema[k + 1]):
            torch.testing.assert_close(after, tau * before + (1 - tau) * online)
    assert float(trainer.callback_metrics["train/ema_tau"]) == pytest.approx(taus[-1])
    assert not torch.allclose(rec.ema[0][1], rec.ema[-1][1])
    # lr: from start_lr linearly to the peak over the warmup (the code's WarmupCosineSchedule), then cosine
    peak, start = 0.01 * 4 / 256, 0.2
    warm = [peak * (start + (1 - start) * (k + 1) / 4) for k in range(4)]
    cosine = [peak * 0.5 * (1 + math.cos(math.pi * (k - 4) / 2)) for k in (4, 5)]
    assert rec.lrs == pytest.approx(warm + cosine)
    # weight decay: cosine 0.04 -> 0.4 on the decayed groups; biases and norms none
    decayed = [i for i, wd in enumerate(rec.decays[0]) if wd > 0]
    assert decayed and len(decayed) < len(rec.decays[0])
    for k, wds in enumerate(rec.decays):
        expected = 0.4 - 0.36 * (math.cos(math.pi * k / 6) + 1) / 2
        assert [wds[i] for i in decayed] == pytest.approx([expected] * len(decayed))
        assert all(wd == 0.0 for i, wd in enumerate(wds) if i not in decayed)
    assert all(math.isfinite(v) for v in rec.losses) and len(set(rec.losses)) > 1


def test_parameter_groups_follow_the_code_rule():
    model = make(weight_decay=0.04)
    decay_of = {id(p): g["weight_decay"] for g in model.parameter_groups(0.04) for p in g["params"]}
    vit = model.backbone.module
    assert decay_of[id(model.predictor.mask_token)] == 0.04 and decay_of[id(vit.class_token)] == 0.04
    assert decay_of[id(model.predictor.embed.weight)] == 0.04 and decay_of[id(model.predictor.embed.bias)] == 0
    assert decay_of[id(vit.encoder.layers[0].ln_1.weight)] == 0.0
    assert id(vit.encoder.pos_embedding) not in decay_of  # fixed
    assert not any(id(p) in decay_of for p in model.backbone_ema.parameters())


# ----------------------------------------------------------------------------------------- masks and resume
def test_masks_repeat_from_the_seed_epoch_and_batch_index_with_the_paper_settings(monkeypatch):
    model = make(image_size=32, min_keep=10, target_scale=(0.15, 0.2))  # the paper's masks on an 8x8 grid
    spy = Spy(monkeypatch)
    x = images(size=32)
    torch.manual_seed(99)  # the global generator plays no part
    model.training_step(([x], None), 7)
    (drawn,) = spy.masks
    expected = multi_block_masks(
        4, (8, 8), 4, (0.15, 0.2), (0.75, 1.5), (0.85, 1.0), (1.0, 1.0), 10, False,
        generator=mask_generator(model.mask_sampler.seed, 0, 7),
    )  # fmt: skip
    again = model.sample_masks(4, (8, 8), epoch=0, batch_idx=7)
    for masks in (expected, again):
        assert torch.equal(drawn.context, masks.context)
        assert all(torch.equal(a, b) for a, b in zip(drawn.targets, masks.targets))
    other = model.sample_masks(4, (8, 8), epoch=1, batch_idx=7)
    assert not all(torch.equal(a, b) for a, b in zip(drawn.targets, other.targets))
    # the seed is built from torch's generator and saved in the state dict: a resumed model draws the same
    torch.manual_seed(1)
    fresh = IJEPA(tiny_vit(32), **{**SMALL, "min_keep": 10, "target_scale": (0.15, 0.2)})
    assert fresh.mask_sampler.seed != model.mask_sampler.seed
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.sample_masks(4, (8, 8), 0, 7).context, drawn.context)
    for masks in (drawn, other):
        assert len(masks.targets) == 4 and masks.context.shape[1] >= 1
        h, w = masks.target_shape
        assert 8 <= h * w <= 12 and masks.context_shape[0] == masks.context_shape[1]  # context aspect 1


def test_resume_from_an_epoch_checkpoint_is_exact(tmp_path):
    """Masks (the saved mask seed), EMA, schedules, optimizer: a 2-epoch run
    resumed from its epoch-1 checkpoint ends where the uninterrupted run ends."""
    data = lambda: RandomTwoViews(8, 4, image_size=16)  # noqa: E731  2 steps per epoch
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    straight = make(trainer=True)
    run = quiet_trainer(
        max_epochs=2, default_root_dir=tmp_path / "a", callbacks=[every_epoch], enable_checkpointing=True
    )
    run.fit(straight, data())
    torch.manual_seed(123)  # another mask seed at construction: the checkpoint restores the saved one
    resumed = make(trainer=True)
    again = quiet_trainer(max_epochs=2, default_root_dir=tmp_path / "b")
    again.fit(resumed, data(), ckpt_path=tmp_path / "ckpts" / "epoch=0-step=2.ckpt")
    assert again.global_step == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------- named backbone
def test_named_cifar_backbone_rebuilds_from_its_hyperparameters():
    torch.manual_seed(0)
    model = IJEPA("vit_ti_16", small_image=True, predictor_dim=48, predictor_depth=1)  # the paper's masks, 8x8
    assert model.predictor.blocks[0].self_attention.num_heads == 3  # the encoder's heads
    rebuilt = IJEPA(**model.hparams)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    three_heads = torchvision.models.VisionTransformer(16, 4, num_layers=1, num_heads=3, hidden_dim=48, mlp_dim=96)
    with pytest.raises(ValueError, match=r"multiple of predictor_heads=3 \(the encoder's number of heads\)"):
        IJEPA(three_heads, **{**SMALL, "predictor_dim": 32})


def test_fit_with_the_paper_masks_on_an_8x8_grid(tmp_path):
    rec = Recorder()
    model = make(image_size=32, trainer=True, min_keep=10, target_scale=(0.15, 0.2))
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[rec])
    trainer.fit(model, RandomTwoViews(12, 4, image_size=32))
    assert all(math.isfinite(v) for v in rec.losses) and len(set(rec.losses)) == 3
    assert 1 <= float(trainer.callback_metrics["train/context_patches"]) <= 49  # a 7x7 context block at most
    assert 8 <= float(trainer.callback_metrics["train/target_patches"]) <= 12


# ----------------------------------------------------------------------------------------- evaluation
def test_representation_is_the_mean_of_the_target_encoder_patch_tokens():
    model = make()
    perturb_target_encoder(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone_ema.tokens(x)[:, 1:].mean(1))
        context = make(evaluate="context")
        torch.testing.assert_close(context(x), context.backbone.tokens(x)[:, 1:].mean(1))
    assert model.encoder_spec()["pool"] == "mean" and model.encoder_spec()["state_prefix"] == "backbone_ema."
    assert context.encoder_spec()["state_prefix"] == "backbone."
    baseline = model.random_init_backbone(seed=1).module
    torch.testing.assert_close(baseline.encoder.pos_embedding[0, 1:], sincos_2d(32, (4, 4)))
    assert baseline.conv_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)  # the method's init
    assert torch.equal(baseline.conv_proj.weight, model.random_init_backbone(seed=1).module.conv_proj.weight)
    assert not torch.equal(baseline.conv_proj.weight, model.backbone.module.conv_proj.weight)


# ----------------------------------------------------------------------------------------- precision, host reads
def test_bf16_autocast_step_is_finite_float32():
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(([images()], None), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_no_host_reads_in_the_step_but_the_cpu_mask_sampler(monkeypatch):
    """The masks are drawn on the CPU (masking.py reads its uniforms with ``tolist``); nothing else of the step
    reads a tensor on the host."""
    model = make()
    counted = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapper(tensor, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.endswith("masking.py"):
                counted.append((_name, caller))
            return _original(tensor, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    loss = model.training_step(([images()], None), 0)
    loss.backward()
    monkeypatch.undo()
    assert counted == []


# ----------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("backbone", [TinyConvNet(), "resnet18"])
def test_non_vit_backbone_is_refused(backbone):
    with pytest.raises(ValueError, match=r"I-JEPA needs a ViT backbone.*'vit_s_16'"):
        IJEPA(backbone, **SMALL)


def test_grid_too_small_for_the_masks_is_refused():
    with pytest.raises(ValueError, match=r"grid 4x4 is too small for min_keep=10"):
        IJEPA(tiny_vit(16), predictor_dim=16, predictor_depth=1)  # the paper's masks on a 4x4 grid
    model = make()
    with pytest.raises(ValueError, match="too small"):  # 8-pixel images: a 2x2 grid
        model.training_step(([images(size=8)], None), 0)
    with pytest.raises(ValueError, match="not a whole number of 4x4 patches"):
        model.training_step(([images(size=18)], None), 0)
    with pytest.raises(ValueError, match="one view"):
        model.training_step(([], None), 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss="l1"), "loss must be one of"),
        (dict(ema_tau=1.1), "ema_tau"),
        (dict(ema_tau=0.999, ema_tau_final=0.99), "ema_tau"),
        (dict(warmup_start_lr=1.0), r"warmup_start_lr must lie in \[0, base_lr"),
        (dict(evaluate="student"), "evaluate must be 'target' or 'context'"),
        (dict(num_targets=0), "num_targets"),
        (dict(target_scale=(0.3, 0.2)), "target_scale"),
        (dict(predictor_dim=18), "multiple of 4"),
        (dict(predictor_heads=3), r"predictor_dim=16 must be a multiple of predictor_heads=3 \(predictor_heads\)"),
        (dict(weight_decay_final=-1.0), "weight_decay_final"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)
