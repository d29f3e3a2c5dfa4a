"""ViT evaluation and export: pooled patch tokens (``pool="mean"``) in the encoder spec, timm exports that
load with strict=True into ``timm.create_model(name, num_classes=0)``, torchvision ViT exports with a fixed
position embedding, ``ViTFineTuning`` (layer decay, weight decay, drop path, MAE's head, schedule, training),
and Mixup/CutMix against plain loops."""

from __future__ import annotations

import importlib.util
import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyConvNet
from helpers import RandomTwoViews, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ssl import DINO
from lightning_ssl.backbones import PooledBackbone, ViTBackbone, build_backbone, token_features
from lightning_ssl.cli import main as cli_main
from lightning_ssl.evaluation import (
    FineTuning,
    LinearEvaluation,
    MeanPooledTimmViT,
    MeanPooledViT,
    Mixup,
    ViTFineTuning,
    export_backbone,
    load_encoder,
    pooled_encoder,
)
from lightning_ssl.evaluation.export import encoder_sidecar
from lightning_ssl.evaluation.mixup import box_lambda, cutmix_box, smooth_one_hot

TIMM_NAME = "vit_tiny_patch16_224"
TIMM_SPEC = {"backbone": f"timm:{TIMM_NAME}", "small_image": False, "layer_norm": False, "patch_grid": None}


def tiny_vit(seed: int = 0) -> torchvision.models.VisionTransformer:
    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def tiny_timm_vit(seed: int = 0) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=0,
        dynamic_img_size=True,
    )


class MeanPoolDINO(DINO):
    """DINO evaluated on the mean of its teacher's patch tokens, as MAE and I-JEPA are evaluated."""

    def representation(self, images, backbone=None):
        return token_features(self.backbone_ema if backbone is None else backbone, images)[1].mean(dim=1)

    def encoder_spec(self) -> dict:
        return {**super().encoder_spec(), "pool": "mean"}


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """``(method, cls_ckpt, mean_ckpt)``: a timm ViT trained one step in DINO. ``mean_ckpt`` as MeanPoolDINO
    writes it (its spec says ``pool="mean"``); ``cls_ckpt`` the same weights with DINO's own spec (no pool)."""
    pytest.importorskip("timm")
    tmp = tmp_path_factory.mktemp("timm_dino")
    torch.manual_seed(0)
    method = MeanPoolDINO(
        backbone=f"timm:{TIMM_NAME}", out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, warmup_epochs=0
    )
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp)
    trainer.fit(method, RandomTwoViews(num_samples=4, batch_size=4, image_size=32))
    mean_ckpt, cls_ckpt = tmp / "mean.ckpt", tmp / "cls.ckpt"
    trainer.save_checkpoint(mean_ckpt)
    ckpt = torch.load(mean_ckpt, weights_only=False)
    assert ckpt["encoder_spec"]["pool"] == "mean"
    ckpt["encoder_spec"] = DINO.encoder_spec(method)
    ckpt["method"] = f"{DINO.__module__}.{DINO.__qualname__}"
    torch.save(ckpt, cls_ckpt)
    return method.eval(), cls_ckpt, mean_ckpt


def _printed_loading_lines(capsys) -> tuple[str, list[str]]:
    printed = capsys.readouterr().out
    return printed, [line.strip() for line in printed.split("load it with:\n", 1)[1].split("\nor:", 1)[0].splitlines()]


