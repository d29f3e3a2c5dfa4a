"""Online probe, kNN, offline linear evaluation, fine-tuning subsets, and backbone export/import."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from helpers import RandomTwoViews, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ssl import MoCoV2, SimCLR, build_backbone
from lightning_ssl.callbacks import KNNMonitor, OnlineLinearProbe
from lightning_ssl.cli import main as cli_main
from lightning_ssl.evaluation import (
    EncoderChangedError,
    FineTuning,
    LinearEvaluation,
    export_backbone,
    knn_accuracy,
    labeled_fraction_subset,
    load_encoder,
    load_torchvision_model,
    weighted_knn_predict,
)

NUM_CLASSES, DIM = 4, 8


def separable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose classes are well-separated Gaussian blobs (linearly separable)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.eye(DIM)[:NUM_CLASSES] * 6
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    return means[y] + 0.5 * torch.randn(len(y), DIM, generator=gen), y


class ToyMethod(pl.LightningModule):
    """A stand-in SSL method: a backbone with BN, a representation, and a training step that does
    no optimization of its own (returns None), so any change to the backbone would be the probe's."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(DIM, DIM), nn.BatchNorm1d(DIM), nn.ReLU())
        with torch.no_grad():
            self.backbone[0].weight.copy_(torch.eye(DIM) + 0.05 * torch.randn(DIM, DIM))
            self.backbone[0].bias.fill_(3.0)
        self.feature_dim = DIM

    def representation(self, x, backbone=None):
        return (backbone or self.backbone)(x)

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class ToyData(pl.LightningDataModule):
    def __init__(self, unlabeled_fraction: float = 0.25):
        super().__init__()
        self.train_x, self.train_y = separable(64, seed=1)
        self.train_y_batches = self.train_y.clone()
        self.train_y_batches[:: int(1 / unlabeled_fraction)] = -1  # some examples carry no label
        self.val_x, self.val_y = separable(32, seed=2)

    def train_dataloader(self):
        class Views(TensorDataset):
            def __getitem__(self, i):
                x, y = super().__getitem__(i)
                return [x, x + 0.1], y

        return DataLoader(Views(self.train_x, self.train_y_batches), batch_size=32, shuffle=True)

    def labeled_dataloader(self, split):
        x, y = (self.train_x, self.train_y) if split == "train" else (self.val_x, self.val_y)
        return DataLoader(TensorDataset(x, y), batch_size=50)


def _trainer(epochs, **kwargs):
    return quiet_trainer(
        max_epochs=epochs,
        **kwargs,
    )


def test_probe_learns_separable_features_and_never_touches_the_backbone(tmp_path):
    model, dm = ToyMethod(), ToyData()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # parameters and BN statistics
    probe = OnlineLinearProbe(num_classes=NUM_CLASSES, lr=0.05)
    trainer = _trainer(8, callbacks=[probe])
    trainer.fit(model, datamodule=dm)
    assert probe.last_metrics["top1"] >= 0.99
    assert probe.last_metrics["top5"] == 1.0
    assert trainer.callback_metrics["probe/top1"] >= 0.99
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the probe changed backbone tensor {k}"
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())

    # checkpoint round trip: a fresh probe restores the weights and optimizer state
    path = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][probe.state_key]
    restored = OnlineLinearProbe(num_classes=NUM_CLASSES)
    restored.load_state_dict(state)
    restored._ensure_probe(DIM, torch.device("cpu"))
    assert torch.equal(restored.probe.weight, probe.probe.weight)
    assert restored.optimizer.state_dict()["state"][0]["step"] == probe.optimizer.state_dict()["state"][0]["step"]


