"""SimSiam, Barlow Twins, VICReg and NNCLR: optimizer groups, stop-gradient, support set, CLI fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyConvNet
from helpers import quiet_trainer
from image_trees import CIFAR_CLASSES, make_tree

from lightning_ssl import REGISTRY, BarlowTwins, SimSiam, VICReg
from lightning_ssl.cli import main
from lightning_ssl.queue import nearest_neighbours

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to .self.log")  # training_step outside a Trainer

REPO = Path(__file__).resolve().parents[1]
NAMES = ["simsiam", "barlow_twins", "vicreg", "nnclr"]


def _views(n: int = 8, size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=gen) for _ in range(2)]


class _Views(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        self.views = torch.stack(_views(n))

    def __len__(self):
        return self.views.shape[1]

    def __getitem__(self, i):
        return [self.views[0, i], self.views[1, i]], 0


def _fit_recording_lrs(model, steps: int, **trainer_kwargs) -> list[list[float]]:
    """The lr of every optimizer group before each optimizer step."""
    import pytorch_lightning as pl

    lrs: list[list[float]] = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append([g["lr"] for g in optimizer.param_groups])

    loader = torch.utils.data.DataLoader(_Views(), batch_size=8, drop_last=True)
    quiet_trainer(max_steps=steps, callbacks=[Record()], **trainer_kwargs).fit(model, train_dataloaders=loader)
    return lrs


# ----------------------------------------------------------------------------- SimSiam
def test_simsiam_predictor_lr_stays_fixed_while_the_rest_follows_the_schedule(tmp_path):
    model = REGISTRY["simsiam"].build(size="small", backbone=TinyConvNet(), warmup_epochs=1, base_lr=0.05)
    lrs = _fit_recording_lrs(model, steps=8, max_epochs=2, default_root_dir=tmp_path)  # 4 steps an epoch
    peak = 0.05 * 8 / 256
    predictor = torch.tensor([step[1] for step in lrs])
    rest = torch.tensor([step[0] for step in lrs])
    torch.testing.assert_close(predictor, torch.full_like(predictor, peak), rtol=1e-12, atol=0)
    assert rest[0] == pytest.approx(peak / 4)  # warmup step 1 of 4
    assert rest[3] == pytest.approx(peak)  # end of warmup
    assert rest[4] == pytest.approx(peak) and rest[-1] < rest[5] < peak  # then cosine decay


def test_simsiam_groups_hold_every_parameter_once_with_weight_decay():
    model = REGISTRY["simsiam"].build(size="small", backbone=TinyConvNet())
    groups = model.parameter_groups(1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.predictor.parameters()}
    assert groups[1]["fixed_lr"] and not groups[0].get("fixed_lr", False)
    assert all(g["weight_decay"] == 1e-4 for g in groups)  # the reference code decays every parameter
    unfixed = REGISTRY["simsiam"].build(size="small", backbone=TinyConvNet(), fix_predictor_lr=False)
    assert not unfixed.parameter_groups(1e-4)[1]["fixed_lr"]


class _Detach(torch.nn.Module):
    def forward(self, x):
        return x.detach()


def test_simsiam_stop_gradient_no_gradient_through_the_target_branch():
    """With the online branch cut after the predictor, the loss depends on no parameter: z1 and z2 (the
    target branch) enter it as constants. With the branch intact, gradients reach the backbone."""
    model = REGISTRY["simsiam"].build(size="small", backbone=TinyConvNet()).train()
    model.log = lambda *a, **k: None
    predictor = model.predictor
    model.predictor = torch.nn.Sequential(predictor, _Detach())
    loss = model.training_step((_views(), None), 0)
    assert not loss.requires_grad and loss.grad_fn is None
    model.predictor = predictor
    loss = model.training_step((_views(), None), 0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_simsiam_cifar_projector_has_two_layers_with_bn_on_the_output():
    model = REGISTRY["simsiam"].build(size="small", backbone=TinyConvNet(), projection_layers=2)
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 and isinstance(model.projector[-1], torch.nn.BatchNorm1d)
    assert len([m for m in model.predictor if isinstance(m, torch.nn.Linear)]) == 2


# ----------------------------------------------------------------------------- Barlow Twins
def test_barlow_twins_biases_and_norms_get_their_own_scaled_lr(tmp_path):
    model = REGISTRY["barlow_twins"].build(
        size="small", backbone=TinyConvNet(), base_lr=0.2, schedule="constant", warmup_epochs=0
    )
    lrs = _fit_recording_lrs(model, steps=1, max_epochs=1, default_root_dir=tmp_path)
    assert lrs[0] == pytest.approx([0.2 * 8 / 256, 0.0048 * 8 / 256])
    groups = model.parameter_groups(1.5e-6)
    assert groups[0]["weight_decay"] == 1.5e-6 and groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]


@pytest.mark.parametrize("optimizer,expected", [("lars", 0.024), ("sgd", 1.0), ("adamw", 1.0)])
def test_barlow_twins_scales_the_bias_lr_only_with_lars_by_default(optimizer, expected):
    model = REGISTRY["barlow_twins"].build(size="small", backbone=TinyConvNet(), optimizer=optimizer)
    assert model.parameter_groups(0.0)[1]["lr_scale"] == expected
    model = REGISTRY["barlow_twins"].build(size="small", backbone=TinyConvNet(), optimizer=optimizer, bias_lr_scale=0.5)
    assert model.parameter_groups(0.0)[1]["lr_scale"] == 0.5


# ----------------------------------------------------------------------------- NNCLR
def test_nnclr_positives_are_support_set_neighbours_and_the_checkpoint_holds_the_support_set(tmp_path):
    model = REGISTRY["nnclr"].build(size="small", backbone=TinyConvNet())
    assert model.queue.shape == (64, 16)
    loader = torch.utils.data.DataLoader(_Views(), batch_size=8, drop_last=True)
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=loader)
    assert int(model.queue_ptr) == 24
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(64))
    path = tmp_path / "nnclr.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    torch.testing.assert_close(state["queue"], model.queue, rtol=0, atol=0)
    assert int(state["queue_ptr"]) == 24
    z = model.queue[:5] * 3.0  # the neighbour of an embedding stored in the support set is itself
    torch.testing.assert_close(nearest_neighbours(z, model.queue), model.queue[:5], rtol=0, atol=0)


def test_nnclr_rejects_a_support_set_the_global_batch_does_not_divide(tmp_path):
    model = REGISTRY["nnclr"].build(size="small", backbone=TinyConvNet(), queue_size=60)
    loader = torch.utils.data.DataLoader(_Views(), batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="queue_size=60"):
        quiet_trainer(max_steps=1, default_root_dir=tmp_path).fit(model, train_dataloaders=loader)


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("cifar"), {"train": 2, "test": 1}, CIFAR_CLASSES)


@pytest.mark.parametrize("name", NAMES)
def test_cifar_config_fits_two_steps_through_the_cli(name, cifar_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write outputs/ under the working directory
    # fmt: off
    main([
        "fit", "--config", str(REPO / "configs" / f"{name}_cifar10.yaml"),
        "--data.init_args.root", str(cifar_tree), "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4", "--data.init_args.image_size", "16",
        "--data.init_args.eval_batch_size", "20",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
    ])
    # fmt: on
    assert list(tmp_path.rglob("last.ckpt")) and list(tmp_path.rglob("metrics.csv"))


@pytest.mark.parametrize("cls", [SimSiam, BarlowTwins, VICReg])
def test_named_resnets_start_with_zero_initialized_residual_batch_norms(cls):
    """As all three reference codes build their ResNets (``zero_init_residual=True``); the random-init
    baseline of the final report starts the same way."""
    import torchvision

    from lightning_ssl import SimCLR

    def last_bn_weights(backbone):
        blocks = [m for m in backbone.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
        assert len(blocks) == 8
        return torch.cat([b.bn2.weight.detach() for b in blocks])

    model = cls(backbone="resnet18", small_image=True)
    assert torch.count_nonzero(last_bn_weights(model.backbone)) == 0
    assert torch.count_nonzero(last_bn_weights(model.random_init_backbone(seed=3))) == 0
    first = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert torch.all(first.weight == 1)  # only the blocks' last batch norms
    assert torch.all(last_bn_weights(SimCLR(backbone="resnet18", small_image=True).backbone) == 1)
