"""Fast-path options change nothing numerically where they should not; the training step makes no
host synchronisation; float32 losses under autocast; the speed benchmarks run and measure the same
computation in the bare loop and the Trainer."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from conftest import TinyConvNet
from helpers import RandomTwoViews
from lightning_ssl import BYOL, MoCoV2, SimCLR
from lightning_ssl.losses import byol_loss, moco_info_nce, nt_xent
from lightning_ssl.optim import LARS, build_optimizer, split_weight_decay

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import train_throughput as tp  # noqa: E402

METHODS = [SimCLR, MoCoV2, BYOL]


def make(method, **kw):
    torch.manual_seed(0)
    common = dict(backbone=TinyConvNet(), small_image=False, warmup_epochs=0)
    if method is SimCLR:
        return SimCLR(**common, projection_dim=16, **kw)
    if method is MoCoV2:
        return MoCoV2(**common, projection_dim=16, projection_hidden_dim=32, queue_size=32, **kw)
    return BYOL(**common, projection_hidden_dim=32, projection_dim=16, **kw)


def step_loss(model, views):
    model.log = lambda *a, **k: None  # outside a Trainer
    out = model.training_step((views, None), 0)
    return out["loss"] if isinstance(out, dict) else out


def batch(n=8, size=16):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, size, size, generator=gen) for _ in range(2)]


def quiet_trainer(tmp_path, **kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kw})


# ------------------------------------------------------------------------------ channels_last
@pytest.mark.parametrize("method", METHODS)
def test_channels_last_gives_the_same_loss_and_gradients(method):
    plain, fast = make(method), make(method, channels_last=True)
    fast.setup("fit")
    conv = fast.backbone.module.net[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    views = batch()
    a, b = step_loss(plain, views), step_loss(fast, views)
    assert torch.allclose(a, b, atol=1e-5), (a.item(), b.item())
    a.backward()
    b.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_fast_path_arguments_are_hyperparameters():
    model = make(SimCLR, channels_last=True, fused_optimizer=True)
    assert model.hparams.channels_last and model.hparams.fused_optimizer and not model.hparams.compile_backbone
    assert model.optim_config["fused"]


# ------------------------------------------------------------------------------ optimizers
def _run_optimizer(name, fused, steps=3):
    torch.manual_seed(0)
    # no bias before BN: its gradient is rounding noise, which Adam would amplify to +-lr either way
    net = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    opt = build_optimizer(name, split_weight_decay([net], 1e-4), lr=0.1, momentum=0.9, fused=fused)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(8, 6, generator=gen)).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_fused_optimizer_step_equals_foreach_step(name):
    for a, b in zip(_run_optimizer(name, False), _run_optimizer(name, True)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_lars_step_has_no_per_parameter_python_loop_over_norms():
    """The trust ratio of every layer comes from one stacked computation (no host work per layer)."""
    w = torch.nn.Parameter(torch.zeros(3, 2))  # zero norm: the ratio falls back to 1
    v = torch.nn.Parameter(torch.ones(2, 2))
    w.grad, v.grad = torch.ones(3, 2), torch.full((2, 2), 2.0)
    opt = LARS([{"params": [w, v], "weight_decay": 0.0, "lars_exclude": False}], lr=1.0, momentum=0.0, eta=0.5)
    opt.step()
    assert torch.allclose(w, -torch.ones(3, 2))  # ratio 1
    assert torch.allclose(v, torch.full((2, 2), 1 - 0.5 * 2.0 / 4.0 * 2.0))  # eta |v| / |g| = 0.5 * 2 / 4


# ------------------------------------------------------------------------------ bf16 numerics
@pytest.mark.parametrize("loss", ["nt_xent", "moco", "byol"])
def test_losses_compute_in_float32_under_bf16_autocast(loss):
    gen = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(16, 32, generator=gen).bfloat16() for _ in range(2))
    queue = torch.nn.functional.normalize(torch.randn(64, 32, generator=gen), dim=1)
    fn = {
        "nt_xent": lambda a, b: nt_xent(a, b, 0.1, gather=False),
        "moco": lambda a, b: moco_info_nce(a, b, queue, 0.07),
        "byol": byol_loss,
    }[loss]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fn(z1, z2)
    exact = fn(z1.float(), z2.float())  # the same (bf16-valued) projections, in float32 without autocast
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, exact, atol=1e-6, rtol=1e-6), (mixed.item(), exact.item())


@pytest.mark.parametrize("method", METHODS)
def test_bf16_mixed_training_step_is_close_to_float32(tmp_path, method):
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        model = make(method)
        rec = []

        class Rec(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                rec.append(float(outputs["loss"]))

        quiet_trainer(tmp_path, max_steps=2, precision=precision, callbacks=[Rec()]).fit(
            model, RandomTwoViews(num_samples=16, batch_size=8, image_size=16))
        losses[precision] = torch.tensor(rec)
    assert torch.isfinite(losses["bf16-mixed"]).all()
    assert torch.allclose(losses["bf16-mixed"], losses["32-true"], rtol=0.03, atol=0.02), losses


# ------------------------------------------------------------------------------ host syncs
_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class SyncCounter(pl.Callback):
    """Counts Python-level host synchronisations of tensors between consecutive batch starts."""

    def __init__(self):
        self.per_step, self._count = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._count is not None:
            self.per_step.append(self._count)
        self._count = 0

    def patch(self, monkeypatch):
        for name in _SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *a, _original=original, **k):
                if self._count is not None:
                    self._count += 1
                return _original(tensor, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("method", METHODS)
def test_training_steps_make_no_host_sync(tmp_path, monkeypatch, method):
    """Between log steps (every ``log_every_n_steps``) a step calls no .item()/.tolist()/bool()/.cpu()
    on a tensor, in the method, its callbacks or Lightning, when the progress bar is off."""
    counter = SyncCounter()
    trainer = quiet_trainer(tmp_path, max_steps=4, log_every_n_steps=100, callbacks=[counter])
    loader = DataLoader(tp._Views(length=32, pool=8, image_size=16), batch_size=8)  # no tensor ops in loading
    counter.patch(monkeypatch)
    trainer.fit(make(method), train_dataloaders=loader)
    assert counter.per_step == [0, 0, 0], counter.per_step


def test_sync_counter_sees_the_progress_bar_sync(tmp_path, monkeypatch):
    """Control: a metric logged with prog_bar=True is converted with .item() at every batch end by
    Lightning's logger connector (whether or not a bar is shown): the counter sees that sync."""
    counter = SyncCounter()
    trainer = quiet_trainer(tmp_path, max_steps=4, log_every_n_steps=100, callbacks=[counter])
    loader = DataLoader(tp._Views(length=32, pool=8, image_size=16), batch_size=8)
    model = make(SimCLR)
    step = model.training_step

    def step_with_bar(batch, batch_idx):
        loss = step(batch, batch_idx)
        model.log("bar/loss", loss, prog_bar=True)
        return loss

    model.training_step = step_with_bar
    counter.patch(monkeypatch)
    trainer.fit(model, train_dataloaders=loader)
    assert counter.per_step == [1, 1, 1], counter.per_step