def test_probe_resumes_from_checkpoint_through_the_trainer(tmp_path):
    dm = ToyData()
    probe = OnlineLinearProbe(num_classes=NUM_CLASSES, lr=0.05)
    trainer = _trainer(2, callbacks=[probe])
    trainer.fit(ToyMethod(), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    weights = probe.probe.weight.clone()
    resumed = OnlineLinearProbe(num_classes=NUM_CLASSES, lr=0.05, seed=123)  # different init
    captured = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            captured["w"] = resumed.probe.weight.clone()

    _trainer(3, callbacks=[resumed, Capture()]).fit(ToyMethod(), datamodule=dm, ckpt_path=tmp_path / "a.ckpt")
    assert torch.equal(captured["w"], weights)


def test_knn_tight_clusters_ties_and_large_k():
    centers = torch.randn(5, 16)
    train_y = torch.arange(5).repeat_interleave(10)
    train_x = centers[train_y] + 1e-3 * torch.randn(50, 16)
    test_y = torch.arange(5).repeat_interleave(4)
    test_x = centers[test_y] + 1e-3 * torch.randn(20, 16)
    assert torch.equal(weighted_knn_predict(train_x, train_y, test_x, 5, k=5), test_y)
    # k larger than the training set: all of it votes, no error; clusters still win
    assert torch.equal(weighted_knn_predict(train_x, train_y, test_x, 5, k=1000), test_y)
    # an exact tie (one neighbor of each class at the same similarity): the smaller class index
    tie_train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pred = weighted_knn_predict(tie_train, torch.tensor([3, 1]), torch.tensor([[1.0, 1.0]]), 4, k=2)
    assert pred.tolist() == [1]


def _linear_data():
    x, y = separable(32, seed=3)
    images = x.view(-1, 2, 2, 2).repeat_interleave(4, -1).repeat_interleave(4, -2)[:, :1].expand(-1, 3, -1, -1)
    return DataLoader(TensorDataset(images.contiguous(), y), batch_size=16, shuffle=True)


def test_linear_evaluation_keeps_the_encoder_frozen(tiny_backbone):
    encoder, _ = build_backbone(tiny_backbone)
    loader = _linear_data()
    model = LinearEvaluation(encoder, num_classes=NUM_CLASSES, lr=0.5)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    trainer = _trainer(2)
    trainer.fit(model, loader, loader)  # passes the check at the end
    assert model.encoder.training is False
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k])
    assert "val/top1" in trainer.callback_metrics and "val/top5" in trainer.callback_metrics


def test_linear_evaluation_fails_loudly_if_an_encoder_weight_changed(tiny_backbone):
    encoder, _ = build_backbone(tiny_backbone)
    model = LinearEvaluation(encoder, num_classes=NUM_CLASSES)

    class Tamper(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.encoder.module.net[0].weight[0, 0, 0, 0] += 1e-3

    with pytest.raises(EncoderChangedError, match=r"module\.net\.0\.weight"):
        _trainer(1, callbacks=[Tamper()]).fit(model, _linear_data())


def test_finetuning_trains_the_encoder_and_fraction_subsets(tiny_backbone):
    encoder, _ = build_backbone(tiny_backbone)
    before = encoder.module.net[0].weight.clone()
    model = FineTuning(encoder, num_classes=NUM_CLASSES, lr=0.1)
    _trainer(1).fit(model, _linear_data())
    assert not torch.equal(encoder.module.net[0].weight, before)
    labels = torch.arange(10).repeat_interleave(100)
    one = labeled_fraction_subset(labels, 0.01)
    ten = labeled_fraction_subset(labels, 0.1)
    assert len(one) == 10 and torch.equal(labels[one].bincount(), torch.ones(10, dtype=torch.long))
    assert len(ten) == 100 and torch.equal(ten, labeled_fraction_subset(labels, 0.1))
    with pytest.raises(ValueError, match="fraction"):
        labeled_fraction_subset(labels, 10)


class _ModeSpy(pl.Callback):
    """The number of the module's submodules in eval mode at each training step."""

    def __init__(self):
        self.eval_modules: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.eval_modules.append(sum(not m.training for m in pl_module.modules()))


def test_finetuning_trains_an_encoder_passed_in_eval_mode_in_train_mode():
    """An encoder left in eval mode (after feature extraction, say) is fine-tuned in train mode: batch norm
    on batch statistics (its running statistics updated), not frozen at the pretraining ones."""
    encoder, _ = build_backbone("resnet18", small_image=True)
    encoder.eval()
    bn = encoder.module.bn1
    before = bn.running_mean.clone()
    spy = _ModeSpy()
    _trainer(1, callbacks=[spy]).fit(FineTuning(encoder, num_classes=NUM_CLASSES, lr=0.01), _linear_data())
    assert spy.eval_modules and set(spy.eval_modules) == {0}
    assert not torch.equal(bn.running_mean, before)


def _randomize_bn(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _checkpoint(method, path):
    torch.save({"state_dict": method.state_dict(), "hyper_parameters": dict(method.hparams)}, path)
    return path


@pytest.mark.parametrize("method_cls,arch", [(MoCoV2, "resnet18"), (SimCLR, "resnet50")])
def test_export_import_round_trip_into_torchvision(tmp_path, method_cls, arch):
    method = method_cls(backbone=arch)
    with torch.no_grad():  # make the momentum/target encoder differ from the online one
        for name, p in method.named_parameters():
            if not name.startswith("backbone."):
                p.add_(0.01)
    _randomize_bn(method.backbone)
    ckpt = _checkpoint(method, tmp_path / "m.ckpt")
    out = tmp_path / f"{arch}.pt"
    cli_main(["export", str(ckpt), str(out)])

    state = torch.load(out, weights_only=True)
    tv = torchvision.models.get_model(arch, weights=None)
    tv.load_state_dict(state, strict=True)
    assert list(state) == list(tv.state_dict())
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    method.eval(), tv.eval()
    with torch.no_grad():
        expected = method.representation(x)
        assert torch.allclose(tv(x), expected, atol=1e-5)
        # the reverse: start from the exported torchvision file
        imported, dim = build_backbone(arch, weights_path=out)
        assert torch.allclose(imported.eval()(x), expected, atol=1e-5)
        assert dim == method.feature_dim
        # and evaluation loads the encoder from the checkpoint or the exported file alike
        for source, kwargs in ((ckpt, {}), (out, {"arch": arch})):
            encoder, _ = load_encoder(source, **kwargs)
            assert torch.allclose(encoder.eval()(x), expected, atol=1e-5)


def test_start_ssl_from_torchvision_weights_file(tmp_path):
    supervised = torchvision.models.resnet18()
    _randomize_bn(supervised)
    torch.save(supervised.state_dict(), tmp_path / "sup.pt")
    encoder, _ = build_backbone("resnet18", weights_path=tmp_path / "sup.pt")
    method = SimCLR(backbone=load_torchvision_model("resnet18", tmp_path / "sup.pt"))
    assert torch.equal(method.backbone.module.layer4[1].conv2.weight, supervised.layer4[1].conv2.weight)
    x = torch.randn(2, 3, 64, 64)
    supervised.fc = nn.Identity()
    with torch.no_grad():
        expected = supervised.eval()(x)
        assert torch.allclose(encoder.eval()(x), expected, atol=1e-5)
        assert torch.allclose(method.eval().representation(x), expected, atol=1e-5)
    # the method's checkpoint exports back to torchvision once told the architecture
    ckpt = _checkpoint(method, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="--arch"):
        export_backbone(ckpt, tmp_path / "o.pt")
    cli_main(["export", str(ckpt), str(tmp_path / "o.pt"), "--arch", "resnet18"])
    tv = torchvision.models.resnet18()
    tv.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True), strict=True)
    assert torch.equal(tv.layer4[1].conv2.weight, supervised.layer4[1].conv2.weight)


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        export_backbone(tmp_path / "missing.ckpt", tmp_path / "o.pt")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="arch="):
        load_encoder(tmp_path / "plain.pt")


