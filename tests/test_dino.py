"""DINO (Caron et al. 2021): the loss and the center against naive float64 loops, the teacher gets no
gradient, the teacher temperature schedule, the last layer frozen in the first epoch, the weight-decay
schedule and per-parameter clipping. (The center over two gloo processes equal to one process:
tests/test_distributed.py, with the helpers here.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyConvNet
from helpers import RandomTwoViews, quiet_trainer

from lightning_ssl import DINO
from lightning_ssl.heads import DINOHead
from lightning_ssl.losses import dino_center, dino_loss, teacher_temperature


def naive_dino_loss(student, teacher, center, ts, tt):
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == i:
                continue
            for n in range(s.shape[0]):
                a = [(float(t[n, k]) - float(center[k])) / tt for k in range(t.shape[1])]
                za = sum(math.exp(x) for x in a)
                b = [float(x) / ts for x in s[n]]
                log_zb = math.log(sum(math.exp(x) for x in b))
                total -= sum(math.exp(a[k]) / za * (b[k] - log_zb) for k in range(len(b))) / s.shape[0]
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("views,globals_,b,k", [(2, 2, 3, 4), (6, 2, 2, 5), (3, 1, 4, 3)])
def test_dino_loss_matches_the_naive_loop(views, globals_, b, k):
    g = torch.Generator().manual_seed(views + b)
    student = [torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(views)]
    teacher = [torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(globals_)]
    center = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
    loss = dino_loss(student, teacher, center, 0.1, 0.05)
    assert loss.item() == pytest.approx(naive_dino_loss(student, teacher, center, 0.1, 0.05), rel=1e-10)


def test_dino_center_matches_the_naive_mean():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    center = torch.randn(1, 3, generator=g, dtype=torch.float64)
    mean = [sum(float(t[n, k]) for t in teacher for n in range(4)) / 8 for k in range(3)]
    expected = torch.tensor([[0.9 * float(center[0, k]) + 0.1 * mean[k] for k in range(3)]], dtype=torch.float64)
    torch.testing.assert_close(dino_center(center, teacher, 0.9), expected)


def center_teacher() -> list[torch.Tensor]:
    """The teacher outputs (two global views) of the two-process check (tests/test_distributed.py)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(2)]


def center_on_half(rank: int) -> torch.Tensor:
    """Run in each of two processes: the center update from this process's half of the batch."""
    return dino_center(
        torch.zeros(1, 5, dtype=torch.float64), [t[rank * 4 : (rank + 1) * 4] for t in center_teacher()], 0.9
    )


def test_teacher_temperature_schedule_is_exact():
    expected = np.linspace(0.04, 0.07, 30)
    for epoch in range(30):
        assert teacher_temperature(epoch, 0.04, 0.07, 30) == pytest.approx(expected[epoch], abs=1e-15)
    assert teacher_temperature(30, 0.04, 0.07, 30) == 0.07 and teacher_temperature(500) == 0.07
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07 and teacher_temperature(0, 0.04, 0.07, 1) == 0.04


def _model(**kwargs) -> DINO:
    torch.manual_seed(0)
    args = dict(out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8, warmup_epochs=0)
    return DINO(TinyConvNet(), **{**args, **kwargs})


def _multi_crop(n: int = 4, local: int = 3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(n, 3, 8, 8, generator=g) for _ in range(local)
    ]


def test_teacher_gets_no_gradient_and_sees_the_global_views_only():
    model = _model()
    model.log = lambda *a, **k: None
    teacher = [*model.backbone_ema.parameters(), *model.head_ema.parameters()]
    assert not any(p.requires_grad for p in teacher)
    for p in teacher:  # even if asked for
        p.requires_grad_(True)
    seen = []
    model.backbone_ema.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
    loss = model.training_step((_multi_crop(), None), 0)
    loss.backward()
    assert all(p.grad is None for p in teacher)
    assert any(p.grad is not None for p in model.backbone.parameters())
    assert sorted(seen) == [16, 16]  # per view on the CPU: the two global views


def test_head_shape_and_fixed_norm():
    head = DINOHead(8, out_dim=12, hidden_dim=16, bottleneck_dim=4)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 12)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(12))
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3