# ------------------------------------------------------------------------------ benchmarks
@pytest.mark.parametrize("method, fast", [(m, False) for m in METHODS] + [(BYOL, True)])
def test_bare_loop_does_exactly_what_the_trainer_does(tmp_path, method, fast):
    """Two steps of the benchmark's bare loop and of Trainer.fit leave identical weights, targets and
    queue (also with channels_last and fused optimizer steps in both)."""
    opts = dict(channels_last=True, fused_optimizer=True) if fast else {}
    bare, lit = make(method, **opts), make(method, **opts)
    data = RandomTwoViews(num_samples=16, batch_size=8, image_size=16)
    loader = DataLoader(data.dataset, batch_size=8, shuffle=False, drop_last=True)
    tp.bare_loop(bare, loader, "cpu", total=2, channels_last=fast)
    quiet_trainer(tmp_path, max_steps=2).fit(lit, train_dataloaders=loader)
    for (name, a), b in zip(bare.state_dict().items(), lit.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    changed = [k for k, v in make(method).state_dict().items() if not torch.equal(v, bare.state_dict()[k])]
    expected = {"projector_momentum", "backbone_target", "queue"} & {k.split(".")[0] for k in bare.state_dict()}
    assert expected <= {k.split(".")[0] for k in changed}  # targets and queue really were updated


def test_throughput_script_prints_its_table():
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--methods", "mocov2", "--batch-size", "4",
         "--image-size", "32", "--warmup", "1", "--steps", "1", "--threads", "1", "--channels-last", "--fused"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = [line.split() for line in out.stdout.splitlines() if line.startswith("mocov2")][0]
    bare, trainer, ratio = map(float, row[1:4])
    # the table prints images/s to 0.1 and the ratio to 0.001: allow for that rounding
    assert bare > 0 and trainer > 0 and abs(ratio - trainer / bare) <= 0.1 / bare + 1e-3


def test_gpu_epoch_smoke_runs_on_cpu():
    from benchmarks import gpu_epoch

    rows = gpu_epoch.main(["--smoke", "--methods", "simclr", "--limit", "32", "--batch-size", "16"])
    assert rows[0]["images_per_s"] > 0
    # a CIFAR-stem ResNet-18 forward is 0.56 GMAC: SimCLR's step (2 views, forward + backward) ~6.7 GFLOP/image
    assert 6.0 < rows[0]["gflops_per_image"] < 7.5


@pytest.mark.slow
def test_gpu_check_smoke():
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"], capture_output=True,
                         text=True, cwd=REPO, timeout=900, env={**__import__("os").environ, "PYTHON": sys.executable,
                                                                 "OUT": "/tmp/lightning-ssl-gpu-check-smoke"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "simclr" in out.stdout and "byol" in out.stdout and "mocov2" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method", [SimCLR, BYOL])
def test_compile_backbone_same_loss_and_state_dict_keys(method):
    plain, fast = make(method), make(method, compile_backbone=True)
    fast.setup("fit")
    assert list(plain.state_dict()) == list(fast.state_dict())
    views = batch()
    assert torch.allclose(step_loss(plain, views), step_loss(fast, views), atol=1e-5)


@pytest.mark.real_data
def test_cifar10_knn_script_runs_on_a_tiny_subset(cifar10_root, tmp_path):
    from benchmarks import cifar10_knn

    rows = cifar10_knn.main(["--methods", "simclr", "--train-subset", "40", "--test-subset", "20", "--epochs", "1",
                             "--batch-size", "20", "--root", str(cifar10_root), "--out", str(tmp_path), "--threads", "1"])
    assert 0.0 <= rows[0]["knn_top1"] <= 1.0 and 0.0 <= rows[0]["random_init_top1"] <= 1.0 and rows[0]["steps"] == 2
