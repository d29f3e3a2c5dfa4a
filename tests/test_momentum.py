"""EMA of target networks: exact update, cosine schedule, one update per optimizer step."""

import math

import pytest
import torch
from helpers import RandomTwoViews, quiet_trainer
from torch import nn

from lightning_ssl import BYOL
from lightning_ssl.callbacks import EMAUpdate
from lightning_ssl.ema import cosine_tau, ema_copy, ema_update_


def test_ema_update_is_exact_for_every_parameter():
    online = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    target = ema_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target.parameters()]
    ema_update_([(online, target)], tau=0.9)
    for t_old, t_new, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * o, rtol=1e-6, atol=1e-7)
    assert all(not p.requires_grad for p in target.parameters())


def test_ema_rejects_different_architectures():
    with pytest.raises(ValueError, match="different architectures"):
        ema_update_([(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))], 0.5)


def test_cosine_tau_schedule():
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_tau(50, 100, 0.996) == pytest.approx(0.998)
    for k in (10, 37, 81):
        assert cosine_tau(k, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / 100) + 1) / 2)
    assert cosine_tau(7, 100, 0.999, 0.999) == pytest.approx(0.999)  # MoCo: constant


class CountingMomentum(EMAUpdate):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.taus = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = [p.clone() for p in pl_module.backbone_ema.parameters()]
        online = [p.clone() for p in pl_module.backbone.parameters()]
        last = self._last_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        after = list(pl_module.backbone_ema.parameters())
        if self._last_step == last:  # accumulation micro-batch: target untouched
            assert all(torch.equal(a, b) for a, b in zip(after, before))
            return
        tau = self.tau_at(trainer.global_step, int(trainer.estimated_stepping_batches))
        self.taus.append((trainer.global_step, tau))
        for a, b, o in zip(after, before, online):
            torch.testing.assert_close(a, tau * b + (1 - tau) * o, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_momentum_callback_updates_once_per_optimizer_step(tiny_backbone, accumulate):
    model = BYOL(
        tiny_backbone,
        projection_hidden_dim=32,
        projection_dim=16,
        ema_tau=0.9,
        optimizer="sgd",
        lr=0.1,
        warmup_epochs=0,
    )
    cb = CountingMomentum(0.9, 1.0)
    model.configure_callbacks = lambda: [cb]
    trainer = quiet_trainer(
        max_epochs=1,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(model, RandomTwoViews(num_samples=48, batch_size=8))
    steps = 6 // accumulate
    assert trainer.global_step == steps
    assert [s for s, _ in cb.taus] == list(range(1, steps + 1))
    assert [t for _, t in cb.taus] == pytest.approx([cosine_tau(s, steps, 0.9) for s in range(1, steps + 1)])