# ----------------------------------------------------------------------------- timm export, class token
def test_timm_export_loads_strictly_into_timm_and_gives_the_representation(tmp_path, capsys, timm_run):
    import timm

    method, ckpt, _ = timm_run
    out = tmp_path / "vit_tiny.pt"
    cli_main(["export", str(ckpt), str(out)])
    printed, lines = _printed_loading_lines(capsys)
    assert f"timm.create_model({TIMM_NAME!r}, pretrained=False, num_classes=0)" in printed

    state = torch.load(out, weights_only=True)
    plain = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0)
    plain.load_state_dict(state, strict=True)
    assert list(state) == list(plain.state_dict())  # no `module.` prefix, no classifier
    teacher = method.backbone_ema.module.state_dict()  # DINO evaluates its teacher
    assert all(torch.equal(state[k], v) for k, v in teacher.items())
    assert json.loads(encoder_sidecar(out).read_text())["pool"] == "cls"

    x = torch.randn(2, 3, 224, 224)  # the plain model's own input size
    plain.eval()
    with torch.no_grad():
        expected = DINO.representation(method, x)  # the teacher's class token
        torch.testing.assert_close(plain.forward_features(x)[:, 0], expected, atol=1e-5, rtol=1e-5)
        # the printed lines, run verbatim, load the file with strict=True
        namespace = {"torch": torch}
        exec("\n".join(lines), namespace)  # noqa: S102
        torch.testing.assert_close(namespace["model"].eval()(x), expected, atol=1e-5, rtol=1e-5)
        # evaluation rebuilds the encoder from the checkpoint or the file (its sidecar names the timm model)
        small = torch.randn(2, 3, 32, 32)
        for source in (ckpt, out):
            encoder, dim = load_encoder(source)
            assert dim == 192 and type(encoder) is PooledBackbone
            torch.testing.assert_close(encoder.eval()(small), DINO.representation(method, small), atol=1e-5, rtol=1e-5)
        # a plain timm state_dict (no sidecar) with its classifier, named by arch
        torch.save({**state, "head.weight": torch.randn(10, 192), "head.bias": torch.zeros(10)}, tmp_path / "plain.pt")
        encoder, _ = load_encoder(tmp_path / "plain.pt", arch=f"timm:{TIMM_NAME}")
        torch.testing.assert_close(encoder.eval()(small), DINO.representation(method, small), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- timm export, pooled patch tokens
def test_mean_pooled_spec_exports_loads_and_evaluates_on_the_patch_tokens(tmp_path, capsys, timm_run):
    import timm

    method, _, ckpt = timm_run
    out = tmp_path / "vit_tiny_mean.pt"
    cli_main(["export", str(ckpt), str(out)])
    printed, _ = _printed_loading_lines(capsys)
    assert "model.forward_features(images)[:, model.num_prefix_tokens:].mean(1)" in printed
    assert json.loads(encoder_sidecar(out).read_text())["pool"] == "mean"

    plain = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0)
    plain.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x, small = torch.randn(2, 3, 224, 224), torch.randn(3, 3, 32, 32)
    plain.eval()
    with torch.no_grad():
        tokens = plain.forward_features(x)
        n = tokens.shape[1]
        naive = torch.stack([sum(tokens[b, i] for i in range(1, n)) / (n - 1) for b in range(2)])
        torch.testing.assert_close(naive, method.representation(x), atol=1e-5, rtol=1e-5)
        teacher_cls = DINO.representation(method, small)
        for source in (ckpt, out):
            encoder, _ = load_encoder(source)
            assert isinstance(encoder, MeanPooledTimmViT)
            torch.testing.assert_close(encoder.eval()(small), method.representation(small), atol=1e-5, rtol=1e-5)
            cls_encoder, _ = load_encoder(source, pool="cls")  # overridden: the class token
            torch.testing.assert_close(cls_encoder.eval()(small), teacher_cls, atol=1e-5, rtol=1e-5)
        # a sidecar of an earlier release has no pool: the class token
        sidecar = json.loads(encoder_sidecar(out).read_text())
        del sidecar["pool"]
        encoder_sidecar(out).write_text(json.dumps(sidecar))
        encoder, _ = load_encoder(out)
        assert type(encoder) is PooledBackbone
    with pytest.raises(ValueError, match="pool must be one of 'cls', 'mean'"):
        load_encoder(ckpt, pool="avg")

    assert LinearEvaluation(ckpt, num_classes=3).pool == "mean"
    assert LinearEvaluation(ckpt, num_classes=3, pool="cls").pool == "cls"
    assert FineTuning(ckpt, num_classes=3, pool="cls").pool == "cls"
    # fine-tuning from the checkpoint takes its pooling: MAE's head (fc_norm, no final norm in the encoder)
    tuned = ViTFineTuning(ckpt, num_classes=3)
    assert tuned.pool == "mean" and isinstance(tuned.head.fc_norm, nn.LayerNorm)
    assert isinstance(tuned.encoder.module.norm, nn.Identity)
    # the same network as timm's own global_pool="avg" (MAE's global_pool: no final norm, fc_norm, head)
    with torch.device("meta"):  # every tensor is assigned below
        reference = timm.create_model(
            TIMM_NAME, pretrained=False, num_classes=3, global_pool="avg", dynamic_img_size=True
        )
    head = {f"fc_norm.{k}": v for k, v in tuned.head.fc_norm.state_dict().items()}
    head.update({f"head.{k}": v for k, v in tuned.head.fc.state_dict().items()})
    reference.load_state_dict({**tuned.encoder.module.state_dict(), **head}, strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(tuned.eval()(small), reference.eval()(small), atol=1e-5, rtol=1e-5)


def _save_timm_checkpoint(backbone: nn.Module, path) -> None:
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {}, "encoder_spec": TIMM_SPEC}, path)


