"""Fast-path pieces outside the per-method contract (tests/test_contracts.py covers channels_last,
bf16 steps and host synchronizations for every method): fused optimizer steps, LARS's batched
trust ratios, float32 losses under autocast, the sync counter's own sensitivity, and the speed
benchmarks, run as a user runs them (``python -m benchmarks...``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyConvNet
from helpers import SyncCounter, quiet_trainer
from torch.utils.data import DataLoader

from lightning_ssl import BYOL, REGISTRY, SimCLR
from lightning_ssl.losses import byol_loss, moco_info_nce, nt_xent
from lightning_ssl.optim import LARS, build_optimizer, split_weight_decay

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


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


def test_fast_path_arguments_are_hyperparameters():
    model = SimCLR(TinyConvNet(), channels_last=True, fused_optimizer=True)
    assert model.hparams.channels_last and model.hparams.fused_optimizer and not model.hparams.compile_backbone
    assert model.optim_config["fused"]


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


# ------------------------------------------------------------------------------ host syncs
class _Views(torch.utils.data.Dataset):
    def __init__(self):
        self.views = torch.randn(2, 32, 3, 16, 16)

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return [self.views[0, i], self.views[1, i]], 0


def test_sync_counter_sees_the_progress_bar_sync(tmp_path, monkeypatch):
    """Control of the per-method sync test: a metric logged with prog_bar=True is converted with
    .item() at every batch end by Lightning's logger connector: the counter sees that sync."""
    counter = SyncCounter()
    trainer = quiet_trainer(
        max_steps=4,
        log_every_n_steps=100,
        callbacks=[counter],
        default_root_dir=tmp_path,
    )
    model = SimCLR(TinyConvNet(), projection_dim=16, warmup_epochs=0)
    step = model.training_step

    def step_with_bar(batch, batch_idx):
        loss = step(batch, batch_idx)
        model.log("bar/loss", loss, prog_bar=True)
        return loss

    model.training_step = step_with_bar
    counter.patch(monkeypatch)
    trainer.fit(model, train_dataloaders=DataLoader(_Views(), batch_size=8))
    assert counter.per_step == [1, 1, 1], counter.per_step


# ------------------------------------------------------------------------------ benchmarks
@pytest.mark.slow
def test_bare_loop_of_the_throughput_benchmark_does_what_the_trainer_does():
    """Two steps of the benchmark's bare loop and of Trainer.fit leave identical weights, EMA targets
    and queue, for every registered image method the bare loop runs (small heads, 16-pixel images)."""
    # SwAV and DINO override per-step hooks that read the Trainer's step (the benchmark's needs_trainer;
    # tests do not import benchmarks): no bare loop; the ViT-only methods are left to their own tests
    hooks = ("on_train_batch_start", "on_after_backward", "configure_gradient_clipping")
    methods = [
        name
        for name, entry in REGISTRY.items()
        if entry.modality == "image"
        and not entry.vit_only
        and all(getattr(entry.cls, hook) is getattr(pl.LightningModule, hook) for hook in hooks)
    ]
    assert "simsiam" in methods and "swav" not in methods and "dino" not in methods
    out = run_module(
        "benchmarks.train_throughput",
        "--verify",
        "--small",
        "--methods",
        *methods,
        "--batch-size",
        "8",
        "--image-size",
        "16",
        "--threads",
        "1",
        "--backbone",
        "resnet18",
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.count("identical") == len(methods)


@pytest.mark.slow
def test_throughput_script_prints_its_table():
    out = run_module(
        "benchmarks.train_throughput",
        "--methods",
        "mocov2",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--threads",
        "1",
        "--channels-last",
        "--fused",
        "--small",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    row = [line.split() for line in out.stdout.splitlines() if line.strip().startswith("mocov2")][0]
    bare, trainer, ratio = map(float, row[1:4])
    # the table prints images/s to 0.1 and the ratio to 0.001: allow for that rounding
    assert bare > 0 and trainer > 0 and abs(ratio - trainer / bare) <= 0.1 / bare + 1e-3


@pytest.mark.slow
def test_gpu_epoch_smoke_runs_on_cpu(tmp_path):
    out = run_module("benchmarks.gpu_epoch", "--smoke", "--methods", "simclr", "--json", str(tmp_path / "e.json"))
    assert out.returncode == 0, out.stderr[-3000:]

    row = json.loads((tmp_path / "e.json").read_text())["rows"][0]
    assert row["images_per_s"] > 0
    # a CIFAR-stem ResNet-18 forward is 0.56 GMAC: SimCLR's step (2 views, forward + backward) ~6.7 GFLOP/image
    assert 6.0 < row["gflops_per_image"] < 7.5


@pytest.mark.slow
def test_gpu_check_smoke():
    env = {**os.environ, "PYTHON": sys.executable, "OUT": "/tmp/lightning-ssl-gpu-check-smoke"}
    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "simclr" in out.stdout and "byol" in out.stdout and "mocov2" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method", [SimCLR, BYOL])
def test_compile_backbone_same_loss_and_state_dict_keys(method):
    torch.manual_seed(0)
    plain = method(TinyConvNet(), projection_hidden_dim=32, projection_dim=16)
    torch.manual_seed(0)
    fast = method(TinyConvNet(), projection_hidden_dim=32, projection_dim=16, compile_backbone=True)
    fast.setup("fit")
    assert list(plain.state_dict()) == list(fast.state_dict())
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    for m in (plain, fast):
        m.log = lambda *a, **k: None
    assert torch.allclose(plain.training_step((views, None), 0), fast.training_step((views, None), 0), atol=1e-5)


@pytest.mark.real_data
def test_cifar10_knn_script_runs_on_a_tiny_subset(cifar10_root, tmp_path):
    out = run_module(
        "benchmarks.cifar10_knn",
        "--methods",
        "simclr",
        "--train-per-class",
        "4",
        "--test-per-class",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--root",
        str(cifar10_root),
        "--threads",
        "1",
        "--json",
        str(tmp_path / "k.json"),
        "--linear-epochs",
        "1",
    )
    assert out.returncode == 0, out.stderr[-3000:]

    row = json.loads((tmp_path / "k.json").read_text())["rows"][0]
    assert 0.0 <= row["knn"] <= 1.0 and 0.0 <= row["random_init_knn"] <= 1.0 and row["steps"] == 2
    assert 0.0 <= row["linear"] <= 1.0


def test_peer_benchmark_smoke_runs_both_libraries(cifar10_root):
    """Ours and lightly's, at tiny sizes, side by side (needs the optional extra: pip install -e ".[peer]")."""
    pytest.importorskip("lightly")
    out = run_module("benchmarks.peer_benchmark", "--smoke", "--methods", "simclr", "byol", "--root", str(cifar10_root))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().startswith(("simclr", "byol"))]
    assert len(rows) == 2 and all(float(r[3]) > 0 for r in rows)  # the time ratio ours/lightly


@pytest.mark.slow
def test_peer_benchmark_smoke_runs_every_method_on_both_sides(cifar10_root):
    """Every method that both libraries have is in the default list and runs on both sides."""
    pytest.importorskip("lightly")
    methods = ("simclr", "mocov2", "byol", "barlowtwins", "vicreg", "simsiam", "nnclr", "swav", "dino")
    out = run_module("benchmarks.peer_benchmark", "--smoke", "--root", str(cifar10_root))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().split(" ")[0] in methods]
    assert [r[0] for r in rows] == list(methods)
    assert all(0.0 <= float(r[-1]) <= 1.0 and 0.0 <= float(r[-2]) <= 1.0 for r in rows)  # both kNN scores
