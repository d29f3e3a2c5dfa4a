"""DINOv2-style pretraining (Oquab et al. 2023): Sinkhorn-Knopp teacher centering against a naive loop and
over two gloo processes (class tokens split evenly, masked patches with different counts per process),
KoLeo against a naive double loop, the masked-token patch loss equal to iBOT's, DINO's loss on given
targets, the stratified masks, the training step's pieces (masks, what each network sees, KoLeo's input),
untied heads, the parameter groups, uniform drop path, per-network clipping, the per-step teacher
temperature, a few Trainer steps in both centering modes, and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import TinyConvNet
from dist_utils import run_distributed
from helpers import quiet_trainer
from test_ibot import HEAD, LossRecorder, MultiCropData, multi_crop, tiny_vit

import lightning_ssl.methods.dinov2 as dinov2_module
import lightning_ssl.methods.ibot as ibot_module
from lightning_ssl.heads import DINOHead
from lightning_ssl.losses import dino_loss, sinkhorn_knopp
from lightning_ssl.methods.dinov2 import (
    DINOv2,
    dino_targets_loss,
    koleo_loss,
    masked_center,
    sinkhorn_knopp_teacher,
    stratified_block_masks,
)
from lightning_ssl.vit import encode_tokens

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to .self.log")


def make(**kwargs) -> DINOv2:
    torch.manual_seed(0)
    model = DINOv2(tiny_vit(), **{**HEAD, "warmup_epochs": 0, **kwargs})
    model.log = lambda *a, **k: None
    return model


# ----------------------------------------------------------------------------- Sinkhorn-Knopp
def naive_sinkhorn(scores: torch.Tensor, temperature: float, iterations: int) -> list[list[float]]:
    s, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / temperature) for i in range(s)] for j in range(k)]  # K x S
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        q = [[x / sum(row) / k for x in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(s)]
        q = [[q[j][i] / cols[i] / s for i in range(s)] for j in range(k)]
    return [[q[j][i] * s for j in range(k)] for i in range(s)]


@pytest.mark.parametrize("s,k,iterations", [(6, 4, 3), (5, 7, 1), (9, 3, 5)])
def test_sinkhorn_teacher_matches_the_naive_loop(s, k, iterations):
    scores = torch.randn(s, k, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
    out = sinkhorn_knopp_teacher(scores, 0.5, iterations)
    torch.testing.assert_close(out, torch.tensor(naive_sinkhorn(scores, 0.5, iterations), dtype=torch.float64))
    torch.testing.assert_close(out.sum(dim=1), torch.ones(s, dtype=torch.float64))
    torch.testing.assert_close(out, sinkhorn_knopp(scores, 0.5, iterations))  # SwAV's, for class tokens


def test_sinkhorn_teacher_does_not_overflow_and_takes_no_gradient():
    scores = torch.randn(8, 5) + 100.0  # exp(100 / 0.07) overflows float32 without the shift by the maximum
    scores.requires_grad_(True)
    out = sinkhorn_knopp_teacher(scores, 0.07)
    assert torch.isfinite(out).all() and not out.requires_grad
    torch.testing.assert_close(out, sinkhorn_knopp_teacher(scores.detach().double() - 100.0, 0.07).float())
    assert sinkhorn_knopp_teacher(torch.zeros(0, 5), 0.07).shape == (0, 5)
    with pytest.raises(ValueError, match="S x K"):
        sinkhorn_knopp_teacher(torch.zeros(2, 3, 4), 0.07)


def _global_scores() -> torch.Tensor:
    return torch.randn(9, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


SPLITS = {"cls": [4, 4], "patches": [3, 6], "empty": [0, 5]}  # rows of rank 0 and rank 1


def _sinkhorn_worker(rank: int, world: int) -> dict:
    out = {}
    for name, rows in SPLITS.items():
        scores = _global_scores()[: sum(rows)]
        start = sum(rows[:rank])
        local = scores[start : start + rows[rank]]
        out[name] = sinkhorn_knopp_teacher(local, 0.3, 3)
        out[f"center_{name}"] = masked_center(torch.full((1, 5), 0.5, dtype=torch.float64), local, 0.9)
    return out


@pytest.mark.distributed
def test_sinkhorn_teacher_and_masked_center_over_two_processes_equal_one_process():
    """Each process's targets (sums and the sample count all-reduced) are its rows of the one-process
    targets on the concatenated batch: class tokens split evenly, masked patches with 3 and 6 (and 0 and 5)
    tokens per process; the masked-patch center is the same on both processes and equals one process's."""
    results = run_distributed(_sinkhorn_worker, 2)
    for name, rows in SPLITS.items():
        scores = _global_scores()[: sum(rows)]
        expected = sinkhorn_knopp_teacher(scores, 0.3, 3)
        torch.testing.assert_close(torch.cat([results[0][name], results[1][name]]), expected)
        center = masked_center(torch.full((1, 5), 0.5, dtype=torch.float64), scores, 0.9)
        for r in range(2):
            torch.testing.assert_close(results[r][f"center_{name}"], center)


