"""Losses against naive per-sample reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_ssl.losses import byol_loss, moco_info_nce, nt_xent


def naive_nt_xent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(2 * n) if j != i)
        total += -math.log(num / den)
    return total / (2 * n)


@pytest.mark.parametrize("n,d", [(2, 3), (5, 8), (16, 32)])
@pytest.mark.parametrize("t", [0.07, 0.1, 0.5, 1.0])
def test_nt_xent_matches_naive_loop(n, d, t):
    z1, z2 = torch.randn(n, d), torch.randn(n, d)
    assert nt_xent(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_has_gradients():
    z1 = torch.randn(8, 16, requires_grad=True)
    aligned = nt_xent(z1, z1.detach() * 2.0, 0.1)
    shuffled = nt_xent(z1, z1.detach()[torch.randperm(8)], 0.1)
    assert aligned < shuffled
    aligned.backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_nt_xent_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="N x D"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8))


@pytest.mark.parametrize("t", [0.07, 0.2])
def test_moco_info_nce_matches_naive_loop(t):
    n, d, k = 6, 8, 20
    q, key = torch.randn(n, d), torch.randn(n, d)
    queue = F.normalize(torch.randn(k, d), dim=1)
    qn, kn = F.normalize(q, dim=1).double(), F.normalize(key, dim=1).double()
    expected = 0.0
    for i in range(n):
        logits = [float(qn[i] @ kn[i]) / t] + [float(qn[i] @ queue[j].double()) / t for j in range(k)]
        expected += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    expected /= n
    assert moco_info_nce(q, key, queue, t).item() == pytest.approx(expected, rel=1e-5)


def test_moco_loss_gives_no_gradient_to_keys_or_queue():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    queue = torch.randn(10, 8, requires_grad=True)
    moco_info_nce(q, k, queue).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def test_byol_loss_is_two_minus_two_cosine():
    p, z = torch.randn(7, 5), torch.randn(7, 5)
    by_hand = torch.stack([2 - 2 * (p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(7)]).mean()
    assert byol_loss(p, z).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)
