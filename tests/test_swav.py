"""SwAV (Caron et al. 2020): Sinkhorn-Knopp and the swapped-prediction loss against naive float64 loops,
the codes' row and column sums, prototypes frozen and normalized, the queue. (Sinkhorn over two gloo
processes equal to one process: tests/test_distributed.py, with the helpers here.)"""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import TinyConvNet
from helpers import RandomTwoViews, quiet_trainer

from lightning_ssl import SwAV
from lightning_ssl.losses import sinkhorn_knopp, swav_loss


def naive_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Algorithm 1 of the paper's code, element by element in float64."""
    b, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / epsilon) for i in range(b)] for j in range(k)]  # K x B
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            r = sum(q[j])
            q[j] = [v / r / k for v in q[j]]
        for i in range(b):
            c = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / c / b
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


def naive_swav_loss(scores, codes, temperature):
    total = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        for v, s in enumerate(scores):
            if v == i:
                continue
            for n in range(s.shape[0]):
                logits = [float(x) / temperature for x in s[n]]
                m = max(logits)
                log_z = m + math.log(sum(math.exp(x - m) for x in logits))
                sub -= sum(float(q[n, k]) * (logits[k] - log_z) for k in range(len(logits))) / s.shape[0]
        total += sub / (len(scores) - 1)
    return total / len(codes)


@pytest.mark.parametrize("b,k,iterations", [(4, 3, 3), (6, 10, 3), (5, 7, 1), (3, 2, 5)])
def test_sinkhorn_matches_the_naive_loop(b, k, iterations):
    scores = torch.randn(b, k, generator=torch.Generator().manual_seed(b * k), dtype=torch.float64).tanh()
    torch.testing.assert_close(sinkhorn_knopp(scores, 0.05, iterations), naive_sinkhorn(scores, 0.05, iterations))


def test_sinkhorn_row_and_column_sums():
    scores = torch.nn.functional.normalize(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    q = sinkhorn_knopp(scores.double(), epsilon=0.5, iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(12, dtype=torch.float64))  # each sample: 1, exactly
    q = sinkhorn_knopp(scores.double(), epsilon=0.5, iterations=200)  # converged: each prototype B / K
    torch.testing.assert_close(q.sum(0), torch.full((4,), 3.0, dtype=torch.float64))
    assert (q >= 0).all()
    # cosine scores at epsilon 0.05: float32 agrees with float64
    torch.testing.assert_close(sinkhorn_knopp(scores), sinkhorn_knopp(scores.double()).float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("views,coded,b,k", [(2, 2, 4, 5), (5, 2, 3, 6), (3, 1, 2, 4)])
def test_swav_loss_matches_the_naive_loop(views, coded, b, k):
    g = torch.Generator().manual_seed(views * b)
    scores = [torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(views)]
    codes = [torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64), 1) for _ in range(coded)]
    loss = swav_loss(scores, codes, 0.1)
    assert loss.item() == pytest.approx(naive_swav_loss(scores, codes, 0.1), rel=1e-10)


def sinkhorn_scores() -> torch.Tensor:
    """The global batch of the two-process check (tests/test_distributed.py)."""
    return torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def sinkhorn_on_half(rank: int) -> torch.Tensor:
    """Run in each of two processes: the codes of this process's half of ``sinkhorn_scores()``."""
    return sinkhorn_knopp(sinkhorn_scores()[rank * 4 : (rank + 1) * 4], 0.05, 3)


def _model(**kwargs) -> SwAV:
    torch.manual_seed(0)
    args = dict(projection_hidden_dim=32, projection_dim=8, num_prototypes=6, warmup_epochs=0, base_lr=0.1)
    return SwAV(TinyConvNet(), **{**args, **kwargs})


def test_prototypes_are_normalized_and_frozen_for_the_first_steps(tmp_path):
    model = _model(freeze_prototypes_steps=2, optimizer="sgd", lr=1.0)
    before = model.prototypes.weight.detach().clone()
    quiet_trainer(max_steps=2, default_root_dir=tmp_path).fit(model, RandomTwoViews(16, 8, image_size=16))
    torch.testing.assert_close(model.prototypes.weight, torch.nn.functional.normalize(before, dim=1))
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path)
    model = _model(freeze_prototypes_steps=2, optimizer="sgd", lr=1.0)
    trainer.fit(model, RandomTwoViews(24, 8, image_size=16))  # the third step updates them
    assert not torch.allclose(model.prototypes.weight, torch.nn.functional.normalize(before, dim=1))


