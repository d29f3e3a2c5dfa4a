"""What is particular to each method: paper defaults, thin variants, argument checks, module
backbones, checkpoints of earlier releases. The contract all methods share: tests/test_contracts.py."""

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyConvNet
from helpers import RandomTwoViews, quiet_trainer
from torch import nn

from lightning_ssl import BYOL, CPC, MoCo, MoCoV2, SimCLR
from lightning_ssl.cli import main as cli_main


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(**{"max_epochs": 1, "default_root_dir": tmp_path, **kwargs})


def test_paper_defaults():
    m1 = MoCo(backbone="resnet18")
    assert (m1.temperature, m1.ema_tau, m1.queue.shape, m1.optim_config["schedule"]) == (
        0.07,
        0.999,
        (65536, 128),
        "step",
    )
    assert isinstance(m1.projector[0], torch.nn.Linear) and len(m1.projector) == 1
    m2 = MoCoV2(backbone="resnet18")
    assert (m2.temperature, m2.optim_config["schedule"]) == (0.2, "cosine") and len(m2.projector) == 3
    assert m2.projector[0].out_features == 2048
    s = SimCLR(backbone="resnet18")
    assert (s.temperature, s.hparams.base_lr, s.hparams.weight_decay, s.hparams.optimizer) == (0.5, 0.3, 1e-6, "lars")
    assert s.projector[0].out_features == 512 and s.projector[-1].out_features == 128
    b = BYOL(backbone="resnet18")
    assert (b.ema_tau, b.ema_tau_final, b.hparams.base_lr, b.hparams.weight_decay) == (0.996, 1.0, 0.2, 1.5e-6)
    assert b.projector[0].out_features == 4096 and b.projector[-1].out_features == 256


def test_thin_variant_is_its_parent_with_other_defaults():
    """MoCoV2 states only what v2 changed; every MoCo argument reaches it, and MoCo with v2's values
    is the same model."""
    torch.manual_seed(0)
    v2 = MoCoV2(TinyConvNet(), queue_size=64, ema_tau=0.99)
    torch.manual_seed(0)
    same = MoCo(
        TinyConvNet(), queue_size=64, ema_tau=0.99, projection_hidden_dim=2048, temperature=0.2, schedule="cosine"
    )
    assert dict(v2.hparams) == dict(same.hparams)
    for (key, a), b in zip(v2.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), key


def test_cli_help_of_a_thin_variant_lists_every_argument(capsys):
    """jsonargparse follows **kwargs into the parents: ``--help`` shows MoCoV2's, MoCo's and SSLMethod's
    arguments with their defaults."""
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "lightning_ssl.MoCoV2"])
    out = capsys.readouterr().out.split("Help for --model.help", 1)[1]  # the options, after the usage lines
    for argument, default in [
        ("temperature", "0.2"),
        ("projection_hidden_dim", "2048"),
        ("queue_size", "65536"),
        ("ema_tau", "0.999"),
        ("base_lr", "0.03"),
        ("warmup_epochs", "0.0"),
        ("fused_optimizer", "False"),
    ]:
        assert f"  --model.{argument}" in out, argument
        section = out.split(f"  --model.{argument}", 1)[1].split("  --model.", 1)[0]
        assert f"default: {default}" in section, (argument, section)


def test_module_backbone_must_be_passed_again(tmp_path, tiny_backbone):
    model = SimCLR(tiny_backbone, projection_dim=8, warmup_epochs=0)
    assert "backbone" not in model.hparams
    t = trainer(tmp_path, max_steps=1)
    t.fit(model, RandomTwoViews(num_samples=8, batch_size=8))
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = SimCLR.load_from_checkpoint(tmp_path / "m.ckpt", backbone=TinyConvNet())
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(x), loaded(x))


