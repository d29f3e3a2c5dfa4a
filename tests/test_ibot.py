"""iBOT (Zhou et al. 2022): the masked-patch loss against a naive float64 loop (masked tokens only), the
class-token loss and centers equal DINO's, what the student (masked global crops, mask token, unmasked
local crops) and the teacher (unmasked global crops) see, shared and separate patch heads, both centers'
updates, a few Trainer steps on multi-crop batches, the teacher as the representation, and bad inputs."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyConvNet
from helpers import quiet_trainer
from torch.utils.data import DataLoader, Dataset

import lightning_ssl.methods.ibot as ibot_module
from lightning_ssl.methods.dino import DINO
from lightning_ssl.methods.ibot import IBOT, ibot_patch_loss, masked_patch_loss, masked_patch_weights
from lightning_ssl.vit import encode_tokens

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to .self.log")

HEAD = dict(out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8)


def tiny_vit() -> torchvision.models.VisionTransformer:
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def make(cls=IBOT, **kwargs):
    torch.manual_seed(0)
    model = cls(tiny_vit(), **{**HEAD, "warmup_epochs": 0, **kwargs})
    model.log = lambda *a, **k: None  # outside a Trainer
    return model


def multi_crop(n: int = 4, local: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, 8, 8, generator=g) for _ in range(local)
    ]


class _MultiCropViews(Dataset):
    """Two 16x16 global views (an image and a noisy copy) and ``local`` 8x8 local views (its corners)."""

    def __init__(self, n: int, local: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.noise = torch.randn(n, 3, 16, 16, generator=g) * 0.1
        self.local = local

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        corners = [x[:, :8, :8], x[:, 8:, 8:], x[:, :8, 8:], x[:, 8:, :8]]
        return [x, x + self.noise[i]] + [corners[k % 4] for k in range(self.local)], 0


class MultiCropData(pl.LightningDataModule):
    """Multi-crop batches for the Trainer tests: 2 global 16x16 views, then ``local`` 8x8 views."""

    def __init__(self, n: int = 16, batch_size: int = 4, local: int = 2):
        super().__init__()
        self.dataset, self.batch_size = _MultiCropViews(n, local), batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


# ----------------------------------------------------------------------------- the patch loss
def naive_patch_loss(student, teacher, masks, center, ts, tt):
    total = 0.0
    for s, t, m in zip(student, teacher, masks):
        b, n, k = s.shape
        crop = 0.0
        for i in range(b):
            terms, count = 0.0, 0
            for j in range(n):
                if not bool(m[i, j]):
                    continue
                a = [(float(t[i, j, c]) - float(center[c])) / tt for c in range(k)]
                za = sum(math.exp(x) for x in a)
                z = [float(x) / ts for x in s[i, j]]
                log_zb = math.log(sum(math.exp(x) for x in z))
                terms -= sum(math.exp(a[c]) / za * (z[c] - log_zb) for c in range(k))
                count += 1
            crop += terms / max(count, 1)
        total += crop / b
    return total / len(student)


def _patch_inputs(crops=2, b=3, n=5, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(b, n, k, generator=g, dtype=torch.float64) for _ in range(crops)]
    teacher = [torch.randn(b, n, k, generator=g, dtype=torch.float64) for _ in range(crops)]
    masks = [torch.rand(b, n, generator=g) < 0.5 for _ in range(crops)]
    masks[0][0] = False  # an image without masked patches: contributes 0, still counted in the mean
    masks[-1][-1, 0] = True
    center = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
    return student, teacher, masks, center


@pytest.mark.parametrize("crops,b,n,k", [(2, 3, 5, 4), (1, 2, 6, 3), (3, 2, 4, 5)])
def test_patch_loss_matches_the_naive_loop_over_masked_tokens(crops, b, n, k):
    student, teacher, masks, center = _patch_inputs(crops, b, n, k, seed=crops + n)
    loss = ibot_patch_loss(student, teacher, masks, center, 0.1, 0.05)
    assert loss.item() == pytest.approx(naive_patch_loss(student, teacher, masks, center, 0.1, 0.05), rel=1e-10)


def test_unmasked_tokens_do_not_enter_the_patch_loss():
    student, teacher, masks, center = _patch_inputs()
    student = [s.clone().requires_grad_(True) for s in student]
    loss = ibot_patch_loss(student, teacher, masks, center, 0.1, 0.05)
    loss.backward()
    for s, m in zip(student, masks):
        assert torch.all(s.grad[~m] == 0) and torch.all(s.grad[m].abs().sum(-1) > 0)
    changed = [s.detach().clone() for s in student]
    changed[0][~masks[0]] += 100.0 * torch.randn_like(changed[0][~masks[0]])  # an unmasked token's logits
    assert ibot_patch_loss(changed, teacher, masks, center, 0.1, 0.05).item() == loss.item()
    changed[1][masks[1]] += torch.randn_like(changed[1][masks[1]])  # a masked one's (not a shift: softmax ignores it)
    assert ibot_patch_loss(changed, teacher, masks, center, 0.1, 0.05).item() != loss.item()
    none = [torch.zeros_like(m) for m in masks]
    assert ibot_patch_loss(student, teacher, none, center, 0.1, 0.05).item() == 0.0


def test_patch_loss_in_float32_under_bf16():
    """bf16 logits under autocast: computed in float32, as on the same logits cast to float32 first."""
    student, teacher, masks, center = _patch_inputs()
    low_s, low_t = [s.bfloat16() for s in student], [t.bfloat16() for t in teacher]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ibot_patch_loss(low_s, low_t, masks, center.float(), 0.1, 0.05)
    assert loss.dtype == torch.float32
    reference = ibot_patch_loss(
        [s.float() for s in low_s], [t.float() for t in low_t], masks, center.float(), 0.1, 0.05
    )
    torch.testing.assert_close(loss, reference, rtol=0, atol=0)


def test_patch_loss_rejects_mismatched_inputs():
    student, teacher, masks, center = _patch_inputs()
    with pytest.raises(ValueError, match="one student, teacher and mask tensor per global crop"):
        ibot_patch_loss(student, teacher[:1], masks, center)
    with pytest.raises(ValueError, match="B x N x K"):
        ibot_patch_loss(student, teacher, [m[:, :-1] for m in masks], center)


def test_masked_token_loss_equals_the_full_grid_loss():
    """DINOv2's ``forward_masked`` form (the training steps'): the same value, on the masked tokens only."""
    student, teacher, masks, center = _patch_inputs(crops=2, b=3, n=6, k=5, seed=4)
    flat = torch.cat(masks)
    s = torch.cat(student)[flat]  # M x K, row-major order of the masks
    targets = F.softmax((torch.cat(teacher)[flat] - center) / 0.05, dim=-1)
    expected = ibot_patch_loss(student, teacher, masks, center, 0.1, 0.05)
    torch.testing.assert_close(masked_patch_loss(s, targets, flat, 0.1), expected)
    counts = [int(m.sum()) for m in flat]
    weights = torch.cat([torch.full((c,), 1 / max(c, 1), dtype=torch.float64) for c in counts])
    torch.testing.assert_close(masked_patch_weights(flat).double(), weights)
    torch.testing.assert_close(masked_patch_loss(s, targets, flat, 0.1, weights=weights), expected)
    with pytest.raises(ValueError, match="masked tokens but"):
        masked_patch_loss(s, targets, flat, 0.1, weights=weights[:-1])
    with pytest.raises(ValueError, match="M x K"):
        masked_patch_loss(s, targets[:-1], flat, 0.1)


# ----------------------------------------------------------------------------- the training step
def test_cls_loss_and_center_equal_dino_without_masks():
    """No mask, no patch term: iBOT's step is DINO's (the same weights, views, loss and center)."""
    kwargs = dict(drop_path=0.0, view_batching="per_view")
    dino = make(DINO, **kwargs)
    ibot = make(mask_probability=0.0, patch_loss_weight=0.0, **kwargs)
    ibot.load_state_dict(
        {**dino.state_dict(), **{k: v for k, v in ibot.state_dict().items() if k not in dino.state_dict()}}
    )
    views = multi_crop()
    torch.testing.assert_close(ibot.training_step((views, None), 0), dino.training_step((views, None), 0))
    torch.testing.assert_close(ibot.center, dino.center)
    assert ibot.patch_center.abs().sum() > 0


@pytest.mark.parametrize("mode", ["per_view", "concat"])
def test_student_sees_masked_global_crops_and_the_teacher_unmasked(monkeypatch, mode):
    model = make(view_batching=mode, mask_probability=1.0)
    calls, recorded = [], {}
    real_encode, real_loss = ibot_module.encode_tokens, ibot_module.masked_patch_loss

    def recording_encode(backbone, images, keep=None, mask=None, mask_token=None):
        calls.append((backbone, images, mask, mask_token))
        return real_encode(backbone, images, keep=keep, mask=mask, mask_token=mask_token)

    def recording_loss(student, targets, masks, *args, **kwargs):
        recorded["masks"], recorded["student"] = masks, student
        return real_loss(student, targets, masks, *args, **kwargs)

    monkeypatch.setattr(ibot_module, "encode_tokens", recording_encode)
    monkeypatch.setattr(ibot_module, "masked_patch_loss", recording_loss)
    local_inputs = []
    model.backbone.register_forward_hook(lambda m, i, o: local_inputs.append(i[0]))
    model.backbone_ema.register_forward_hook(lambda m, i, o: pytest.fail("the teacher saw a local crop"))
    views = multi_crop()
    model.training_step((views, None), 0)

    student = [c for c in calls if c[0] is model.backbone]
    teacher = [c for c in calls if c[0] is model.backbone_ema]
    globals_ = torch.cat(views[:2]) if mode == "concat" else None
    for group in (student, teacher):
        images = torch.cat([c[1] for c in group])
        assert torch.equal(images, globals_ if globals_ is not None else torch.cat(views[:2]))
    assert all(c[2] is None and c[3] is None for c in teacher)  # the teacher: unmasked
    assert all(c[3] is model.mask_token for c in student)
    student_masks = torch.cat([c[2] for c in student])
    assert student_masks.shape == (8, 16) and student_masks.any(dim=1).all()  # every crop masked (p = 1)
    assert torch.equal(student_masks, recorded["masks"])  # the loss's masks are the student's
    assert recorded["student"].shape == (int(student_masks.sum()), 16)  # logits of the masked tokens only
    assert [tuple(x.shape[-2:]) for x in local_inputs] in ([(8, 8), (8, 8)], [(8, 8)])  # local crops: no mask
    # the student's patch tokens are those of the masked crops: recomputed here from the recorded masks
    with torch.no_grad():
        model.eval()
        for c in student:
            masked = real_encode(model.backbone, c[1], mask=c[2], mask_token=model.mask_token).patches
            plain = real_encode(model.backbone, c[1]).patches
            assert not torch.allclose(masked, plain)
        model.train()


@pytest.mark.parametrize("shared_head", [True, False])
def test_step_patch_loss_is_the_full_grid_loss_of_the_codes_form(monkeypatch, shared_head):
    """The step computes the student's patch head on the masked tokens and the teacher's last layer on the
    masked tokens and the batch mean: the loss and center equal iBOT's full-grid computation."""
    model = make(shared_head=shared_head, patch_out_dim=None if shared_head else 12, drop_path=0.0)
    model.patch_center.normal_()
    center_before = model.patch_center.clone()
    recorded = {}
    real = ibot_module.masked_patch_loss

    def recording(*args, **kwargs):
        recorded["loss"] = real(*args, **kwargs)
        return recorded["loss"]

    monkeypatch.setattr(ibot_module, "masked_patch_loss", recording)
    views = multi_crop()
    masks = model.sample_masks(views[:2], batch_idx=0)  # the step's masks (its MaskSampler, batch 0)
    torch.manual_seed(7)
    model.training_step((views, None), 0)
    with torch.no_grad():
        student = [
            model.patch_network(False)(encode_tokens(model.backbone, v, mask=m, mask_token=model.mask_token).patches)
            for v, m in zip(views[:2], masks)
        ]
        teacher = [model.patch_network(True)(encode_tokens(model.backbone_ema, v).patches) for v in views[:2]]
    expected = ibot_patch_loss(student, teacher, masks, center_before, 0.1, model.teacher_patch_temperature())
    torch.testing.assert_close(recorded["loss"], expected)
    mean = torch.cat([t.flatten(0, 1) for t in teacher]).mean(dim=0, keepdim=True)
    torch.testing.assert_close(model.patch_center, 0.9 * center_before + 0.1 * mean, rtol=1e-5, atol=1e-6)