def test_multi_crop_codes_from_the_global_views_only():
    model = _model().eval()
    model.log = lambda *a, **k: None
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)
    ]
    loss = model.training_step((views, None), 0)
    with torch.no_grad():
        z = [torch.nn.functional.normalize(model.projector(model.backbone(v)), dim=1) for v in views]
        scores = [model.prototypes(x) for x in z]
        codes = [sinkhorn_knopp(s, 0.05, 3) for s in scores[:2]]
    torch.testing.assert_close(loss, swav_loss(scores, codes, 0.1))


def test_queue_fills_from_its_start_epoch_and_joins_the_codes_once_full(tmp_path, monkeypatch):
    import lightning_ssl.methods.swav as swav_module

    rows = []
    real = swav_module.sinkhorn_knopp
    monkeypatch.setattr(swav_module, "sinkhorn_knopp", lambda s, *a: rows.append(s.shape[0]) or real(s, *a))
    model = _model(queue_length=8, queue_start_epoch=1)
    quiet_trainer(max_epochs=1, default_root_dir=tmp_path).fit(model, RandomTwoViews(16, 4, image_size=16))
    assert model.queue.shape == (2, 8, 8) and not model.queue.any()  # epoch 0: not filled
    assert rows == [4] * 8
    rows.clear()
    model = _model(queue_length=8, queue_start_epoch=0)
    assert model._queue_state(0, 4) == (False, False)  # outside a trainer
    quiet_trainer(max_epochs=1, default_root_dir=tmp_path).fit(model, RandomTwoViews(16, 4, image_size=16))
    assert torch.allclose(model.queue.norm(dim=2), torch.ones(2, 8))  # filled with unit projections
    assert rows == [4] * 4 + [12] * 4  # 4 batches of 4 per view: full (8) after two


class _PrototypeTrace(pl.Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.prototypes.weight.detach().clone())


def test_prototypes_are_frozen_for_the_first_epoch_by_default(tmp_path):
    """The paper's "first epoch" (default ``freeze_prototypes_epochs=1``), whatever the epoch's length:
    3 steps per epoch here, so steps 0-2 leave them (normalized) as they were and step 3 moves them."""
    trace = _PrototypeTrace()
    model = _model(optimizer="sgd", lr=1.0)
    assert model.freeze_prototypes_epochs == 1.0 and model.freeze_prototypes_steps is None
    trainer = quiet_trainer(max_steps=5, default_root_dir=tmp_path, callbacks=[trace])
    trainer.fit(model, RandomTwoViews(24, 8, image_size=16))
    assert model.frozen_prototype_steps() == 3
    # the step-k weights are normalized at the start of step k + 1: compare directions
    directions = [torch.nn.functional.normalize(w, dim=1) for w in trace.weights]
    assert all(torch.allclose(directions[0], d) for d in directions[1:3])
    assert not torch.allclose(directions[2], directions[3])
    half = _model(freeze_prototypes_epochs=0.5, optimizer="sgd", lr=1.0)
    quiet_trainer(max_steps=1, default_root_dir=tmp_path).fit(half, RandomTwoViews(24, 8, image_size=16))
    assert half.frozen_prototype_steps() == 2  # ceil(0.5 x 3)
    with pytest.raises(ValueError, match="freeze_prototypes_epochs"):
        _model(freeze_prototypes_epochs=-1)


@pytest.mark.parametrize("mode, calls", [("concat", [20]), ("per_view", [4] * 5)])
def test_multi_crop_projector_with_batch_norm_runs_once_on_all_crops(mode, calls):
    """SwAV's reference (``forward_head`` in ``resnet50.py``): the backbone once per resolution, the head
    (whose batch norm then normalizes over every crop) once on all of them; per view for ``per_view``."""
    model = _model(view_batching=mode)
    model.log = lambda *a, **k: None
    reference = copy.deepcopy(model)
    seen = []
    model.projector.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(3)]
    loss = model.training_step((views, None), 0)
    assert seen == calls
    with torch.no_grad():  # the naive form: features of every crop, then one head pass over all of them
        groups = [views[:2], views[2:]] if mode == "concat" else [[v] for v in views]
        features = [reference.backbone(torch.cat(group)) for group in groups]
        heads = [torch.cat(features)] if mode == "concat" else features
        z = torch.cat([reference.projector(f) for f in heads]).split(4)
        scores = [model.prototypes(F.normalize(x, dim=1)) for x in z]  # normalized by the step
        codes = [sinkhorn_knopp(s, 0.05, 3) for s in scores[:2]]
    torch.testing.assert_close(loss, swav_loss(scores, codes, 0.1))