def test_masked_center_is_the_ema_of_the_masked_tokens_mean():
    center = torch.randn(1, 4, dtype=torch.float64)
    tokens = torch.randn(7, 4, dtype=torch.float64)
    mean = [sum(float(tokens[i, j]) for i in range(7)) / 7 for j in range(4)]
    expected = torch.tensor([[0.9 * float(center[0, j]) + 0.1 * mean[j] for j in range(4)]], dtype=torch.float64)
    torch.testing.assert_close(masked_center(center, tokens, 0.9), expected)
    torch.testing.assert_close(masked_center(center, tokens[:0], 0.9), center)  # no masked token: unchanged


# ----------------------------------------------------------------------------- KoLeo
def naive_koleo(x: torch.Tensor, eps: float = 1e-8) -> float:
    rows = [[float(v) for v in r] for r in x]
    rows = [[v / max(math.sqrt(sum(u * u for u in r)), eps) for v in r] for r in rows]
    total = 0.0
    for i, a in enumerate(rows):
        nearest = min(math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b))) for j, b in enumerate(rows) if j != i)
        total -= math.log(nearest + eps)
    return total / len(rows)


@pytest.mark.parametrize("b,d", [(5, 3), (8, 6), (2, 4)])
def test_koleo_matches_the_naive_double_loop(b, d):
    x = torch.randn(b, d, generator=torch.Generator().manual_seed(b), dtype=torch.float64)
    assert koleo_loss(x).item() == pytest.approx(naive_koleo(x), rel=1e-6)


def test_koleo_spreads_the_features_and_rejects_a_single_row():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    koleo_loss(x).backward()
    assert x.grad.abs().sum() > 0
    close = torch.randn(1, 4).repeat(6, 1) + 1e-3 * torch.randn(6, 4)
    assert koleo_loss(close) > koleo_loss(torch.randn(6, 4))  # clustered features: a larger loss
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))


# ----------------------------------------------------------------------------- the two losses on targets
def test_dino_targets_loss_is_dino_loss_with_softmax_targets():
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(5)]
    teacher = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, 6, generator=g, dtype=torch.float64) * 0.1
    targets = [F.softmax((t - center) / 0.04, dim=-1) for t in teacher]
    torch.testing.assert_close(dino_targets_loss(student, targets, 0.1), dino_loss(student, teacher, center, 0.1, 0.04))