class _Record(pl.Callback):
    def __init__(self):
        self.temperatures, self.weight_decays, self.last_layer = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.temperatures.append(pl_module.teacher_temperature())
        self.last_layer.append(pl_module.head.last_layer.parametrizations.weight.original1.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # the step's values
        groups = trainer.optimizers[0].param_groups
        self.weight_decays.append([g["weight_decay"] for g in groups])


def test_fit_schedules_and_the_last_layer_frozen_in_the_first_epoch(tmp_path):
    rec = _Record()
    model = _model(warmup_teacher_temperature_epochs=3, weight_decay=0.04, weight_decay_final=0.4)
    trainer = quiet_trainer(max_epochs=3, default_root_dir=tmp_path, callbacks=[rec])
    trainer.fit(model, RandomTwoViews(16, 8, image_size=16))  # 2 steps per epoch
    assert rec.temperatures == pytest.approx(list(np.linspace(0.04, 0.07, 3)), abs=1e-15)
    assert torch.equal(rec.last_layer[0], rec.last_layer[1])  # frozen in epoch 0
    assert not torch.equal(rec.last_layer[1], rec.last_layer[2])  # updated in epoch 1
    decay = [wd[0] for wd in rec.weight_decays]  # group 0: weights; group 1 (biases, norms): none
    expected = [0.4 - 0.36 * (math.cos(math.pi * k / 6) + 1) / 2 for k in range(6)]
    assert decay == pytest.approx(expected) and all(wd[1] == 0.0 for wd in rec.weight_decays)
    assert model.center.abs().sum() > 0


def test_per_parameter_gradient_clipping():
    model = _model(clip_grad=0.5)
    model.log = lambda *a, **k: None
    (model.training_step((_multi_crop(), None), 0) * 1000).backward()
    before = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    assert max(before.values()) > 0.5
    model.configure_gradient_clipping(None)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.norm().item() == pytest.approx(min(before[n], 0.5), rel=1e-4), n


# ----------------------------------------------------------------- the teacher is the representation
def _trained_resnet_dino(tmp_path, **kwargs) -> tuple[DINO, str]:
    torch.manual_seed(0)
    args = dict(out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8, warmup_epochs=0, ema_tau=0.5)
    model = DINO("resnet18", small_image=True, optimizer="sgd", base_lr=0.5, **{**args, **kwargs})
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, RandomTwoViews(16, 8, image_size=16))
    path = str(tmp_path / "dino.ckpt")
    trainer.save_checkpoint(path)
    return model, path


def test_representation_validate_and_export_use_the_teacher(tmp_path):
    """The paper's code evaluates the teacher (eval_knn.py, eval_linear.py: --checkpoint_key teacher)."""
    from lightning_ssl.evaluation import export_backbone, load_encoder

    model, ckpt = _trained_resnet_dino(tmp_path)
    teacher = dict(model.backbone_ema.module.state_dict())
    student = model.backbone.module.state_dict()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher), "2 steps at tau 0.5 separate them"
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.representation(x), model.backbone_ema(x))
        torch.testing.assert_close(model(x), model.backbone_ema(x))
    out = export_backbone(ckpt, tmp_path / "dino.pt")
    exported = torch.load(out, weights_only=True)
    for key, value in teacher.items():
        assert torch.equal(exported[key], value), key
    assert set(exported) - set(teacher) == {"fc.weight", "fc.bias"}
    encoder, _ = load_encoder(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(x), model.backbone_ema(x))


def test_evaluate_student_keeps_the_student(tmp_path):
    from lightning_ssl.evaluation import export_backbone

    model, ckpt = _trained_resnet_dino(tmp_path, evaluate="student")
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.representation(x), model.backbone(x))
    exported = torch.load(export_backbone(ckpt, tmp_path / "student.pt"), weights_only=True)
    for key, value in model.backbone.module.state_dict().items():
        assert torch.equal(exported[key], value), key
    with pytest.raises(ValueError, match="evaluate must be 'teacher' or 'student'"):
        _model(evaluate="ema")


# ----------------------------------------------------------------- ViT: drop path and token decay
def _vit_dino(**kwargs) -> DINO:
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    return DINO(vit, out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8, warmup_epochs=0, **kwargs)


def test_student_vit_has_drop_path_0_1_and_the_teacher_none():
    model = _vit_dino()
    student = model.backbone.module.encoder.layers
    assert [block.drop_path.p for block in student] == pytest.approx([0.0, 0.05, 0.1])
    assert all(block.drop_path.mode == "row" for block in student)
    assert not any(hasattr(block, "drop_path") for block in model.backbone_ema.module.encoder.layers)
    assert list(model.backbone.state_dict()) == list(model.backbone_ema.state_dict())
    x = torch.randn(64, 3, 16, 16)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.backbone(x), model.backbone(x))  # blocks dropped per sample
        torch.testing.assert_close(model.backbone_ema(x), model.backbone_ema(x))
        model.eval()
        torch.testing.assert_close(model.backbone(x), model.backbone(x))
    assert all(block.drop_path.p == 0 for block in _vit_dino(drop_path=0.0).backbone.module.encoder.layers)


def test_vit_position_embedding_and_class_token_are_decayed():
    model = _vit_dino(weight_decay=0.04)
    decay_of = {id(p): g["weight_decay"] for g in model.parameter_groups(0.04) for p in g["params"]}
    vit = model.backbone.module
    assert decay_of[id(vit.encoder.pos_embedding)] == 0.04 and decay_of[id(vit.class_token)] == 0.04
    block = vit.encoder.layers[0]
    assert decay_of[id(block.ln_1.weight)] == 0.0 and decay_of[id(block.mlp[0].bias)] == 0.0
    assert decay_of[id(block.mlp[0].weight)] == 0.04


@pytest.mark.parametrize("mode, calls", [("concat", [20]), ("per_view", [4] * 5)])
def test_multi_crop_head_runs_once_on_all_crops(mode, calls):
    """DINO's ``MultiCropWrapper``: the backbone once per resolution, the head (with ``head_batch_norm``,
    the ResNet config's) once on the features of every crop; the teacher's once on the global crops."""
    model = _model(view_batching=mode, head_batch_norm=True)
    model.log = lambda *a, **k: None
    student, teacher = [], []
    model.head.register_forward_hook(lambda m, i, o: student.append(i[0].shape[0]))
    model.head_ema.register_forward_hook(lambda m, i, o: teacher.append(i[0].shape[0]))
    model.training_step((_multi_crop(), None), 0)
    assert student == calls
    assert teacher == ([8] if mode == "concat" else [4, 4])