def test_masks_follow_mask_probability_and_ratio():
    torch.manual_seed(0)
    model = make(mask_probability=0.5, mask_ratio=(0.25, 0.5))
    masks = torch.cat([torch.cat(model.sample_masks(multi_crop(n=8)[:2])) for _ in range(20)])  # 320 crops
    counts = masks.sum(dim=1)
    assert masks.shape == (320, 16) and masks.dtype == torch.bool
    assert 0.35 < (counts > 0).float().mean() < 0.65
    assert counts.max() <= 8  # at most round(0.5 x 16)
    assert (make(mask_probability=0.0).sample_masks(multi_crop()[:2])[0]).sum() == 0


def test_mask_token_gets_a_gradient_and_the_teacher_none():
    model = make(mask_probability=1.0)
    loss = model.training_step((multi_crop(), None), 0)
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in [*model.backbone_ema.parameters(), *model.head_ema.parameters()])


def test_centers_are_updated_over_the_teachers_outputs():
    model = make(center_momentum=0.9, patch_center_momentum=0.8)
    model.center.fill_(0.5)
    model.patch_center.fill_(-0.25)
    views = multi_crop()
    with torch.no_grad():
        tokens = [encode_tokens(model.backbone_ema, v) for v in views[:2]]
        cls = [model.head_ema(t.cls) for t in tokens]
        patches = [model.head_ema(t.patches.flatten(0, 1)) for t in tokens]
    model.training_step((views, None), 0)
    k = model.center.shape[1]
    cls_mean = [sum(float(c[i, j]) for c in cls for i in range(4)) / 8 for j in range(k)]
    patch_mean = [sum(float(p[i, j]) for p in patches for i in range(4 * 16)) / (8 * 16) for j in range(k)]
    expected_cls = torch.tensor([[0.9 * 0.5 + 0.1 * m for m in cls_mean]])
    expected_patch = torch.tensor([[0.8 * -0.25 + 0.2 * m for m in patch_mean]])
    torch.testing.assert_close(model.center, expected_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.patch_center, expected_patch, rtol=1e-5, atol=1e-6)