# ----------------------------------------------------------------------------- masks
def test_stratified_masks_mask_exactly_half_at_increasing_ratios(monkeypatch):
    torch.manual_seed(0)
    masks = stratified_block_masks(8, (4, 4), (0.1, 0.5), 0.5)
    counts = masks.sum(dim=1)
    assert masks.shape == (8, 16) and masks.dtype == torch.bool and int((counts > 0).sum()) == 4
    assert counts.max() <= 8  # at most round(0.5 x 16) patches
    assert stratified_block_masks(5, (4, 4), (0.1, 0.5), 0.0).sum() == 0
    assert (stratified_block_masks(6, (4, 4), (0.1, 0.5), 1.0).sum(dim=1) > 0).all()
    # the code's linspace(0.1, 0.5, n_masked + 1): one ratio slice per masked image, then a shuffle
    ranges, real = [], dinov2_module.block_masks

    def recording(batch, grid, ratio_range, mask_probability, min_aspect, generator=None):
        ranges.append((batch, ratio_range, mask_probability, min_aspect))
        return real(batch, grid, ratio_range, mask_probability, min_aspect, generator=generator)

    monkeypatch.setattr(dinov2_module, "block_masks", recording)
    first_masked = set()
    for _ in range(10):
        ranges.clear()
        masks = stratified_block_masks(8, (4, 4), (0.1, 0.5), 0.5, 0.3)
        assert [r[0] for r in ranges] == [1] * 4 and all(r[2:] == (1.0, 0.3) for r in ranges)
        bounds = [r[1] for r in ranges]
        expected = [(0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5)]
        assert all(a == pytest.approx(b) for got, want in zip(bounds, expected) for a, b in zip(got, want))
        first_masked.add(tuple(masks.any(dim=1).tolist()))
    assert len(first_masked) > 1  # shuffled: not always the same images
    with pytest.raises(ValueError, match="mask_probability"):
        stratified_block_masks(4, (4, 4), (0.1, 0.5), 2.0)


# ----------------------------------------------------------------------------- the training step
def test_step_pieces_masks_what_each_network_sees_and_koleos_input(monkeypatch):
    model = make(view_batching="concat")
    calls, recorded = [], {}
    real_encode, real_patch, real_koleo = ibot_module.encode_tokens, dinov2_module.masked_patch_loss, koleo_loss

    def encode(backbone, images, keep=None, mask=None, mask_token=None):
        calls.append((backbone, images, mask, mask_token))
        out = real_encode(backbone, images, keep=keep, mask=mask, mask_token=mask_token)
        recorded.setdefault("tokens", []).append(out)
        return out

    def patch(student, targets, masks, temperature, weights=None):
        recorded.update(student=student, targets=targets, masks=masks, weights=weights)
        return real_patch(student, targets, masks, temperature, weights=weights)

    def koleo(features):
        recorded.setdefault("koleo", []).append(features)
        return real_koleo(features)

    monkeypatch.setattr(ibot_module, "encode_tokens", encode)
    monkeypatch.setattr(dinov2_module, "masked_patch_loss", patch)
    monkeypatch.setattr(dinov2_module, "koleo_loss", koleo)
    views = multi_crop(n=4, local=2)
    model.training_step((views, None), 0)

    (s_backbone, s_images, s_mask, s_token), (t_backbone, t_images, t_mask, t_token) = calls
    assert s_backbone is model.backbone and t_backbone is model.backbone_ema
    assert torch.equal(s_images, torch.cat(views[:2])) and torch.equal(t_images, torch.cat(views[:2]))
    assert t_mask is None and t_token is None and s_token is model.mask_token
    assert int(s_mask.any(dim=1).sum()) == 4  # exactly half of the 2 x 4 global crops (mask_probability 0.5)
    assert torch.equal(recorded["masks"], s_mask)
    m = int(s_mask.sum())
    assert recorded["student"].shape == (m, 16) and recorded["targets"].shape == (m, 16)
    counts = s_mask.sum(dim=1).clamp(min=1)
    torch.testing.assert_close(recorded["weights"], (1.0 / counts.float()).unsqueeze(1).expand(8, 16)[s_mask])
    # the student's masked tokens through the patch head, the teacher's through Sinkhorn-Knopp
    student_tokens, teacher_tokens = recorded["tokens"]
    with torch.no_grad():
        expected_student = model.patch_head(student_tokens.patches.flatten(0, 1)[s_mask.flatten()])
        teacher_logits = model.patch_head_ema(teacher_tokens.patches.flatten(0, 1)[s_mask.flatten()])
    torch.testing.assert_close(recorded["student"], expected_student)
    torch.testing.assert_close(recorded["targets"], sinkhorn_knopp_teacher(teacher_logits, 0.04, 3))
    # KoLeo: the student's class tokens of each (masked) global crop, separately
    assert [tuple(f.shape) for f in recorded["koleo"]] == [(4, 32), (4, 32)]
    torch.testing.assert_close(torch.cat(recorded["koleo"]), student_tokens.cls)


