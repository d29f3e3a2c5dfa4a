"""LARS against a hand-written reference; weight-decay groups; schedules; lr scaling."""

import math

import pytest
import torch
from conftest import TinyConvNet
from torch import nn

from lightning_ssl import BYOL, MoCo, MoCoV2, SimCLR
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


def _decayed_and_excluded(model) -> tuple[set[int], set[int]]:
    decayed, excluded = set(), set()
    for group in model.parameter_groups(1e-4):
        target = decayed if group["weight_decay"] > 0 else excluded
        target.update(id(p) for p in group["params"])
    return decayed, excluded


def test_moco_decays_every_parameter_simclr_and_byol_exclude_biases_and_norms():
    """MoCo's reference (main_moco.py) decays all parameters; the LARS methods exclude biases and norms."""

    for cls in (MoCo, MoCoV2):
        model = cls(TinyConvNet(), projection_dim=8, queue_size=64)
        decayed, excluded = _decayed_and_excluded(model)
        assert decayed == {id(p) for p in model.parameters() if p.requires_grad} and not excluded
    for cls in (SimCLR, BYOL):
        model = cls(TinyConvNet(), projection_hidden_dim=16, projection_dim=8)
        decayed, excluded = _decayed_and_excluded(model)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        assert norms
        for module in norms:
            assert all(id(p) in excluded for p in module.parameters(recurse=False) if p.requires_grad)
        biases = [p for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad]
        assert biases and all(id(p) in excluded and id(p) not in decayed for p in biases)
        assert all(id(p) in decayed for p in model.parameters() if p.ndim > 1 and p.requires_grad)


def test_lars_eta_and_lr_clipping_match_a_hand_computation():
    """solo-learn's CIFAR BYOL LARS: eta 0.02 and clip_lr (a layer's lr is min(trust ratio, lr))."""
    w = torch.tensor([[3.0, 4.0]], requires_grad=True)  # ||w|| = 5
    v = torch.tensor([[0.6, 0.8]], requires_grad=True)  # ||v|| = 1
    opt = LARS(
        [{"params": [w, v], "weight_decay": 0.0, "lars_exclude": False}], lr=0.5, momentum=0.9, eta=0.02, clip_lr=True
    )
    w.grad = torch.tensor([[0.0, 0.1]])  # ||g|| = 0.1: trust 0.02 * 5 / 0.1 = 1.0 > lr: clipped to lr 0.5
    v.grad = torch.tensor([[1.0, 0.0]])  # ||g|| = 1: trust 0.02 * 1 / 1 = 0.02 < lr: kept
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 0.5 * 0.1]]))  # plain SGD step
    torch.testing.assert_close(v.detach(), torch.tensor([[0.6 - 0.02 * 1.0, 0.8]]))
    # second step: momentum on the clipped/scaled gradients
    w.grad = torch.tensor([[0.0, 0.1]])
    v.grad = torch.tensor([[1.0, 0.0]])
    w_norm, v_norm = w.detach().norm(), v.detach().norm()
    w_rate = min(0.02 * w_norm / 0.1, 0.5) / 0.5
    v_rate = min(0.02 * v_norm / 1.0, 0.5) / 0.5
    w_expected = w.detach() - 0.5 * (0.9 * torch.tensor([[0.0, 0.1]]) + w_rate * torch.tensor([[0.0, 0.1]]))
    v_expected = v.detach() - 0.5 * (0.9 * torch.tensor([[0.04, 0.0]]) + v_rate * torch.tensor([[1.0, 0.0]]))
    opt.step()
    torch.testing.assert_close(w.detach(), w_expected)
    torch.testing.assert_close(v.detach(), v_expected)
    # without clipping the step is lr x trust ratio: 0.5 x 0.02 for the second layer (clipped: 0.02)
    u = torch.tensor([[0.6, 0.8]], requires_grad=True)
    u.grad = torch.tensor([[1.0, 0.0]])
    LARS([u], lr=0.5, momentum=0.9, eta=0.02).step()
    torch.testing.assert_close(u.detach(), torch.tensor([[0.6 - 0.5 * 0.02, 0.8]]))


def test_square_root_scaling_rule():
    """SimCLR appendix B.1: lr = 0.075 x sqrt(B)."""
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_lr(0.075, 256, "sqrt") == pytest.approx(1.2)
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    with pytest.raises(ValueError, match="lr scaling"):
        scaled_lr(0.1, 256, "log")


def test_method_lars_and_scaling_arguments_reach_the_optimizer(tmp_path):
    from helpers import RandomTwoViews, quiet_trainer

    model = SimCLR(
        TinyConvNet(),
        base_lr=0.075,
        lr_scaling="sqrt",
        lars_eta=0.02,
        lars_clip=True,
        warmup_epochs=0,
        schedule="constant",
    )
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(model, RandomTwoViews(num_samples=16, batch_size=16))
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(0.075 * 4.0)
    assert group["eta"] == 0.02 and group["clip_lr"] is True
    with pytest.raises(ValueError, match="lr_scaling"):
        SimCLR(TinyConvNet(), lr_scaling="quadratic")


def test_cosine_ends_at_the_final_lr(tmp_path):
    """SwAV's 800-epoch script: base 4.8 to final 0.0048 (final_lr = base_lr / 1000), after 10 warmup epochs."""
    assert lr_lambda(100, 100, 10, final=0.001) == pytest.approx(0.001)
    assert lr_lambda(10, 100, 10, final=0.001) == pytest.approx(1.0)
    assert lr_lambda(55, 100, 10, final=0.25) == pytest.approx(0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    from helpers import RandomTwoViews, quiet_trainer

    model = SimCLR(TinyConvNet(), optimizer="sgd", base_lr=0.3, final_lr=0.0003, warmup_epochs=1)
    trainer = quiet_trainer(max_steps=6, default_root_dir=tmp_path)
    trainer.fit(model, RandomTwoViews(16, 8, image_size=16))  # 2 steps per epoch, 1 warmup epoch
    peak = 0.3 * 8 / 256
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 6  # after the last (6th) optimizer step: the schedule's end
    for group in trainer.optimizers[0].param_groups:
        assert group["lr"] == pytest.approx(peak / 1000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_lr": -1.0}, r"base_lr must be positive, got -1.0 \(the lr for a global batch of 256\)"),
        ({"lr": 0.0}, "lr must be positive, got 0.0"),
        ({"weight_decay": -1e-4}, "weight_decay and warmup_epochs must be >= 0"),
        ({"base_lr": 0.3, "final_lr": 0.5}, r"final_lr must lie in \[0, base_lr=0.3\], got 0.5"),
    ],
)
def test_bad_optimizer_arguments_fail_at_construction_in_the_users_terms(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimCLR(TinyConvNet(), **kwargs)