def test_timm_missing_names_the_extra(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    _save_timm_checkpoint(build_backbone(f"timm:{TIMM_NAME}")[0], tmp_path / "m.ckpt")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"lightning-ssl\[timm\]"):
        export_backbone(tmp_path / "m.ckpt", tmp_path / "o.pt")
    with pytest.raises(ImportError, match=r"lightning-ssl\[timm\]"):
        load_encoder(tmp_path / "m.ckpt")


def test_timm_export_stops_on_a_position_embedding_outside_the_state_dict(tmp_path):
    pytest.importorskip("timm")
    backbone, _ = build_backbone(f"timm:{TIMM_NAME}")
    fixed = backbone.module.pos_embed.detach().clone()
    del backbone.module.pos_embed
    backbone.module.register_buffer("pos_embed", fixed, persistent=False)  # not saved: cannot be exported
    _save_timm_checkpoint(backbone, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match=r"missing \['pos_embed'\].*persistent buffer"):
        export_backbone(tmp_path / "m.ckpt", tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


# ----------------------------------------------------------------------------- torchvision ViT export
@pytest.mark.slow  # writes two ViT-B/16 files (~350 MB); the contract tests export ViT-Ti in the default run
def test_torchvision_vit_export_has_torchvision_keys_with_a_fixed_position_embedding(tmp_path):
    """A method may replace the position embedding by a fixed table (a buffer) and freeze the patch
    projection (MAE, MoCo v3): the export still has exactly torchvision's vit_b_16 keys and shapes."""
    backbone, _ = build_backbone("vit_b_16")
    enc = backbone.module.encoder
    n, dim = enc.pos_embedding.shape[1:]
    position = torch.arange(n, dtype=torch.float32)[:, None]
    frequency = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) * (9.2103 / dim))
    table = torch.cat([torch.sin(position * frequency), torch.cos(position * frequency)], dim=1)[None]
    del enc.pos_embedding
    enc.register_buffer("pos_embedding", table)
    backbone.module.conv_proj.requires_grad_(False)
    spec = {"backbone": "vit_b_16", "small_image": False, "layer_norm": False, "patch_grid": None}
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": "vit_b_16"}, "encoder_spec": spec}, ckpt)
    out = export_backbone(ckpt, tmp_path / "vit_b_16.pt")

    exported = torch.load(out, weights_only=True)
    tv = torchvision.models.vit_b_16()
    reference = tv.state_dict()
    assert list(exported) == list(reference)
    assert all(exported[k].shape == reference[k].shape for k in reference)
    tv.load_state_dict(exported, strict=True)
    assert torch.equal(tv.encoder.pos_embedding, table)
    assert {"heads.head.weight", "heads.head.bias"} <= set(exported)  # torchvision's (random) classifier
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    with torch.no_grad():
        encoder, dim = load_encoder(ckpt)
        assert type(encoder) is ViTBackbone and dim == 768
        torch.testing.assert_close(encoder.eval()(x), backbone(x))
        mean, _ = load_encoder(out, arch="vit_b_16", pool="mean")
        assert isinstance(mean, MeanPooledViT)
        torch.testing.assert_close(mean.eval()(x), backbone.tokens(x)[:, 1:].mean(dim=1))


# ----------------------------------------------------------------------------- pooling choice
def test_pooled_encoder_shares_weights_and_rejects_what_it_cannot_pool():
    backbone, _ = build_backbone(tiny_vit())
    x = torch.randn(3, 3, 16, 16)
    mean = pooled_encoder(backbone, "mean")
    assert mean.module is backbone.module and list(mean.state_dict()) == list(backbone.state_dict())
    assert pooled_encoder(mean, "mean") is mean and pooled_encoder(backbone, "cls") is backbone
    backbone.eval()
    with torch.no_grad():
        tokens = backbone.tokens(x)
        naive = torch.stack([tokens[b, 1:].sum(dim=0) / (tokens.shape[1] - 1) for b in range(3)])
        torch.testing.assert_close(mean(x), naive)
        torch.testing.assert_close(pooled_encoder(mean, "cls")(x), tokens[:, 0])
    probe = LinearEvaluation(backbone, num_classes=3, pool="mean")
    assert isinstance(probe.encoder, MeanPooledViT) and probe.feature_dim == 32
    assert LinearEvaluation(backbone, num_classes=3).encoder is backbone  # a module is used as it is
    cnn, _ = build_backbone(TinyConvNet())
    assert pooled_encoder(cnn, "cls") is cnn
    with pytest.raises(ValueError, match="pool='mean' averages the patch tokens of a ViT"):
        pooled_encoder(cnn, "mean")
    for bad in ("avg", "token"):
        with pytest.raises(ValueError, match="pool must be one of 'cls', 'mean'"):
            LinearEvaluation(backbone, num_classes=3, pool=bad)
        with pytest.raises(ValueError, match="pool must be one of 'cls', 'mean'"):
            pooled_encoder(backbone, bad)
        with pytest.raises(ValueError, match="pool must be one of 'cls', 'mean'"):
            ViTFineTuning(backbone, num_classes=3, pool=bad)


