"""Batch statistics over processes (gloo, 2 real processes on CPU) equal one process holding the global batch:
Barlow Twins' cross-correlation, VICReg's variance and covariance, NNCLR's support-set lookup and update.

Gradients: every process's loss is computed from the same global statistics, and the collectives' backward
passes sum over processes, so each process's gradient with respect to its own rows is ``WORLD`` times the
one-process gradient of those rows (DDP's averaging over processes then gives the one-process gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

from lightning_ssl.distributed import all_reduce_with_grad, gather_no_grad
from lightning_ssl.losses import barlow_twins_loss, nnclr_loss, vicreg_loss
from lightning_ssl.queue import enqueue_, nearest_neighbours

pytestmark = pytest.mark.distributed

WORLD = 2
B, D, K = 6, 5, 24  # per-process batch, embedding width, support-set size


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(WORLD * B, D, generator=gen, dtype=torch.float64) * 2 + 1
    z2 = torch.randn(WORLD * B, D, generator=gen, dtype=torch.float64) * 0.5
    queue = F.normalize(torch.randn(K, D, generator=gen, dtype=torch.float64), dim=1)
    return {"z1": z1, "z2": z2, "queue": queue}


def _losses(z1, z2, queue) -> dict[str, torch.Tensor]:
    return {
        "barlow": barlow_twins_loss(z1, z2, lambd=0.3),
        "vicreg": vicreg_loss(z1, z2),
        "var_cov": vicreg_loss(z1, z2, invariance=0.0),
        "nnclr": nnclr_loss(nearest_neighbours(z1, queue), z2, 0.1),
    }


def _value_and_grads(z1, z2, queue) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name in _losses(z1, z2, queue):
        a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
        loss = _losses(a, b, queue)[name]
        loss.backward()
        out[name] = {"loss": loss.detach(), "g1": a.grad, "g2": b.grad}
    return out


def _worker(rank: int, world: int) -> dict:
    data = _data()
    rows = slice(rank * B, (rank + 1) * B)
    z1, z2, queue = data["z1"][rows], data["z2"][rows], data["queue"].clone()
    out = {"losses": _value_and_grads(z1, z2, queue)}
    x = (torch.arange(3.0, dtype=torch.float64) + 10 * rank).requires_grad_()
    summed = all_reduce_with_grad(x)
    (summed * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    out["sum"], out["sum_grad"] = summed.detach(), x.grad
    out["neighbours"] = nearest_neighbours(z1, queue)
    ptr = torch.zeros(1, dtype=torch.long)
    enqueue_(queue, ptr, gather_no_grad(F.normalize(z1, dim=1)))  # what QueueUpdate does
    out["queue"], out["ptr"] = queue, ptr
    out["local_barlow"] = barlow_twins_loss(z1, z2, lambd=0.3, gather=False)
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_worker, WORLD)


@pytest.fixture(scope="module")
def single() -> dict:
    data = _data()
    return _value_and_grads(data["z1"], data["z2"], data["queue"])


def test_all_reduce_with_grad_sums_values_and_gradients(ranks):
    for r in ranks:
        torch.testing.assert_close(r["sum"], torch.tensor([10.0, 12.0, 14.0], dtype=torch.float64))
        torch.testing.assert_close(r["sum_grad"], torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64))


@pytest.mark.parametrize("name", ["barlow", "var_cov"])
def test_global_statistics_give_every_process_the_one_process_loss(ranks, single, name):
    """Barlow Twins' cross-correlation and VICReg's variance and covariance over the global batch: each
    process's loss is the one-process loss of the global batch."""
    for r in ranks:
        torch.testing.assert_close(r["losses"][name]["loss"], single[name]["loss"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["barlow", "vicreg", "var_cov", "nnclr"])
def test_mean_loss_and_gradients_over_processes_equal_one_process(ranks, single, name):
    mean = sum(r["losses"][name]["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean, single[name]["loss"], rtol=1e-12, atol=0)
    for rank, r in enumerate(ranks):
        rows = slice(rank * B, (rank + 1) * B)
        for g in ("g1", "g2"):
            expected = single[name][g][rows] if name != "nnclr" or g == "g2" else None
            if expected is None:  # NNCLR: the neighbours are constants, z1 gets no gradient
                assert r["losses"][name][g] is None and single[name][g] is None
                continue
            torch.testing.assert_close(r["losses"][name][g] / WORLD, expected, rtol=1e-10, atol=1e-14)


def test_local_statistics_would_differ(ranks, single):
    """Guards the tests above: Barlow Twins on one process's half of the batch gives another loss."""
    assert not torch.allclose(ranks[0]["local_barlow"], single["barlow"]["loss"], rtol=1e-3)


def test_nnclr_support_set_lookup_and_update_equal_one_process(ranks):
    data = _data()
    neighbours = nearest_neighbours(data["z1"], data["queue"])
    queue, ptr = data["queue"].clone(), torch.zeros(1, dtype=torch.long)
    enqueue_(queue, ptr, F.normalize(data["z1"], dim=1))
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["neighbours"], neighbours[rank * B : (rank + 1) * B], rtol=0, atol=0)
        torch.testing.assert_close(r["queue"], queue, rtol=0, atol=0)
        assert int(r["ptr"]) == int(ptr) == WORLD * B
