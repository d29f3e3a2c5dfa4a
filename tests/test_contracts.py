"""The contract every registered method fulfils, parametrized over ``lightning_ssl.REGISTRY``: a new
method registered with one line is covered by every test here with no other edit.

fit with a finite loss and the callbacks its contracts call for; hyperparameters round trip; a
checkpoint restores everything and a resumed run ends where the uninterrupted one ends; no host
synchronization per step; channels_last and bf16 do not change the step; the exported encoder
computes the method's representation. (Multi-process equivalence: tests/test_distributed.py.)

Inputs follow each entry's modality (``MethodEntry.modality``): image methods get the random image
batches below, audio methods random waveforms from ``MethodEntry.example_views``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
import yaml
from audio_helpers import ExampleViewsDataModule
from conftest import small_backbone
from helpers import RandomTwoViews, SyncCounter, quiet_trainer
from torch.utils.data import DataLoader

import lightning_ssl
from lightning_ssl import REGISTRY, SSLMethod
from lightning_ssl.audio_encoders import CPCAudioEncoder
from lightning_ssl.backbones import batch_norm_to_layer_norm
from lightning_ssl.callbacks import EMAUpdate, QueueUpdate
from lightning_ssl.contracts import HasEMATargets, HasQueue
from lightning_ssl.evaluation import export_backbone, load_encoder
from lightning_ssl.evaluation.export import torchvision_model

NAMES = sorted(REGISTRY)
REPO = Path(__file__).resolve().parents[1]
SIZE = 16  # image side of the contract runs
NEAREST_NEIGHBOUR_POSITIVES = {"nnclr"}  # losses with a discrete choice (see the bf16 test)


def is_image(name: str) -> bool:
    return REGISTRY[name].modality == "image"


def make(name: str, **kwargs) -> SSLMethod:
    torch.manual_seed(0)
    if is_image(name):
        kwargs.setdefault("backbone", small_backbone(REGISTRY[name]))
    return REGISTRY[name].build(size="small", warmup_epochs=0, **kwargs)


def data(n: int = 24, batch: int = 8, name: str = "simclr") -> pl.LightningDataModule:
    if not is_image(name):
        return ExampleViewsDataModule(REGISTRY[name], num_samples=n, batch_size=batch)
    return RandomTwoViews(num_samples=n, batch_size=batch, image_size=SIZE)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(**{"max_epochs": 1, "default_root_dir": tmp_path, **kwargs})


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


# ----------------------------------------------------------------------------- the registry
def test_every_exported_method_is_registered_and_every_registered_method_exported():
    exported = {
        obj
        for name in lightning_ssl.__all__
        if inspect.isclass(obj := getattr(lightning_ssl, name)) and issubclass(obj, SSLMethod) and obj is not SSLMethod
    }
    registered = {entry.cls for entry in REGISTRY.values()}
    assert exported - registered == set(), "exported but not in lightning_ssl.REGISTRY"
    assert registered - exported == set(), "registered but not exported by lightning_ssl"


@pytest.mark.parametrize("name", NAMES)
def test_every_method_has_its_configs(name):
    for dataset in REGISTRY[name].configs:
        path = REPO / "configs" / f"{name}_{dataset}.yaml"
        assert path.is_file(), f"missing {path.name}"
        class_path = yaml.safe_load(path.read_text())["model"]["class_path"]
        assert class_path == f"lightning_ssl.{REGISTRY[name].cls.__name__}", path.name


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", NAMES)
def test_fit_a_few_steps_with_finite_loss_and_its_callbacks(tmp_path, name):
    model, rec = make(name), LossRecorder()
    t = trainer(tmp_path, max_steps=3, callbacks=[rec])
    t.fit(model, data(name=name))
    assert t.global_step == 3 and len(rec.losses) == 3
    assert all(torch.isfinite(torch.tensor(rec.losses)))
    kinds = {type(c) for c in t.callbacks}
    assert (EMAUpdate in kinds) == isinstance(model, HasEMATargets)
    assert (QueueUpdate in kinds) == isinstance(model, HasQueue)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_round_trip(tmp_path, name):
    named = REGISTRY[name].named_backbone
    model = make(name, **named, lr=0.05)
    t = trainer(tmp_path, max_steps=1)
    t.fit(model, data(n=8, name=name))
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    loaded = type(model).load_from_checkpoint(path)
    assert dict(loaded.hparams) == dict(model.hparams)
    assert loaded.hparams.lr == 0.05 and loaded.hparams.backbone == named["backbone"]
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_an_epoch_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, name):
    """Online and EMA networks, queue and pointer, optimizer state: a 2-epoch run resumed from its
    epoch-1 checkpoint ends exactly where the 2-epoch run ends (random streams included)."""
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=-1, every_n_epochs=1)
    straight = make(name)
    t1 = trainer(tmp_path / "a", max_epochs=2, callbacks=[every_epoch], enable_checkpointing=True)
    t1.fit(straight, data(name=name))
    resumed = make(name)
    t2 = trainer(tmp_path / "b", max_epochs=2)
    t2.fit(resumed, data(name=name), ckpt_path=tmp_path / "ckpts" / "epoch=0-step=3.ckpt")
    assert t2.global_step == 6
    for (key, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)
    opt_a, opt_b = t1.optimizers[0].state_dict()["state"], t2.optimizers[0].state_dict()["state"]
    for index, state in opt_a.items():
        for key, value in state.items():
            torch.testing.assert_close(value, opt_b[index][key], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- speed contracts
class ReadyViews(torch.utils.data.Dataset):
    """Ready-made view pairs: loading makes no tensor operation the counter could see."""

    def __init__(self, n: int = 32, name: str = "simclr"):
        gen = torch.Generator().manual_seed(0)
        if is_image(name):
            self.views = torch.randn(2, n, 3, SIZE, SIZE, generator=gen)
        else:
            self.views = torch.stack(REGISTRY[name].example_views(n))

    def __len__(self):
        return self.views.shape[1]

    def __getitem__(self, i):
        return [self.views[0, i], self.views[1, i]], 0


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_make_no_host_sync(tmp_path, monkeypatch, name):
    """Between log steps a step calls no .item()/.tolist()/bool()/.cpu() on a tensor, in the method,
    its callbacks or Lightning, when the progress bar is off."""
    counter = SyncCounter()
    t = trainer(tmp_path, max_steps=4, log_every_n_steps=100, callbacks=[counter])
    loader = DataLoader(ReadyViews(name=name), batch_size=8)
    model = make(name)
    counter.patch(monkeypatch)
    t.fit(model, train_dataloaders=loader)
    assert counter.per_step == [0, 0, 0], counter.per_step


def step_loss(model, views):
    model.log = lambda *a, **k: None  # outside a Trainer
    out = model.training_step((views, None), 0)
    return out["loss"] if isinstance(out, dict) else out


def views(n: int = 8):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, SIZE, SIZE, generator=gen) for _ in range(2)]


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_gives_the_same_loss_and_gradients(name):
    if not is_image(name):  # a memory format of 4-d tensors: audio methods refuse it by name
        with pytest.raises(ValueError, match="channels_last"):
            make(name, channels_last=True)
        return
    plain, fast = make(name), make(name, channels_last=True)
    fast.setup("fit")
    conv = next(p for p in fast.backbone.parameters() if p.ndim == 4)  # the first convolution (a ViT's patches)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.manual_seed(2)
    a = step_loss(plain, views())
    torch.manual_seed(2)
    b = step_loss(fast, views())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.backward()
    b.backward()
    # float32 rounding in a gradient that is exactly 0 (a conv bias before BN) scales with the gradients
    # around it: the absolute tolerance is relative to the model's largest gradient (Barlow Twins' loss,
    # a sum over D x D entries, has gradients ~20x those of the contrastive losses)
    scale = max(1.0, max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None))
    for (key, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_mixed_training_is_close_to_float32(tmp_path, name):
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        rec = LossRecorder()
        trainer(tmp_path, max_steps=2, precision=precision, callbacks=[rec]).fit(make(name), data(n=16, name=name))
        losses[precision] = torch.tensor(rec.losses)
    assert torch.isfinite(losses["bf16-mixed"]).all()
    # NNCLR's positive is an argmax over the support set: bf16 rounding of an embedding (~0.4%) picks another
    # neighbour where two cosine similarities are that close (common in a small random support set), a jump
    # of the loss rather than a rounding error, so its bound is looser.
    tol = {"rtol": 0.1, "atol": 0.1} if name in NEAREST_NEIGHBOUR_POSITIVES else {"rtol": 0.03, "atol": 0.02}
    torch.testing.assert_close(losses["bf16-mixed"], losses["32-true"], **tol)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", NAMES)
def test_exported_and_loaded_encoder_compute_the_representation(tmp_path, name):
    """``load_encoder(ckpt)`` gives the method's evaluation features, and ``lightning-ssl export``
    writes the backbone as a torchvision state_dict that loads with strict=True."""
    model = make(name, **REGISTRY[name].named_backbone)
    t = trainer(tmp_path, max_steps=2)
    t.fit(model, data(n=16, name=name))
    ckpt = tmp_path / "m.ckpt"
    t.save_checkpoint(ckpt)
    x = torch.randn(2, 3, SIZE, SIZE) if is_image(name) else REGISTRY[name].example_views(2, seed=3)[0]
    encoder, dim = load_encoder(ckpt)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(x), model.representation(x), atol=1e-5, rtol=1e-5)
    assert dim == model.feature_dim
    if not is_image(name):  # the audio encoder (convolutions and GRU) as a plain state_dict
        state = torch.load(export_backbone(ckpt, tmp_path / "encoder.pt"), weights_only=True)
        rebuilt = CPCAudioEncoder(**model.encoder_spec()["audio_encoder"])
        rebuilt.load_state_dict(state, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt.eval()(x), model.representation(x), atol=1e-5, rtol=1e-5)
        return
    state = torch.load(export_backbone(ckpt, tmp_path / "encoder.pt"), weights_only=True)
    arch = REGISTRY[name].named_backbone["backbone"]
    tv = torchvision_model(arch, small_image=True)
    if model.encoder_spec()["layer_norm"]:
        tv = batch_norm_to_layer_norm(tv)
    tv.load_state_dict(state, strict=True)
    assert isinstance(
        tv, torchvision.models.VisionTransformer if REGISTRY[name].vit_only else torchvision.models.ResNet
    )
    # the export loads back (its sidecar: stem, norm layers, CPC's patch grid, pooling) to the same features
    exported, _ = load_encoder(tmp_path / "encoder.pt", arch=arch)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x), model.representation(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if is_image(n)])  # audio methods take one view
def test_both_view_batching_modes_train_and_agree_without_batch_statistics(tmp_path, name):
    """``view_batching="concat"`` (one forward over all views) and ``"per_view"`` both train; with batch
    norm on its running statistics (eval mode) they compute the same loss: concatenation changes only
    which images batch statistics are taken over."""
    for mode in ("concat", "per_view"):
        rec = LossRecorder()
        trainer(tmp_path, max_steps=2, callbacks=[rec]).fit(make(name, view_batching=mode), data(n=16))
        assert len(rec.losses) == 2 and all(torch.isfinite(torch.tensor(rec.losses)))
    concat, per_view = make(name, view_batching="concat").eval(), make(name, view_batching="per_view").eval()
    torch.manual_seed(2)
    a = step_loss(concat, views())
    torch.manual_seed(2)
    b = step_loss(per_view, views())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