# ----------------------------------------------------------------------------- ViTFineTuning
def _naive_layer(name: str, depth: int) -> int:
    """Layer of a parameter of this module: 0 embeddings, i + 1 block i, depth + 1 the rest (final norm, head)."""
    for i in range(depth):
        if f"encoder_layer_{i}." in name or f"blocks.{i}." in name:
            return i + 1
    if any(
        key in name for key in ("conv_proj", "class_token", "pos_embedding", "patch_embed", "cls_token", "pos_embed")
    ):
        return 0
    return depth + 1


def _check_groups(model: ViTFineTuning, groups: list[dict], depth: int, peak: float) -> None:
    where = {id(p): g for g in groups for p in g["params"]}
    decay, wd = model.hparams.layer_decay, model.hparams.weight_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(where) == len(named) == sum(len(g["params"]) for g in groups)
    for name, p in named:
        group = where[id(p)]
        scale = decay ** (depth + 1 - _naive_layer(name, depth))
        assert group["initial_lr"] == pytest.approx(peak * scale), name
        exempt = name.endswith(("bias", "class_token", "pos_embedding", "cls_token", "pos_embed")) or ".ln" in name
        exempt = exempt or "norm" in name
        assert group["weight_decay"] == (0.0 if exempt else wd), name
        assert group["betas"] == (0.9, 0.999)


def _separable_images(n: int, classes: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(classes, 3, 16, 16, generator=gen)
    y = torch.arange(classes).repeat(n // classes)
    return TensorDataset(patterns[y] + 0.5 * torch.randn(len(y), 3, 16, 16, generator=gen), y)


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_finetuning_groups_drop_path_head_and_training(pool):
    backbone, _ = build_backbone(tiny_vit())
    model = ViTFineTuning(
        backbone, num_classes=4, pool=pool, base_lr=0.05, layer_decay=0.5, warmup_epochs=1, drop_path=0.2
    )
    assert model.pool == pool and not model.mixup.enabled  # Mixup/CutMix off by default
    # drop path: linear over the blocks; MAE's head
    rates = [block.drop_path.p for block in model.encoder.module.encoder.layers]
    assert rates == pytest.approx([0.0, 0.2])
    assert isinstance(model.head.fc_norm, nn.LayerNorm if pool == "mean" else nn.Identity)
    assert isinstance(model.encoder.module.encoder.ln, nn.Identity if pool == "mean" else nn.LayerNorm)
    assert model.head.fc.weight.abs().max() < 1e-4 and model.head.fc.weight.std().item() == pytest.approx(2e-5, rel=0.3)
    assert torch.equal(model.head.fc.bias, torch.zeros(4))
    x = torch.randn(2, 3, 16, 16)
    vit = model.encoder.module
    with torch.no_grad():  # by hand: patches, class token, positions, blocks, (final norm), pooling, head
        tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.class_token.expand(2, -1, -1), tokens], dim=1) + vit.encoder.pos_embedding
        for block in vit.encoder.layers:
            tokens = block.eval()(tokens)
        if pool == "mean":
            features = F.layer_norm(
                tokens[:, 1:].mean(dim=1), (32,), model.head.fc_norm.weight, model.head.fc_norm.bias, 1e-6
            )
        else:
            features = vit.encoder.ln(tokens)[:, 0]
        torch.testing.assert_close(model.eval()(x), model.head.fc(features))
    model.train()

    loader = DataLoader(_separable_images(32, 4, seed=1), batch_size=8, shuffle=True)
    losses = _Losses()
    trainer = quiet_trainer(max_epochs=8, callbacks=[losses])
    trainer.fit(model, loader)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    _check_groups(model, optimizer.param_groups, depth=2, peak=0.05 * 8 / 256)  # base_lr x B / 256
    first, last = sum(losses.losses[:4]) / 4, sum(losses.losses[-4:]) / 4
    assert last < 0.9 * first, (first, last)


