"""CPC v1/v2: patch grid, causal context network, InfoNCE against a naive loop, training and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyConvNet
from helpers import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ssl import CPC, CPCv2
from lightning_ssl.backbones import batch_norm_to_layer_norm
from lightning_ssl.context import ContextNetwork
from lightning_ssl.losses import cpc_info_nce
from lightning_ssl.patches import augment_patches, extract_patches, grid_shape


# ------------------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("size,patch,stride", [(256, 64, 32), (32, 8, 4)])
def test_grid_equals_crops(size, patch, stride):
    images = torch.randn(2, 3, size, size)
    grid = extract_patches(images, patch, stride, grid_size=7)
    assert grid.shape == (2, 7, 7, 3, patch, patch)
    for i in range(7):
        for j in range(7):
            crop = images[:, :, i * stride : i * stride + patch, j * stride : j * stride + patch]
            assert torch.equal(grid[:, i, j], crop)


def test_grid_shape_and_errors():
    assert grid_shape(32, 32, 8, 4) == (7, 7)
    assert grid_shape(40, 32, 8, 4) == (9, 7)
    with pytest.raises(ValueError, match="resize or crop them to 32x32"):
        extract_patches(torch.zeros(1, 3, 40, 40), 8, 4, grid_size=7)
    with pytest.raises(ValueError, match="smaller than one"):
        extract_patches(torch.zeros(1, 3, 4, 4), 8, 4)


# --------------------------------------------------------------------------------- augmentation
def test_patch_flip_and_color_drop_are_exact():
    patches = torch.randn(50, 3, 8, 8)
    flipped = augment_patches(patches, crop_fraction=1.0, flip_prob=1.0)
    torch.testing.assert_close(flipped, patches.flip(-1), atol=1e-5, rtol=0)
    dropped = augment_patches(patches, color_drop_prob=1.0)
    kept = (dropped.abs().sum(dim=(2, 3)) > 0).sum(dim=1)
    assert torch.equal(kept, torch.ones(50, dtype=torch.long))  # exactly one channel survives
    rows, channel = torch.arange(50), (dropped.abs().sum(dim=(2, 3)) > 0).float().argmax(dim=1)
    assert torch.equal(dropped[rows, channel], patches[rows, channel])  # and is left untouched
    assert len(channel.unique()) == 3  # the kept channel is chosen at random
    assert torch.equal(augment_patches(patches), patches)  # no augmentation requested


def test_patch_crop_is_a_random_window_inside_each_patch():
    # A horizontal ramp x: a crop of fraction s resized back to 8 pixels is a ramp of slope s
    # inside [0, 7]; offsets differ between patches.
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(200, 3, 8, 8).contiguous()
    out = augment_patches(ramp, crop_fraction=0.5)
    assert out.min() >= 0 and out.max() <= 7
    slopes = out[..., 1:-1].diff(dim=-1)  # interior pixels: no clamping at the patch border
    torch.testing.assert_close(slopes, torch.full_like(slopes, 0.5), atol=1e-4, rtol=0)
    assert out[:, 0, 0, 3].std() > 0.3  # different windows for different patches


# ------------------------------------------------------------------------------------ causality
def test_context_is_causal_by_perturbation():
    net = ContextNetwork(dim=6, hidden_dim=8, num_blocks=3).eval()
    z = torch.randn(2, 6, 7, 7)
    base = net(z)
    for r in range(7):
        perturbed = z.clone()
        perturbed[:, :, r] += torch.randn_like(perturbed[:, :, r])
        out = net(perturbed)
        assert torch.equal(out[:, :, :r], base[:, :, :r]), f"row {r} leaked into rows above it"
        assert not torch.allclose(out[:, :, r], base[:, :, r])  # the row itself is seen


def test_context_is_causal_by_autograd():
    net = ContextNetwork(dim=4, hidden_dim=8, num_blocks=5)
    z = torch.randn(1, 4, 7, 7, requires_grad=True)
    c = net(z)
    for i in range(7):
        (grad,) = torch.autograd.grad(c[:, :, i].sum(), z, retain_graph=True)
        rows_seen = grad.abs().sum(dim=(0, 1, 3)) > 0
        assert not rows_seen[i + 1 :].any(), f"context at row {i} depends on rows below it"
        assert rows_seen[: i + 1].all(), f"context at row {i} does not see every row above it"


# ------------------------------------------------------------------------------------------ loss
def _naive_cpc_loss(predictions, targets, steps):
    b, _, _, rows, cols = predictions.shape
    per_step = []
    for s, k in enumerate(steps):
        terms = []
        for n in range(b):
            for i in range(rows - k):
                for j in range(cols):
                    pred = predictions[n, s, :, i, j]
                    positive = pred @ targets[n, :, i + k, j]
                    scores = [pred @ targets[m, :, y, x] for m in range(b) for y in range(rows) for x in range(cols)]
                    terms.append(torch.logsumexp(torch.stack(scores), 0) - positive)
        per_step.append(torch.stack(terms).mean())
    return torch.stack(per_step).mean()


def test_loss_matches_naive_loop():
    predictions = torch.randn(2, 3, 5, 4, 3, dtype=torch.float64)
    targets = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    steps = [1, 2, 3]
    fast = cpc_info_nce(predictions, targets, steps)
    torch.testing.assert_close(fast, _naive_cpc_loss(predictions, targets, steps))
    torch.testing.assert_close(
        cpc_info_nce(predictions[:, 1:], targets, [2, 3]), _naive_cpc_loss(predictions[:, 1:], targets, [2, 3])
    )


def test_loss_is_log_n_for_random_vectors_and_falls_for_perfect_predictions():
    b, d, rows, cols, steps = 8, 128, 7, 7, [1, 2, 3]
    targets = torch.randn(b, d, rows, cols) / d**0.5
    predictions = torch.randn(b, len(steps), d, rows, cols) / d**0.5
    n = b * rows * cols
    random_loss = cpc_info_nce(predictions, targets, steps)
    assert abs(random_loss.item() - math.log(n)) < 0.05 * math.log(n)
    # Positives identical to the predictions (scaled so the dot products are informative).
    exact = torch.zeros_like(predictions)
    for s, k in enumerate(steps):
        exact[:, s, :, : rows - k] = targets[:, :, k:]
    assert cpc_info_nce(exact * 10, targets * 10, steps) < 0.1 * random_loss
    assert cpc_info_nce(exact, targets, steps) < random_loss


def _distributed_loss_worker(rank, world, init_file, predictions, targets, steps, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b = predictions.shape[0] // world
        p = predictions[rank * b : (rank + 1) * b].clone().requires_grad_()
        t = targets[rank * b : (rank + 1) * b].clone().requires_grad_()
        loss = cpc_info_nce(p, t, steps)  # gather=True: candidates from both processes
        loss.backward()
        torch.save({"loss": loss.detach(), "p": p.grad, "t": t.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawning two processes that import torch takes 15-60 s on 2 shared cores
@pytest.mark.distributed
def test_loss_gathers_candidates_across_processes(tmp_path):
    """Two gloo processes holding half the batch each give the loss and gradients of one process
    holding all of it (DDP averages the gradients, hence the factor 1/2)."""
    import torch.multiprocessing as mp

    predictions = torch.randn(4, 2, 6, 5, 3, dtype=torch.float64)
    targets = torch.randn(4, 6, 5, 3, dtype=torch.float64)
    out = tmp_path / "result"
    mp.spawn(_distributed_loss_worker, args=(2, tmp_path / "init", predictions, targets, [1, 2], out), nprocs=2)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    p, t = predictions.clone().requires_grad_(), targets.clone().requires_grad_()
    full = cpc_info_nce(p, t, [1, 2])
    full.backward()
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, full.detach())
    torch.testing.assert_close(torch.cat([r["p"] for r in results]) / 2, p.grad)
    torch.testing.assert_close(torch.cat([r["t"] for r in results]) / 2, t.grad)
    # Without gathering each process only sees its own half: a different loss.
    assert not torch.allclose(cpc_info_nce(predictions[:2], targets[:2], [1, 2], gather=False), results[0]["loss"])


def test_loss_rejects_bad_steps():
    with pytest.raises(ValueError, match="1..6"):
        cpc_info_nce(torch.randn(1, 1, 2, 7, 7), torch.randn(1, 2, 7, 7), [7])


# ---------------------------------------------------------------------------------------- method
def _loader(n=8, size=16, batch=4):
    images = torch.randn(n, 3, size, size)
    return DataLoader(
        TensorDataset(images, torch.zeros(n, dtype=torch.long)),
        batch_size=batch,
        collate_fn=lambda items: ([torch.stack([x for x, _ in items])], torch.stack([y for _, y in items])),
    )


def _tiny_cpc(cls=CPC, backbone=None, **kw):
    # 16x16 images, 4x4 patches every 2 pixels: a 7x7 grid.
    kw = dict(
        patch_size=4,
        patch_stride=2,
        embedding_dim=16,
        context_hidden_dim=8,
        context_blocks=2,
        prediction_steps=3,
        lr=1e-3,
        **kw,
    )
    return cls(backbone=backbone if backbone is not None else TinyConvNet(width=8), **kw)


def _fit(model, steps=3):
    trainer = quiet_trainer(
        max_steps=steps,
    )
    trainer.fit(model, _loader())
    return trainer


@pytest.mark.parametrize("cls", [CPC, CPCv2])
def test_fit_a_few_steps(cls):
    backbone = TinyConvNet(width=8)
    model = _tiny_cpc(cls, backbone=batch_norm_to_layer_norm(backbone) if cls is CPCv2 else backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _fit(model)
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "backbone" in k)
    assert hasattr(model, "context_up") == (cls is CPCv2)


def test_v2_defaults_and_layer_norm_encoder():
    model = CPCv2("resnet18", small_image=True, patch_size=8, patch_stride=4, embedding_dim=32, context_hidden_dim=16)
    assert model.bidirectional and model.patch_augment
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in model.backbone.modules())
    # Per-sample normalization: one image's features do not depend on the rest of the batch.
    images = torch.randn(3, 3, 32, 32)
    model.train()
    torch.testing.assert_close(model.representation(images)[:1], model.representation(images[:1]), atol=1e-5, rtol=1e-5)
    baseline = model.random_init_backbone()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in baseline.modules())
    assert model.representation(images, backbone=baseline).shape == (3, 512)
    v1 = CPC("resnet18", small_image=True, patch_size=8, patch_stride=4, embedding_dim=32, context_hidden_dim=16)
    assert any(isinstance(m, nn.BatchNorm2d) for m in v1.backbone.modules())


def test_batch_norm_to_layer_norm_is_layer_norm():
    net = batch_norm_to_layer_norm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4))))
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(net(x), F.layer_norm(net[0](x), (4, 5, 5)), atol=1e-5, rtol=1e-5)


def test_representation_is_the_mean_of_patch_features():
    model = _tiny_cpc().eval()
    images = torch.randn(2, 3, 16, 16)
    grid = extract_patches(images, 4, 2)
    expected = torch.stack([model.backbone(grid[:, i, j]) for i in range(7) for j in range(7)]).mean(dim=0)
    torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
    other = model.random_init_backbone(seed=1).eval()
    assert not torch.allclose(model.representation(images, backbone=other), model(images))


def test_too_few_rows_is_a_clear_error():
    model = _tiny_cpc()
    with pytest.raises(ValueError, match="too small to predict 3 patches ahead"):
        model.loss(torch.randn(2, 3, 8, 8))  # a 3x3 grid
    with pytest.raises(ValueError, match="encoder_norm"):
        _tiny_cpc(encoder_norm="group")


@pytest.mark.parametrize("cls,backbone", [(CPC, None), (CPCv2, "resnet18")])
def test_checkpoint_round_trip(tmp_path, cls, backbone):
    kw = {"small_image": True} if backbone else {}
    model = _tiny_cpc(cls, backbone=backbone, **kw)
    trainer = _fit(model, steps=2)
    path = tmp_path / "cpc.ckpt"
    trainer.save_checkpoint(path)
    extra = {} if backbone else {"backbone": TinyConvNet(width=8)}
    loaded = cls.load_from_checkpoint(path, **extra)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    model.eval(), loaded.eval()
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(images), loaded(images))
    assert torch.equal(model.loss(images)["loss"], loaded.loss(images)["loss"])  # eval: no augmentation


@pytest.mark.parametrize("name", ["cpc_cifar10.yaml", "cpc_imagenet.yaml"])
def test_config_model_arguments_build_the_model(name):
    import importlib
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / name).read_text())
    module, cls_name = config["model"]["class_path"].rsplit(".", 1)
    model = getattr(importlib.import_module(module), cls_name)(**config["model"]["init_args"])
    assert isinstance(model, CPC)
    assert {k: model.hparams[k] for k in config["model"]["init_args"]} == config["model"]["init_args"]


def test_prediction_offsets_and_directions(monkeypatch):
    """CPC v1 predicts 2..6 rows ahead (the overlapping adjacent row skipped, as Greedy InfoMax); CPC v2
    predicts 3 ahead (Henaff et al., Algorithm 1) in four directions, each on the turned grid."""
    import lightning_ssl.methods.cpc as cpc_module

    v1 = CPC(TinyConvNet(width=8), patch_size=4, patch_stride=2, embedding_dim=8, context_hidden_dim=8)
    v2 = CPCv2(TinyConvNet(width=8), patch_size=4, patch_stride=2, embedding_dim=8, context_hidden_dim=8)
    assert v1.steps == [2, 3, 4, 5, 6] and v1.directions == ["top_down"]
    assert v2.steps == [3] and v2.directions == ["top_down", "bottom_up", "left_right", "right_left"]
    assert CPC(TinyConvNet(width=8), first_step=1, prediction_steps=5).steps == [1, 2, 3, 4, 5]
    calls = []

    def recording(predictions, targets, steps, gather=True):
        calls.append((predictions.shape, targets.detach().clone(), list(steps)))
        return predictions.sum() * 0

    monkeypatch.setattr(cpc_module, "cpc_info_nce", recording)
    v2.eval()  # no per-patch augmentation: the same z for every direction
    images = torch.randn(2, 3, 16, 18)  # a 7x8 grid: turned grids are 8x7
    v2.loss(images)
    assert [c[2] for c in calls] == [[3]] * 4
    z = calls[0][1]
    assert z.shape[2:] == (7, 8)
    torch.testing.assert_close(calls[1][1], z.flip(2))
    torch.testing.assert_close(calls[2][1], z.transpose(2, 3))
    torch.testing.assert_close(calls[3][1], z.transpose(2, 3).flip(2))
    assert all(c[0][1] == 1 for c in calls)  # one predictor output per offset
    calls.clear()
    v1.loss(torch.randn(2, 3, 16, 16))
    assert [c[2] for c in calls] == [[2, 3, 4, 5, 6]] and calls[0][0][1] == 5
