"""LARS against a hand-written reference; weight-decay groups; schedules; lr scaling."""

import math

import pytest
import torch
from torch import nn

from lightning_ssl.optim import LARS, lr_lambda, scaled_lr, split_weight_decay


def test_lars_matches_reference_update():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    opt = LARS(
        [
            {"params": [w], "weight_decay": 0.01, "lars_exclude": False},
            {"params": [b], "weight_decay": 0.0, "lars_exclude": True},
        ],
        lr=0.5,
        momentum=0.9,
        eta=0.001,
    )
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    v_w, v_b = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for _ in range(3):
        gw, gb = torch.randn_like(w_ref), torch.randn_like(b_ref)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        g = gw + 0.01 * w_ref
        trust = 0.001 * w_ref.norm() / g.norm()
        v_w = 0.9 * v_w + trust * g
        w_ref = w_ref - 0.5 * v_w
        v_b = 0.9 * v_b + gb  # excluded: no decay, no adaptation
        b_ref = b_ref - 0.5 * v_b
    torch.testing.assert_close(w.detach(), w_ref)
    torch.testing.assert_close(b.detach(), b_ref)


def test_split_weight_decay_excludes_biases_and_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    decay, no_decay = split_weight_decay([model, frozen], 1e-4)
    assert [p.shape for p in decay["params"]] == [(4, 3), (2, 4)]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]


def test_warmup_then_cosine_and_step_schedules():
    assert lr_lambda(0, 100, 10) == pytest.approx(0.1)
    assert lr_lambda(9, 100, 10) == pytest.approx(1.0)
    assert lr_lambda(10, 100, 10) == pytest.approx(1.0)
    assert lr_lambda(55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_lambda(100, 100, 10) == pytest.approx(0.0)
    assert [lr_lambda(s, 200, 0, "step") for s in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_lambda(0, 10, 0, "poly")


def test_linear_scaling_rule():
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)
    assert scaled_lr(0.03, 256) == pytest.approx(0.03)


def test_method_lr_uses_global_batch_and_accumulation(tmp_path):
    from helpers import RandomTwoViews, quiet_trainer

    from lightning_ssl import SimCLR

    model = SimCLR(backbone="resnet18", base_lr=0.3, warmup_epochs=0, schedule="constant")
    trainer = quiet_trainer(
        max_steps=1,
        accumulate_grad_batches=2,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, RandomTwoViews(num_samples=16, batch_size=8))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.3 * 16 / 256)


def test_parameter_groups_hook_scales_and_fixes_learning_rates(tmp_path):
    """A method's own groups: ``lr_scale`` multiplies the peak lr; ``fixed_lr`` skips warmup and decay."""
    from helpers import RandomTwoViews, quiet_trainer

    from lightning_ssl import SimCLR

    class HeadApart(SimCLR):
        def parameter_groups(self, weight_decay):
            head = set(map(id, self.projector.parameters()))
            rest = [p for p in self.parameters() if id(p) not in head]
            return [
                {"params": rest, "weight_decay": weight_decay},
                {"params": list(self.projector.parameters()), "weight_decay": 0.0, "lr_scale": 0.5, "fixed_lr": True},
            ]

    model = HeadApart(backbone="resnet18", lr=0.2, warmup_epochs=1, schedule="cosine")
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model, RandomTwoViews(num_samples=16, batch_size=8))  # 2 steps per epoch: warmup is 2 steps
    rest, head = trainer.optimizers[0].param_groups
    assert rest["lr"] == pytest.approx(0.2 * 1.0)  # after 2 steps: end of warmup, cosine at its peak
    assert head["lr"] == pytest.approx(0.1) and head["initial_lr"] == pytest.approx(0.1)
    assert "lr_scale" in head  # our keys stay in the group (the checkpoint keeps them) ...
    assert not any(k in trainer.optimizers[0].defaults for k in ("lr_scale", "fixed_lr"))  # ... not the defaults