def test_vit_finetuning_schedule_and_timm_groups():
    model = ViTFineTuning(tiny_timm_vit(), num_classes=3, lr=0.01, min_lr=1e-4, warmup_epochs=2)
    assert model.pool == "cls" and isinstance(model.encoder.module.norm, nn.LayerNorm)
    rates = [block.drop_path1.p for block in model.encoder.module.blocks[1:]]
    assert rates == pytest.approx([0.05, 0.1])
    assert isinstance(model.encoder.module.blocks[0].drop_path1, nn.Identity)
    groups = model.parameter_groups()
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name, layer in [
        ("encoder.module.pos_embed", 0),
        ("encoder.module.cls_token", 0),
        ("encoder.module.patch_embed.proj.weight", 0),
        ("encoder.module.blocks.0.attn.qkv.weight", 1),
        ("encoder.module.blocks.2.mlp.fc2.weight", 3),
        ("encoder.module.norm.weight", 4),
        ("head.fc.weight", 4),
    ]:
        assert where[id(named[name])]["lr_scale"] == pytest.approx(0.75 ** (4 - layer)), name
    for name, decay in [
        ("encoder.module.pos_embed", 0.0),
        ("encoder.module.cls_token", 0.0),
        ("encoder.module.blocks.0.attn.qkv.bias", 0.0),
        ("encoder.module.blocks.0.norm1.weight", 0.0),
        ("encoder.module.blocks.0.attn.qkv.weight", 0.05),
        ("head.fc.weight", 0.05),
    ]:
        assert where[id(named[name])]["weight_decay"] == decay, name

    # 2 warmup epochs of 3 steps, then a cosine to min_lr over the last 3 steps (per step, every group scaled)
    loader = DataLoader(TensorDataset(torch.randn(12, 3, 16, 16), torch.arange(12) % 3), batch_size=4)
    seen = []

    class LR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    quiet_trainer(max_epochs=3, callbacks=[LR()]).fit(model, loader)
    head_group = [i for i, g in enumerate(groups) if g["lr_scale"] == 1.0 and g["weight_decay"] > 0][0]
    head_lrs = [lrs[head_group] for lrs in seen]
    expected = [0.01 * (s + 1) / 6 for s in range(6)]
    expected += [1e-4 + (0.01 - 1e-4) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / 3)).item()) for s in range(3)]
    assert head_lrs == pytest.approx(expected)
    for lrs in seen:
        assert lrs == pytest.approx([lrs[head_group] * g["lr_scale"] for g in groups])


def test_vit_finetuning_rejects_other_encoders_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="use FineTuning"):
        ViTFineTuning(build_backbone(TinyConvNet())[0], num_classes=3)
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    ckpt = tmp_path / "r.ckpt"
    state = {f"backbone.module.{k}": v for k, v in resnet.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"backbone": "resnet18"}}, ckpt)
    with pytest.raises(ValueError, match="the encoder is a ResNet: use FineTuning"):
        ViTFineTuning(ckpt, num_classes=3)
    vit = build_backbone(tiny_vit())[0]
    for kwargs, match in [
        ({"layer_decay": 0.0}, "layer_decay"),
        ({"drop_path": 1.0}, "drop_path"),
        ({"base_lr": 0.0}, "base_lr"),
        ({"mixup_alpha": -1.0}, "mixup_alpha"),
        ({"mixup_switch_prob": 2.0}, "switch_prob"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"betas": (0.9, 1.0)}, "betas"),
    ]:
        with pytest.raises(ValueError, match=match):
            ViTFineTuning(vit, num_classes=3, **kwargs)


def test_default_targets_are_the_smoothed_labels_and_images_are_untouched():
    model = ViTFineTuning(build_backbone(tiny_vit())[0], num_classes=5)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 3, 1])
    images, soft = model.mixup(x, y)
    assert images is x
    naive = torch.tensor([[0.9 + 0.02 if k == int(y[b]) else 0.02 for k in range(5)] for b in range(4)])
    torch.testing.assert_close(soft, naive)
    with torch.no_grad():
        logits = model(x)
        torch.testing.assert_close(F.cross_entropy(logits, soft), F.cross_entropy(logits, y, label_smoothing=0.1))
    images, soft = Mixup(5)(x, y)  # no smoothing: the one-hot labels
    assert images is x and torch.equal(soft, F.one_hot(y, 5).float())


