"""GlobalBatchNorm in 2 gloo processes equals BatchNorm in one process on the global batch: outputs,
DDP-averaged gradients and running statistics; conversion keeps the state-dict keys and reverts."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from torch import nn

from lightning_ssl.global_batch_norm import GlobalBatchNorm, convert_global_batch_norm, revert_global_batch_norm

pytestmark = pytest.mark.distributed

N = 6  # per-process batch


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 8),
        nn.BatchNorm1d(8, momentum=None),  # the cumulative average of the running statistics
        nn.ReLU(),
        nn.Linear(8, 3),
        nn.BatchNorm1d(3, affine=False),
    )
    with torch.no_grad():  # non-trivial affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.double()


def _batch(world: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(world * N, 3, 5, 5, generator=gen, dtype=torch.float64) * 3 + 1


def _loss(out: torch.Tensor) -> torch.Tensor:
    # per-sample weights: the loss is not symmetric in the samples
    weights = torch.linspace(0.5, 2.0, out.shape[0], dtype=out.dtype)
    return ((out**2).sum(1) * weights).mean()


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    model = convert_global_batch_norm(_model()).train()
    x = _batch(world)[rank * N : (rank + 1) * N]
    weights = torch.linspace(0.5, 2.0, world * N, dtype=x.dtype)[rank * N : (rank + 1) * N]
    for _ in range(2):  # two steps: running statistics after two updates
        model.zero_grad()
        out = model(x)
        ((out**2).sum(1) * weights).mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[name] = g / world  # DDP's average
    return {"out": out.detach(), "grads": grads, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def test_two_processes_equal_one_process_on_the_global_batch():
    ranks = run_distributed(_worker, 2)
    model = _model().train()
    x = _batch(2)
    for _ in range(2):
        model.zero_grad()
        out = model(x)
        _loss(out).backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-9, atol=1e-10, msg=name)
    for key, value in model.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r["state"][key], value, rtol=1e-10, atol=1e-10, msg=key)


def test_one_process_and_eval_mode_are_plain_batch_norm():
    plain, converted = _model(), convert_global_batch_norm(_model())
    x = _batch(1)
    torch.testing.assert_close(converted.train()(x), plain.train()(x))
    torch.testing.assert_close(converted.eval()(x), plain.eval()(x))


def test_conversion_keeps_keys_and_parameters_and_reverts():
    model = _model()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    converted = convert_global_batch_norm(model)
    assert sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == 3
    assert list(converted.state_dict()) == keys
    assert all(p is params[name] for name, p in converted.named_parameters())  # the optimizer's tensors
    reverted = revert_global_batch_norm(converted)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in _model().modules()]
    assert list(reverted.state_dict()) == keys


def _single_value_worker(rank: int, world: int):
    bn = convert_global_batch_norm(nn.BatchNorm1d(2)).train()
    try:
        bn(torch.randn(1, 2) if rank == 0 else torch.randn(0, 2))
    except ValueError as err:
        return str(err)
    return None


def test_one_value_per_channel_over_all_processes_is_an_error():
    messages = run_distributed(_single_value_worker, 2)
    assert all(m is not None and "more than one value per channel" in m for m in messages)
