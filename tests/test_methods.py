"""Every method trains on CPU, round-trips its hyperparameters, and checkpoints its state exactly."""
import pytest
import pytorch_lightning as pl
import torch

from callbacks import MomentumUpdate, QueueUpdate
from helpers import RandomTwoViews
from lightning_ssl import BYOL, MoCo, MoCoV2, SimCLR


def small(method, **kw):
    common = dict(backbone="resnet18", small_image=False, warmup_epochs=0)
    if method is SimCLR:
        return SimCLR(**common, projection_dim=16, **kw)
    if method in (MoCo, MoCoV2):
        return method(**common, projection_dim=16, projection_hidden_dim=32, queue_size=32, **kw)
    return BYOL(**common, projection_hidden_dim=32, projection_dim=16, **kw)


def trainer(tmp_path, **kw):
    defaults = dict(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    defaults.update(kw)
    return pl.Trainer(**defaults)


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


@pytest.mark.parametrize("method", [SimCLR, MoCo, MoCoV2, BYOL])
def test_fit_few_steps_finite_loss(tmp_path, method):
    model = small(method)
    rec = LossRecorder()
    t = trainer(tmp_path, max_steps=3, callbacks=[rec], enable_checkpointing=False)
    t.fit(model, RandomTwoViews(num_samples=32, batch_size=8))
    assert t.global_step == 3 and len(rec.losses) == 3
    assert all(torch.isfinite(torch.tensor(rec.losses)))


def test_methods_get_their_callbacks_automatically(tmp_path):
    for model, expected in [(small(MoCo), {MomentumUpdate, QueueUpdate}), (small(BYOL), {MomentumUpdate}), (small(SimCLR), set())]:
        t = trainer(tmp_path, max_steps=1, enable_checkpointing=False)
        t.fit(model, RandomTwoViews(num_samples=8, batch_size=8))
        assert expected <= {type(c) for c in t.callbacks}


def test_paper_defaults():
    m1 = MoCo(backbone="resnet18")
    assert (m1.temperature, m1.momentum_tau, m1.queue.shape, m1.optim_config["schedule"]) == (0.07, 0.999, (65536, 128), "step")
    assert isinstance(m1.projector[0], torch.nn.Linear) and len(m1.projector) == 1
    m2 = MoCoV2(backbone="resnet18")
    assert (m2.temperature, m2.version, m2.optim_config["schedule"]) == (0.2, 2, "cosine") and len(m2.projector) == 3
    s = SimCLR(backbone="resnet18")
    assert (s.temperature, s.hparams.base_lr, s.hparams.weight_decay, s.hparams.optimizer) == (0.5, 0.3, 1e-6, "lars")
    assert s.projector[0].out_features == 512 and s.projector[-1].out_features == 128
    b = BYOL(backbone="resnet18")
    assert (b.tau_base, b.hparams.base_lr, b.hparams.weight_decay) == (0.996, 0.2, 1.5e-6)
    assert b.projector[0].out_features == 4096 and b.projector[-1].out_features == 256


@pytest.mark.parametrize("method", [SimCLR, MoCoV2, BYOL])
def test_hyperparameters_round_trip(tmp_path, method):
    model = small(method, temperature=0.3) if method is not BYOL else small(method, tau_base=0.99)
    t = trainer(tmp_path, max_steps=1)
    t.fit(model, RandomTwoViews(num_samples=8, batch_size=8))
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = method.load_from_checkpoint(path)
    assert dict(loaded.hparams) == dict(model.hparams)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_module_backbone_must_be_passed_again(tmp_path, tiny_backbone):
    model = SimCLR(tiny_backbone, projection_dim=8, warmup_epochs=0)
    assert "backbone" not in model.hparams
    t = trainer(tmp_path, max_steps=1)
    t.fit(model, RandomTwoViews(num_samples=8, batch_size=8))
    t.save_checkpoint(tmp_path / "m.ckpt")
    from conftest import TinyConvNet

    loaded = SimCLR.load_from_checkpoint(tmp_path / "m.ckpt", backbone=TinyConvNet())
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(x), loaded(x))


@pytest.mark.parametrize("method", [MoCo, BYOL])
def test_checkpoint_restores_targets_queue_and_pointer_exactly(tmp_path, method):
    dm = RandomTwoViews(num_samples=48, batch_size=8)
    model = small(method)
    t = trainer(tmp_path, max_steps=3)
    t.fit(model, dm)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = method.load_from_checkpoint(path)
    names = ["backbone_momentum", "projector_momentum", "queue", "queue_ptr"] if method is MoCo else ["backbone_target", "projector_target"]
    saved, restored = model.state_dict(), loaded.state_dict()
    for key in saved:
        if any(key.startswith(n) for n in names):
            assert torch.equal(saved[key], restored[key]), key
    if method is MoCo:
        assert int(loaded.queue_ptr) == (3 * 8) % 32

    # Resuming from the epoch-1 checkpoint of a 2-epoch run ends exactly where the run itself ended.
    dm = RandomTwoViews(num_samples=24, batch_size=8)  # 3 steps per epoch
    straight = small(method)
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path / "a", max_epochs=2, callbacks=[every_epoch]).fit(straight, dm)
    resumed = small(method)
    t3 = trainer(tmp_path / "c", max_epochs=2)
    t3.fit(resumed, dm, ckpt_path=tmp_path / "ckpts" / "epoch=0-step=3.ckpt")
    assert t3.global_step == 6
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_queue_size_must_divide_by_global_batch(tmp_path):
    model = small(MoCo)  # queue 32
    with pytest.raises(ValueError, match="multiple of the global batch size 12"):
        trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(model, RandomTwoViews(num_samples=24, batch_size=12))


@pytest.mark.parametrize("bad, match", [
    (dict(optimizer="adam"), "optimizer must be"),
    (dict(schedule="linear"), "schedule must be"),
    (dict(backbone="resnet_18"), "Unknown backbone 'resnet_18'"),
])
def test_bad_arguments_name_the_problem(bad, match):
    kw = dict(backbone="resnet18", warmup_epochs=0)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        SimCLR(**kw)


def test_bad_method_specific_arguments():
    with pytest.raises(ValueError, match="temperature must be positive"):
        SimCLR(backbone="resnet18", temperature=0)
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        MoCo(backbone="resnet18", version=3)
    with pytest.raises(ValueError, match="tau_base <= tau_final"):
        BYOL(backbone="resnet18", tau_base=1.0, tau_final=0.99)