# ----------------------------------------------------------------------------- Mixup / CutMix
def _naive_soft(y: torch.Tensor, classes: int, lam: float, smoothing: float) -> torch.Tensor:
    n = len(y)
    out = torch.zeros(n, classes)
    for b in range(n):
        for k in range(classes):
            mine = 1 - smoothing + smoothing / classes if k == int(y[b]) else smoothing / classes
            partner = 1 - smoothing + smoothing / classes if k == int(y[n - 1 - b]) else smoothing / classes
            out[b, k] = lam * mine + (1 - lam) * partner
    return out


def test_mixup_one_lambda_per_batch_against_a_loop(monkeypatch):
    x, y = torch.randn(5, 3, 4, 6), torch.tensor([0, 1, 2, 2, 3])
    original = x.clone()
    mix = Mixup(4, mixup_alpha=0.8, label_smoothing=0.1)
    monkeypatch.setattr(mix, "sample", lambda: (0.3, False))
    images, soft = mix(x, y)
    for b in range(5):
        torch.testing.assert_close(images[b], 0.3 * original[b] + 0.7 * original[4 - b])
    torch.testing.assert_close(soft, _naive_soft(y, 4, 0.3, 0.1))
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5))
    assert torch.equal(x, original)  # the input is not modified in place


def test_cutmix_box_pixels_and_corrected_lambda_against_a_loop(monkeypatch):
    x, y = torch.randn(4, 2, 10, 7), torch.tensor([2, 0, 1, 1])
    original = x.clone()
    mix = Mixup(3, cutmix_alpha=1.0, label_smoothing=0.1)
    monkeypatch.setattr(mix, "sample", lambda: (0.6, True))
    for seed in range(20):
        torch.manual_seed(seed)
        top, bottom, left, right = cutmix_box(10, 7, 0.6)
        torch.manual_seed(seed)
        images, soft = mix(x, y)
        inside = 0
        for i in range(10):
            for j in range(7):
                in_box = top <= i < bottom and left <= j < right
                inside += in_box
                for b in range(4):
                    assert torch.equal(images[b, :, i, j], original[3 - b if in_box else b, :, i, j])
        lam = 1 - inside / 70
        assert box_lambda((top, bottom, left, right), 10, 7) == pytest.approx(lam)
        torch.testing.assert_close(soft, _naive_soft(y, 3, lam, 0.1))
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))
    assert torch.equal(x, original)


def test_cutmix_box_size_and_lambda_correction():
    torch.manual_seed(0)
    for _ in range(300):
        lam = float(torch.rand(()))
        top, bottom, left, right = cutmix_box(12, 9, lam)
        cut_h, cut_w = int(12 * (1 - lam) ** 0.5), int(9 * (1 - lam) ** 0.5)
        assert 0 <= top <= bottom <= 12 and 0 <= left <= right <= 9
        assert bottom - top <= cut_h and right - left <= cut_w
        if top > 0 and bottom < 12:  # not clipped: the full side
            assert bottom - top == cut_h
        if left > 0 and right < 9:
            assert right - left == cut_w
        corrected = box_lambda((top, bottom, left, right), 12, 9)
        assert corrected == pytest.approx(1 - (bottom - top) * (right - left) / 108)
        assert corrected >= lam - 1e-9  # clipping and rounding only shrink the box


def test_sampling_beta_lambda_and_switch_probability():
    torch.manual_seed(0)
    both = Mixup(3, mixup_alpha=0.8, cutmix_alpha=1.0)
    draws = [both.sample() for _ in range(3000)]
    share = sum(c for _, c in draws) / len(draws)
    assert 0.46 < share < 0.54
    mixup_only = torch.tensor([Mixup(3, mixup_alpha=0.8).sample()[0] for _ in range(4000)])
    assert mixup_only.mean().item() == pytest.approx(0.5, abs=0.02)
    assert mixup_only.var().item() == pytest.approx(1 / (4 * (2 * 0.8 + 1)), abs=0.01)  # Beta(a, a)'s variance
    cutmix_only = Mixup(3, cutmix_alpha=1.0)
    assert all(cutmix_only.sample()[1] for _ in range(20))
    assert Mixup(3).sample() == (1.0, False)
    assert torch.equal(smooth_one_hot(torch.tensor([1]), 4, 0.2), torch.tensor([[0.05, 0.85, 0.05, 0.05]]))