def test_shared_head_gives_class_and_patch_tokens_one_head():
    model = make()
    assert model.patch_head is None and model.patch_head_ema is None
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(model.patch_network(teacher=False)(x), model.head(x))
    torch.testing.assert_close(model.patch_network(teacher=True)(x), model.head_ema(x))
    assert model.patch_center.shape == (1, 16)
    assert model.ema_pairs() == [(model.backbone, model.backbone_ema), (model.head, model.head_ema)]


def test_separate_patch_head_is_its_own_last_layer_on_the_shared_mlp():
    model = make(shared_head=False, patch_out_dim=12)
    last = model.patch_head
    assert last.weight.shape == (12, 8) and model.patch_center.shape == (1, 12)
    g = last.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))  # norm_last_layer: fixed norm 1
    x = torch.randn(2, 5, 32)
    expected = last(F.normalize(model.head.mlp(x), dim=-1))
    torch.testing.assert_close(model.patch_network(teacher=False)(x), expected)
    assert model.patch_parts(teacher=True) == (model.head_ema.mlp, model.patch_head_ema)
    assert (model.patch_head, model.patch_head_ema) in model.ema_pairs()
    loss = model.training_step((multi_crop(), None), 0)
    loss.backward()
    assert last.parametrizations.weight.original1.grad is not None
    assert all(p.grad is None for p in model.patch_head_ema.parameters())
    model.on_after_backward()  # epoch 0: the last layers are frozen
    assert last.parametrizations.weight.original1.grad is None and model.head.mlp[0].weight.grad is not None