def test_koleo_enters_the_loss_with_its_weight():
    views = multi_crop()
    torch.manual_seed(5)
    with_koleo = make(koleo_weight=0.1, drop_path=0.0)
    without = make(koleo_weight=0.0, drop_path=0.0)
    without.mask_sampler.seed = with_koleo.mask_sampler.seed  # the same masks in both steps
    torch.manual_seed(5)
    a = with_koleo.training_step((views, None), 0)
    torch.manual_seed(5)
    b = without.training_step((views, None), 0)
    torch.manual_seed(5)
    masks = with_koleo.sample_masks(views[:2], batch_idx=0)  # the masks the two steps drew
    token = with_koleo.mask_token
    with torch.no_grad():
        cls = [encode_tokens(with_koleo.backbone, v, mask=m, mask_token=token).cls for v, m in zip(views[:2], masks)]
    koleo = sum(koleo_loss(c) for c in cls)
    torch.testing.assert_close(a.detach() - b.detach(), 0.1 * koleo, rtol=1e-4, atol=1e-5)


def test_untied_heads_and_the_tied_option():
    model = make()
    assert isinstance(model.patch_head, DINOHead) and model.patch_head is not model.head
    assert model.patch_parts(teacher=False) == (model.patch_head.mlp, model.patch_head.last_layer)
    assert model.patch_parts(teacher=True) == (model.patch_head_ema.mlp, model.patch_head_ema.last_layer)
    x = torch.randn(3, 32)
    torch.testing.assert_close(model.patch_network(teacher=False)(x), model.patch_head(x))
    assert (model.patch_head, model.patch_head_ema) in model.ema_pairs()
    assert model.patch_last_layer() is model.patch_head.last_layer
    g = model.head.last_layer.parametrizations.weight.original0
    assert g.requires_grad  # DINOv2's DINOHead learns the last layer's norm
    tied = make(shared_head=True)
    assert tied.patch_head is None and tied.patch_parts(teacher=False) == (tied.head.mlp, tied.head.last_layer)


def test_parameter_groups_layer_decay_patch_embedding_and_mask_token():
    model = make(layer_decay=0.5, patch_embed_lr_scale=0.2)
    groups = model.parameter_groups(0.04)
    of = {id(p): g for g in groups for p in g["params"]}
    vit = model.backbone.module
    bottom = 0.5**3  # 2 blocks: layer 0 of depth + 1 = 3
    assert of[id(vit.conv_proj.weight)]["lr_scale"] == pytest.approx(0.2 * bottom)
    assert of[id(vit.conv_proj.weight)]["weight_decay"] == 0.04 and of[id(vit.conv_proj.bias)]["weight_decay"] == 0
    assert of[id(model.mask_token)]["lr_scale"] == pytest.approx(bottom)
    assert of[id(model.mask_token)]["weight_decay"] == 0.04
    assert of[id(vit.encoder.pos_embedding)]["lr_scale"] == pytest.approx(bottom)
    assert of[id(vit.encoder.pos_embedding)]["weight_decay"] == 0.04  # DINOv2 decays tokens and embeddings
    assert of[id(vit.encoder.layers[0].mlp[0].weight)]["lr_scale"] == pytest.approx(0.25)
    assert of[id(vit.encoder.layers[1].ln_1.weight)]["weight_decay"] == 0.0
    assert of[id(model.patch_head.mlp[0].weight)]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_uniform_drop_path_on_the_student_only():
    model = make(drop_path=0.3)
    assert [b.drop_path.p for b in model.backbone.module.encoder.layers] == [0.3, 0.3]
    assert not any(hasattr(b, "drop_path") for b in model.backbone_ema.module.encoder.layers)
    linear = make(drop_path=0.3, drop_path_uniform=False)
    assert [b.drop_path.p for b in linear.backbone.module.encoder.layers] == pytest.approx([0.0, 0.3])


def test_gradient_norm_clipped_per_network():
    model = make(clip_grad=0.5)
    (model.training_step((multi_crop(), None), 0) * 1000).backward()
    networks = [[*model.backbone.parameters(), model.mask_token], list(model.head.parameters())]
    networks.append(list(model.patch_head.parameters()))

    def norm(params):
        return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))

    before = [norm(n) for n in networks]
    assert min(before) > 0.5
    model.configure_gradient_clipping(None)
    assert [norm(n) for n in networks] == pytest.approx([0.5] * 3, rel=1e-4)