def test_checkpoints_of_the_earlier_names_still_load(tmp_path):
    """Earlier releases called the EMA copies `*_momentum` (MoCo) and `*_target` (BYOL), the EMA rate
    `momentum_tau` / `tau_base`, and chose MoCo's head with `version`."""
    torch.manual_seed(0)
    moco = MoCo(TinyConvNet(), queue_size=64)
    old_state = {k.replace("_ema.", "_momentum."): v for k, v in moco.state_dict().items()}
    old_hparams = {k: v for k, v in moco.hparams.items() if k not in ("ema_tau", "projection_hidden_dim")}
    old_hparams.update(momentum_tau=0.999, version=1, projection_hidden_dim=2048)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": old_state, "hyper_parameters": old_hparams, "pytorch-lightning_version": "2.6.6"}, path)
    loaded = MoCo.load_from_checkpoint(path, backbone=TinyConvNet())
    assert loaded.hparams.ema_tau == 0.999 and len(loaded.projector) == 1  # v1's linear head
    for key, value in moco.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    byol = BYOL(TinyConvNet(), projection_hidden_dim=32, projection_dim=16)
    fresh = BYOL(TinyConvNet(), projection_hidden_dim=32, projection_dim=16)
    fresh.load_state_dict({k.replace("_ema.", "_target."): v for k, v in byol.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), byol.state_dict().values()))


def test_queue_size_must_divide_by_global_batch(tmp_path):
    model = MoCo(TinyConvNet(), projection_dim=16, queue_size=32, warmup_epochs=0)
    with pytest.raises(ValueError, match="multiple of the global batch size 12"):
        trainer(tmp_path, max_steps=1).fit(model, RandomTwoViews(num_samples=24, batch_size=12))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(optimizer="adam"), "optimizer must be one of lars, sgd, adamw"),
        (dict(schedule="linear"), "schedule must be one of cosine, step, constant"),
        (dict(backbone="resnet_18"), "Unknown backbone 'resnet_18'. Did you mean resnet18"),
    ],
)
def test_bad_arguments_name_the_problem(bad, match):
    kw = dict(backbone="resnet18", warmup_epochs=0)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        SimCLR(**kw)


def test_bad_method_specific_arguments():
    with pytest.raises(ValueError, match="temperature must be positive"):
        SimCLR(backbone="resnet18", temperature=0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        MoCo(backbone="resnet18", temperature=-0.1)
    with pytest.raises(ValueError, match="ema_tau must lie in"):
        MoCo(backbone="resnet18", ema_tau=1.5)
    with pytest.raises(ValueError, match="ema_tau <= ema_tau_final"):
        BYOL(backbone="resnet18", ema_tau=1.0, ema_tau_final=0.99)
    with pytest.raises(ValueError, match="encoder_norm must be"):
        CPC(backbone="resnet18", encoder_norm="instance")


def test_view_batching_decides_the_batch_norm_statistics():
    """In training mode the modes differ exactly by batch norm: over 2N views or N per view."""
    from lightning_ssl.methods.base import SSLMethod

    torch.manual_seed(0)
    model = SimCLR(TinyConvNet(), projection_dim=8, view_batching="concat")
    net = torch.nn.BatchNorm1d(3)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3) + 5
    concat = model.forward_views(net, [x1, x2])
    model.view_batching = "per_view"
    per_view = model.forward_views(net, [x1, x2])
    torch.testing.assert_close(per_view[1].mean(0), torch.zeros(3), atol=1e-5, rtol=0)  # each view centered alone
    assert concat[1].mean(0).min() > 0.5  # centered with the other view
    model.view_batching = "auto"  # on the CPU: per view
    torch.testing.assert_close(model.forward_views(net, [x1, x2])[1], per_view[1])
    with pytest.raises(ValueError, match="view_batching must be one of auto, concat, per_view"):
        SimCLR(TinyConvNet(), view_batching="stacked")
    assert "view_batching" in SSLMethod.__init__.__code__.co_varnames


def test_simclr_projection_head_options(tiny_backbone):
    """``paper``: the last layer is linear with bias; ``reference`` (google-research/simclr): no bias,
    then BN with a scale and no centering, so each output feature has zero batch mean in training."""
    paper = SimCLR(tiny_backbone, projection_hidden_dim=16, projection_dim=8)
    assert isinstance(paper.projector[-1], nn.Linear) and paper.projector[-1].bias is not None
    reference = SimCLR(TinyConvNet(), projection_head="reference", projection_hidden_dim=16, projection_dim=8)
    linear, bn = reference.projector[-2], reference.projector[-1]
    assert isinstance(linear, nn.Linear) and linear.bias is None
    assert isinstance(bn, nn.BatchNorm1d) and bn.weight is not None and bn.bias is None
    assert "projector.4.bias" not in reference.state_dict()
    with torch.no_grad():
        bn.weight.fill_(3.0)
    z = reference.projector(torch.randn(32, 16) + 5)
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.full((8,), 3.0), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="projection_head"):
        SimCLR(TinyConvNet(), projection_head="linear")
