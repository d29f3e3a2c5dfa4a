"""SimSiam, Barlow Twins, VICReg and NNCLR losses against naive float64 loops over the papers' sums."""

import math

import pytest
import torch

from lightning_ssl.losses import barlow_twins_loss, nnclr_loss, simsiam_loss, vicreg_loss
from lightning_ssl.queue import nearest_neighbours

SHAPES = [(2, 3), (5, 8), (16, 32), (9, 4)]


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _cos(a, b) -> float:
    return _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b))


def naive_simsiam(p1, p2, z1, z2) -> float:
    p1, p2, z1, z2 = map(_rows, (p1, p2, z1, z2))
    n = len(p1)
    d12 = -sum(_cos(p1[i], z2[i]) for i in range(n)) / n
    d21 = -sum(_cos(p2[i], z1[i]) for i in range(n)) / n
    return 0.5 * d12 + 0.5 * d21


def naive_barlow(z1, z2, lambd, scale=1.0, eps=1e-5) -> float:
    a, b = _rows(z1), _rows(z2)
    n, d = len(a), len(a[0])

    def standardized(z):
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            mean = sum(z[i][j] for i in range(n)) / n
            var = sum((z[i][j] - mean) ** 2 for i in range(n)) / n
            for i in range(n):
                out[i][j] = (z[i][j] - mean) / math.sqrt(var + eps)
        return out

    a, b = standardized(a), standardized(b)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n  # eq. 2
            loss += (1 - c) ** 2 if i == j else lambd * c**2  # eq. 1
    return scale * loss


def naive_vicreg(z1, z2, inv_w=25.0, var_w=25.0, cov_w=1.0, gamma=1.0, eps=1e-4) -> float:
    a, b = _rows(z1), _rows(z2)
    n, d = len(a), len(a[0])
    invariance = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def v_and_c(z):
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        v = 0.0
        for j in range(d):
            var = sum((z[i][j] - means[j]) ** 2 for i in range(n)) / (n - 1)
            v += max(0.0, gamma - math.sqrt(var + eps))
        c = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    cov = sum((z[i][j] - means[j]) * (z[i][k] - means[k]) for i in range(n)) / (n - 1)
                    c += cov**2
        return v / d, c / d

    v1, c1 = v_and_c(a)
    v2, c2 = v_and_c(b)
    return inv_w * invariance + var_w * (v1 + v2) / 2 + cov_w * (c1 + c2)


def naive_nnclr(nn, p, t) -> float:
    nn, p = _rows(nn), _rows(p)
    n = len(nn)
    total = 0.0
    for i in range(n):
        logits = [_cos(nn[i], p[k]) / t for k in range(n)]
        total += -logits[i] + math.log(sum(math.exp(v) for v in logits))  # eq. 2
    return total / n


@pytest.mark.parametrize("n,d", SHAPES)
def test_simsiam_loss_matches_naive_loop(n, d):
    p1, p2, z1, z2 = (torch.randn(n, d) for _ in range(4))
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(naive_simsiam(p1, p2, z1, z2), rel=1e-5, abs=1e-6)


def test_simsiam_loss_is_minus_one_for_aligned_predictions_and_stops_gradients_to_z():
    z1, z2 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    p1, p2 = (3 * z2).detach().requires_grad_(), (0.5 * z1).detach().requires_grad_()
    loss = simsiam_loss(p1, p2, z1, z2)
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    loss = simsiam_loss(torch.randn(6, 8, requires_grad=True), torch.randn(6, 8), z1, z2)
    loss.backward()
    assert z1.grad is None and z2.grad is None


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("lambd,scale", [(5e-3, 1.0), (0.0051, 0.024), (1.0, 0.1)])
def test_barlow_twins_loss_matches_naive_loop(n, d, lambd, scale):
    z1, z2 = torch.randn(n, d) * 3 + 1, torch.randn(n, d)
    expected = naive_barlow(z1, z2, lambd, scale)
    assert barlow_twins_loss(z1, z2, lambd, scale).item() == pytest.approx(expected, rel=1e-4)
    assert barlow_twins_loss(z1.double(), z2.double(), lambd, scale).item() == pytest.approx(expected, rel=1e-10)


def test_barlow_twins_loss_is_zero_for_identical_decorrelated_views():
    # Orthonormal columns spanning centered data: mean 0, variance 1 and C = identity.
    x = torch.randn(64, 8, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    z = q * math.sqrt(64)
    assert barlow_twins_loss(z, z, eps=0.0).item() == pytest.approx(0.0, abs=1e-16)
    assert barlow_twins_loss(z, z[torch.randperm(64)], eps=0.0).item() > 0.1


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 0.5, 2.0)])
def test_vicreg_loss_matches_naive_loop(n, d, weights):
    z1, z2 = torch.randn(n, d) * 0.5, torch.randn(n, d) * 2  # stds on both sides of the target 1
    expected = naive_vicreg(z1, z2, *weights)
    assert vicreg_loss(z1, z2, *weights).item() == pytest.approx(expected, rel=1e-4)
    assert vicreg_loss(z1.double(), z2.double(), *weights).item() == pytest.approx(expected, rel=1e-10)


def test_vicreg_variance_term_vanishes_above_the_target_std():
    z = torch.randn(256, 4, dtype=torch.float64) * 10  # std ~10 > 1, nearly decorrelated
    only_variance = vicreg_loss(z, z, invariance=0.0, variance=1.0, covariance=0.0)
    assert only_variance.item() == 0.0
    collapsed = torch.zeros(8, 4, dtype=torch.float64)
    assert vicreg_loss(collapsed, collapsed).item() == pytest.approx(25 * (1 - math.sqrt(1e-4)), rel=1e-9)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nnclr_loss_matches_naive_loop(n, d, t):
    nn, p = torch.randn(n, d), torch.randn(n, d)
    assert nnclr_loss(nn, p, t).item() == pytest.approx(naive_nnclr(nn, p, t), rel=1e-5)


def test_nnclr_loss_gives_no_gradient_to_the_neighbours():
    nn, p = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    nnclr_loss(nn, p, 0.1).backward()
    assert nn.grad is None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("n,k,d", [(1, 1, 3), (5, 20, 8), (16, 64, 32)])
def test_nearest_neighbours_match_naive_search(n, k, d):
    queries, queue = torch.randn(n, d), torch.nn.functional.normalize(torch.randn(k, d), dim=1)
    found = nearest_neighbours(queries, queue)
    for i, q in enumerate(_rows(queries)):
        best = max(range(k), key=lambda j: _cos(q, queue[j].tolist()))
        torch.testing.assert_close(found[i], queue[best], rtol=0, atol=0)
    assert not found.requires_grad


@pytest.mark.parametrize("loss", [barlow_twins_loss, vicreg_loss, nnclr_loss])
def test_losses_reject_mismatched_shapes(loss):
    with pytest.raises(ValueError, match="N x D"):
        loss(torch.randn(4, 8), torch.randn(5, 8))