def test_mask_token_is_weight_decayed_like_the_codes_2d_parameters():
    model = make(weight_decay=0.04)
    decay_of = {id(p): g["weight_decay"] for g in model.parameter_groups(0.04) for p in g["params"]}
    assert model.mask_token.shape == (1, 32) and torch.equal(model.mask_token, torch.zeros(1, 32))
    assert decay_of[id(model.mask_token)] == 0.04


# ----------------------------------------------------------------------------- fit
@pytest.mark.parametrize("shared_head", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_fit_a_few_steps_on_multi_crop_batches(tmp_path, shared_head):
    model, rec = make(shared_head=shared_head, patch_out_dim=None if shared_head else 12, ema_tau=0.9), LossRecorder()
    teacher_before = [p.detach().clone() for p in model.backbone_ema.parameters()]
    token_before = model.mask_token.detach().clone()
    trainer = quiet_trainer(max_steps=4, default_root_dir=tmp_path, callbacks=[rec])
    trainer.fit(model, MultiCropData(n=16, batch_size=4, local=2))
    assert trainer.global_step == 4 and len(rec.losses) == 4
    assert all(math.isfinite(v) for v in rec.losses) and len(set(rec.losses)) > 1
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, model.backbone_ema.parameters()))
    assert not torch.equal(token_before, model.mask_token)
    assert model.center.abs().sum() > 0 and model.patch_center.abs().sum() > 0