class _Record(pl.Callback):
    def __init__(self):
        self.temperatures = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.temperatures.append((pl_module.teacher_temperature(), pl_module.teacher_patch_temperature()))


def test_teacher_temperature_warms_up_per_step_in_a_fit(tmp_path):
    """1.5 warm-up epochs of 2 steps: np.linspace(0.04, 0.07, 3) over steps 0-2 (DINOv2's CosineScheduler,
    per iteration), then 0.07; Sinkhorn-Knopp centering leaves the centers alone."""
    rec, losses = _Record(), LossRecorder()
    model = make(warmup_teacher_temperature_epochs=1.5)
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=[rec, losses])
    trainer.fit(model, MultiCropData(n=8, batch_size=4))
    expected = [*np.linspace(0.04, 0.07, 3), 0.07]
    assert [t for t, _ in rec.temperatures] == pytest.approx(expected, abs=1e-12)
    assert [t for _, t in rec.temperatures] == pytest.approx(expected, abs=1e-12)
    assert len(losses.losses) == 4 and all(math.isfinite(v) for v in losses.losses) and len(set(losses.losses)) > 1
    assert model.center.abs().sum() == 0 and model.patch_center.abs().sum() == 0
    assert make().teacher_temperature(0) == 0.04 and make().teacher_temperature(30) == 0.07


def test_ema_centering_updates_both_centers_over_the_teacher():
    model = make(centering="center")
    model.center.fill_(0.5)
    views = multi_crop()
    masks = torch.cat(model.sample_masks(views[:2], batch_idx=0))  # the step's masks
    with torch.no_grad():
        tokens = encode_tokens(model.backbone_ema, torch.cat(views[:2]))
        cls = model.head_ema(tokens.cls)
        masked = model.patch_head_ema(tokens.patches.flatten(0, 1)[masks.flatten()])
    torch.manual_seed(3)
    assert torch.isfinite(model.training_step((views, None), 0))
    torch.testing.assert_close(model.center, 0.9 * 0.5 + 0.1 * cls.mean(dim=0, keepdim=True))
    torch.testing.assert_close(model.patch_center, 0.1 * masked.mean(dim=0, keepdim=True))


def test_bad_inputs():
    with pytest.raises(ValueError, match="needs a ViT backbone.*vit_s_16"):
        DINOv2(TinyConvNet(), **HEAD)
    with pytest.raises(ValueError, match="centering must be one of sinkhorn_knopp, center"):
        make(centering="softmax")
    with pytest.raises(ValueError, match="koleo_weight must be >= 0"):
        make(koleo_weight=-0.1)
    with pytest.raises(ValueError, match="sinkhorn_iterations"):
        make(sinkhorn_iterations=0)
    with pytest.raises(ValueError, match="the global views must share one shape"):
        make().training_step(([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)], None), 0)


def test_defaults_rebuild_and_the_reference_lr():
    """``type(model)(**hparams)`` rebuilds the model; the default lr is DINOv2's 0.004 x sqrt(B / 1024)."""
    model = make(centering="center", mask_ratio=(0.2, 0.4))
    rebuilt = type(model)(tiny_vit(), **model.hparams)
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert (rebuilt.centering, rebuilt.mask_ratio, rebuilt.optim_config["lr_scaling"]) == ("center", (0.2, 0.4), "sqrt")
    for batch in (1024, 2048, 256):
        optimizer, _ = model.optimizer_and_schedule(batch, total_steps=10, warmup_steps=0)
        head = next(g for g in optimizer.param_groups if any(p is model.head.mlp[0].weight for p in g["params"]))
        assert head["lr"] == pytest.approx(0.004 * math.sqrt(batch / 1024))


@pytest.mark.parametrize("shared_head", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_bf16_mixed_step_is_finite_in_float32(shared_head):
    for model in (make(shared_head=shared_head), ibot_module.IBOT(tiny_vit(), **HEAD, shared_head=shared_head)):
        model.log = lambda *a, **k: None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.training_step((multi_crop(), None), 0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert model.center.dtype == torch.float32 and torch.isfinite(model.patch_center).all()