# ----------------------------------------------------------------------------- distributed (gloo, 2 processes)
def _ddp_worker(rank_: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lightning_ssl.evaluation.knn import extract_features

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank_, world_size=world)
    try:
        x, y = separable(8, seed=5)  # 32 examples; each process gets a different half, some unlabeled
        y_batch = y.clone()
        y_batch[rank_::3] = -1
        half = slice(rank_ * 16, (rank_ + 1) * 16)
        model = ToyMethod(seed=0)
        torch.manual_seed(100 + rank_)  # different seeds: the probe must still hold one set of weights
        probe = OnlineLinearProbe(num_classes=NUM_CLASSES, lr=0.1, seed=0)
        for _ in range(3):
            probe.train_step(model, x[half], y_batch[half])
        # kNN features: 7 examples over 2 processes (uneven shards), gathered in dataset order
        loader = DataLoader(TensorDataset(torch.arange(7.0).unsqueeze(1).repeat(1, 3), torch.arange(7)), batch_size=2)
        feats, labels = extract_features(lambda t: t * 2, loader, "cpu")
        torch.save(
            {"w": probe.probe.weight, "b": probe.probe.bias, "feats": feats, "labels": labels},
            f"{out_dir}/rank{rank_}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_probe_and_knn_features_under_ddp(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["b"], r1["b"])  # one set of weights
    # equal to one process holding both halves (the union of the labeled examples)
    x, y = separable(8, seed=5)
    y_batch = y.clone()
    idx = torch.arange(32)
    y_batch[(idx < 16) & (idx % 3 == 0)] = -1  # what rank 0 masked in its half
    y_batch[(idx >= 16) & (idx % 3 == 1)] = -1  # and rank 1 in its half
    single = OnlineLinearProbe(num_classes=NUM_CLASSES, lr=0.1, seed=0)
    model = ToyMethod()
    for _ in range(3):
        single.train_step(model, x, y_batch)
    assert torch.allclose(single.probe.weight, r0["w"], atol=1e-5)
    assert torch.equal(r0["labels"], torch.arange(7)) and torch.equal(r1["labels"], torch.arange(7))
    assert torch.equal(r0["feats"], torch.arange(7.0).unsqueeze(1).repeat(1, 3) * 2)


def test_calibrated_random_baseline_changes_only_normalization_statistics():
    """The random-init baseline's BN running statistics are recomputed on training images; every weight
    (and every other buffer) is the freshly initialized one; the statistics match the data."""
    model = SimCLR(backbone="resnet18", small_image=True, projection_dim=8)
    plain = model.random_init_backbone(seed=3)
    images = torch.rand(64, 3, 16, 16) * 4 + 2  # far from the initial statistics (mean 0, variance 1)
    loader = DataLoader(TensorDataset(images, torch.zeros(64)), batch_size=16)
    calibrated = model.random_init_backbone(seed=3, calibrate_on=loader)
    assert not calibrated.training
    before, after = plain.state_dict(), calibrated.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), calibrated.parameters()))
    bn1 = calibrated.module.bn1  # its statistics are those of conv1's outputs on the images (all 64 of them)
    with torch.no_grad():
        out = calibrated.module.conv1(images)
    torch.testing.assert_close(bn1.running_mean, out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn1.momentum == 0.1  # restored


def test_knn_report_uses_the_calibrated_baseline(tmp_path, monkeypatch):
    calls = []
    original = SimCLR.random_init_backbone

    def spy(self, seed=0, calibrate_on=None, max_images=5000):
        calls.append(calibrate_on)
        return original(self, seed, calibrate_on, max_images)

    monkeypatch.setattr(SimCLR, "random_init_backbone", spy)
    monitor = KNNMonitor(every_n_epochs=0)
    _trainer(1, callbacks=[monitor]).fit(
        SimCLR(backbone="resnet18", projection_dim=8, warmup_epochs=0), RandomTwoViews(num_samples=16, batch_size=8)
    )
    assert calls and calls[0] is not None and "random_init" in monitor.results


def test_knn_rows_that_would_use_every_label_are_left_out():
    """``labels_per_class`` of at least the largest class's count is the "all" row again: no entry."""
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(30, 4, generator=g), torch.randn(10, 4, generator=g)
    train_y = torch.tensor([0] * 12 + [1] * 10 + [2] * 8)  # the largest class has 12
    val_y = torch.arange(10) % 3
    scores = knn_accuracy(train, train_y, val, val_y, k=5, labels_per_class=[1, 11, 12, 100])
    assert list(scores) == ["all", "1_per_class", "11_per_class"]
    full = weighted_knn_predict(train, train_y, val, 3, 5, 0.1)
    assert scores["all"] == (full == val_y).float().mean().item()


@pytest.mark.parametrize("small_image, cls_name", [(True, "SimCLR"), (False, "SimCLR"), (True, "CPCv2")])
def test_export_prints_loading_lines_that_load_it(tmp_path, capsys, small_image, cls_name):
    """The export message names the torchvision constructor and the stem or norm changes the file
    needs; run verbatim, its lines load the file with strict=True and give the method's features."""
    import lightning_ssl
    from lightning_ssl.patches import PatchGridEncoder

    grid = dict(patch_size=16, patch_stride=8) if cls_name == "CPCv2" else {}
    method = getattr(lightning_ssl, cls_name)(backbone="resnet18", small_image=small_image, **grid)
    if cls_name == "SimCLR":
        _randomize_bn(method.backbone)
    out = tmp_path / "enc.pt"
    cli_main(["export", str(_checkpoint(method, tmp_path / "m.ckpt")), str(out)])
    printed = capsys.readouterr().out
    assert "torchvision.models.resnet18()" in printed
    assert ("model.maxpool = torch.nn.Identity()" in printed) is small_image
    code = printed.split("load it with:\n", 1)[1].split("\nor:", 1)[0]
    namespace = {"torch": torch, "torchvision": torchvision, "lightning_ssl": lightning_ssl}
    exec("import lightning_ssl.backbones\n" + "\n".join(line.strip() for line in code.splitlines()), namespace)  # noqa: S102
    model = namespace["model"]
    model.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    method.eval(), model.eval()
    with torch.no_grad():
        if cls_name == "CPCv2":
            features = PatchGridEncoder(model, method.patch_size, method.patch_stride, method.grid_size)(x)
        else:
            features = model(x)
        torch.testing.assert_close(features, method.representation(x), atol=1e-5, rtol=1e-5)