def test_hyperparameters_rebuild_the_model_and_the_teacher_is_the_representation():
    model = make(shared_head=False, patch_out_dim=12, mask_ratio=(0.2, 0.4))
    rebuilt = type(model)(tiny_vit(), **model.hparams)
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert rebuilt.mask_ratio == (0.2, 0.4) and rebuilt.patch_head.weight.shape == (12, 8)
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone_ema(x))
        torch.testing.assert_close(model(x), encode_tokens(model.backbone_ema, x).cls)
    assert model.encoder_spec()["state_prefix"] == "backbone_ema."


def test_named_small_image_vit_on_32x32():
    torch.manual_seed(0)
    model = IBOT("vit_ti_16", small_image=True, **HEAD, warmup_epochs=0)
    model.log = lambda *a, **k: None
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(2, 3, 16, 16, generator=g)]
    assert model.sample_masks(views[:2])[0].shape == (2, 64)  # 8 x 8 patches of 4 pixels
    assert torch.isfinite(model.training_step((views, None), 0))


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    with pytest.raises(ValueError, match="needs a ViT backbone.*vit_s_16.*TinyConvNet"):
        IBOT(TinyConvNet(), **HEAD)
    with pytest.raises(ValueError, match="needs a ViT backbone.*ResNet"):
        IBOT("resnet18", small_image=True, **HEAD)
    with pytest.raises(ValueError, match="mask_probability must lie in"):
        make(mask_probability=1.5)
    with pytest.raises(ValueError, match="mask_ratio must satisfy"):
        make(mask_ratio=(0.5, 0.1))
    with pytest.raises(ValueError, match="mask_ratio must be a pair"):
        make(mask_ratio=0.3)
    with pytest.raises(ValueError, match="a shared head gives the patches"):
        make(patch_out_dim=12)
    with pytest.raises(ValueError, match="every temperature must be positive"):
        make(teacher_patch_temperature=0.0)
    with pytest.raises(ValueError, match="not both 0"):
        make(cls_loss_weight=0.0, patch_loss_weight=0.0)
    with pytest.raises(ValueError, match="mask_min_aspect"):
        make(mask_min_aspect=0.0)
    model = make(global_crops=3)
    with pytest.raises(ValueError, match="at least 2 and global_crops=3 views, got 2"):
        model.training_step((multi_crop(local=0), None), 0)
    with pytest.raises(ValueError, match="not a whole number of 4x4 patches"):
        make().training_step(([torch.randn(2, 3, 14, 14)] * 2, None), 0)
