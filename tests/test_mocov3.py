"""MoCo v3 (Chen, Xie and He 2021): the symmetric contrastive loss against a naive loop, keys gathered over
two gloo processes equal to one process holding the global batch (loss and DDP-averaged gradients), the
momentum schedule and the key encoder's EMA step by step, the predictor on the query side only, the
frozen patch projection and fixed sin-cos positions, the defaults that depend on the backbone kind, the
optimizer groups of the paper's code, a few Trainer steps and bad inputs."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from conftest import TinyConvNet
from dist_utils import run_distributed
from helpers import RandomTwoViews, quiet_trainer
from torch import nn

from lightning_ssl.ema import cosine_tau
from lightning_ssl.methods.mocov3 import MoCoV3, mocov3_contrastive_loss, mocov3_loss
from lightning_ssl.vit import patch_projection, sincos_2d

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to .self.log")  # training_step outside a Trainer

HEADS = dict(projection_hidden_dim=32, projection_dim=8)


def tiny_vit() -> torchvision.models.VisionTransformer:
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def vit_model(**kwargs) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(tiny_vit(), **{**HEADS, **kwargs})


def views(n: int = 6, size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


# ----------------------------------------------------------------------------- the loss
def naive_ctr(q: torch.Tensor, k: torch.Tensor, t: float, rows=None, offset: int = 0) -> float:
    """-log softmax of the positive, averaged over the queries ``rows``, times 2T, in plain Python."""
    unit = lambda v: [float(x) / math.sqrt(sum(float(y) ** 2 for y in v)) for x in v]  # noqa: E731
    qs, ks = [unit(v) for v in q], [unit(v) for v in k]
    rows = range(len(qs)) if rows is None else rows
    total = 0.0
    for i in rows:
        logits = [sum(a * b for a, b in zip(qs[i], kj)) / t for kj in ks]
        log_z = math.log(sum(math.exp(x) for x in logits))
        total += log_z - logits[i + offset]
    return total / len(rows) * 2 * t


@pytest.mark.parametrize("t,n,d", [(0.2, 5, 7), (1.0, 4, 3), (0.07, 3, 16)])
def test_symmetric_loss_matches_the_naive_loop(t, n, d):
    g = torch.Generator().manual_seed(n + d)
    q1, q2, k1, k2 = (torch.randn(n, d, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    expected = naive_ctr(q1, k2, t) + naive_ctr(q2, k1, t)
    assert mocov3_loss(q1, q2, k1, k2, t).item() == pytest.approx(expected, rel=1e-12)
    assert mocov3_contrastive_loss(q1, k2, t).item() == pytest.approx(naive_ctr(q1, k2, t), rel=1e-12)
    # the pairing is crossed: q1 against k2, not k1
    assert mocov3_loss(q1, q2, k1, k2, t).item() != pytest.approx(naive_ctr(q1, k1, t) + naive_ctr(q2, k2, t))


def test_loss_gives_no_gradient_to_the_keys_and_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = mocov3_contrastive_loss(q, k, 0.2)
    loss.backward()
    assert k.grad is None and q.grad is not None and q.grad.abs().sum() > 0
    # q and k are L2-normalized: scaling them changes nothing
    scaled = mocov3_contrastive_loss(q.detach() * 7.0, k.detach() * 0.1, 0.2)
    torch.testing.assert_close(scaled, loss.detach())


def test_loss_computes_in_float32_from_bfloat16_inputs():
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(6, 8, generator=g) for _ in range(4))
    low = [x.bfloat16() for x in (q1, q2, k1, k2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mocov3_loss(*low, 0.2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, mocov3_loss(*(x.float() for x in low), 0.2))


def test_loss_rejects_bad_inputs():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="q and k must both be N x D"):
        mocov3_contrastive_loss(q, torch.randn(5, 3))
    with pytest.raises(ValueError, match="q and k must both be N x D"):
        mocov3_contrastive_loss(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="temperature must be positive"):
        mocov3_contrastive_loss(q, q, 0.0)


# ----------------------------------------------------------------------------- two processes
WORLD, B, D = 2, 3, 5


def _global_qk(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(WORLD * B, D, generator=g, dtype=torch.float64) for _ in range(4)]


def _model_for_ddp() -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(tiny_vit(), **HEADS).double().eval()  # eval: BN statistics cannot depend on the split


class _Step(nn.Module):
    def __init__(self, method: MoCoV3):
        super().__init__()
        self.method = method

    def forward(self, x1, x2):
        return self.method.training_step(([x1, x2], None), 0)


def _mocov3_worker(rank: int, world: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")
    local = slice(rank * B, (rank + 1) * B)
    out = {}
    # the loss function: this process's queries against the keys of both processes
    q1, q2, k1, k2 = _global_qk()
    q1l = q1[local].clone().requires_grad_(True)
    q2l = q2[local].clone().requires_grad_(True)
    loss = mocov3_loss(q1l, q2l, k1[local], k2[local], 0.2)
    loss.backward()
    out["loss"], out["grad_q1"], out["grad_q2"] = loss.detach(), q1l.grad, q2l.grad
    out["local_only"] = mocov3_loss(q1[local], q2[local], k1[local], k2[local], 0.2, gather=False)
    # the whole method under DDP: gradients averaged over the processes
    model = _model_for_ddp()
    ddp = nn.parallel.DistributedDataParallel(_Step(model))
    x1, x2 = (v.double() for v in views(WORLD * B, seed=3))
    step_loss = ddp(x1[local], x2[local])
    step_loss.backward()
    out["step_loss"] = step_loss.detach()
    out["step_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out


@pytest.mark.distributed
def test_two_processes_with_gathered_keys_equal_one_process_with_the_global_batch():
    """Each process's loss is the one-process loss of its own queries against all keys (positives at
    ``i + rank * B``); their mean is the one-process loss of the global batch, and so are the DDP-averaged
    gradients, of the loss alone and of the whole method (keys gathered without gradient)."""
    results = run_distributed(_mocov3_worker, WORLD)
    q1, q2, k1, k2 = _global_qk()
    for r, res in enumerate(results):
        expected = naive_ctr(q1[r * B : (r + 1) * B], k2, 0.2, range(B), r * B) + naive_ctr(
            q2[r * B : (r + 1) * B], k1, 0.2, range(B), r * B
        )
        assert res["loss"].item() == pytest.approx(expected, rel=1e-12), f"rank {r}"
        # without gathering, each process sees only its own keys: another loss
        assert res["local_only"].item() != pytest.approx(res["loss"].item(), rel=1e-6)
    q1g, q2g = q1.clone().requires_grad_(True), q2.clone().requires_grad_(True)
    one = mocov3_loss(q1g, q2g, k1, k2, 0.2)
    one.backward()
    mean = sum(res["loss"] for res in results) / WORLD
    torch.testing.assert_close(mean, one.detach(), rtol=1e-12, atol=0)
    # each process's query gradient, averaged by DDP (divided by the world size), is the global one's slice
    torch.testing.assert_close(torch.cat([res["grad_q1"] for res in results]) / WORLD, q1g.grad)
    torch.testing.assert_close(torch.cat([res["grad_q2"] for res in results]) / WORLD, q2g.grad)

    model = _model_for_ddp()
    x1, x2 = (v.double() for v in views(WORLD * B, seed=3))
    loss = model.training_step(([x1, x2], None), 0)
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "backbone.module.conv_proj.weight" not in expected  # frozen: no gradient, not reduced by DDP
    step_mean = sum(res["step_loss"] for res in results) / WORLD
    torch.testing.assert_close(step_mean, loss.detach(), rtol=1e-10, atol=0)
    for res in results:
        grads = res["step_grads"]
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-8, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- momentum encoder
def test_momentum_schedule_is_the_codes_half_cosine_from_0_99_to_1():
    total = 10
    for k in range(total + 1):
        expected = 1.0 - 0.5 * (1.0 + math.cos(math.pi * k / total)) * (1.0 - 0.99)
        assert cosine_tau(k, total, 0.99, 1.0) == pytest.approx(expected, abs=1e-15)
    assert cosine_tau(0, total, 0.99) == pytest.approx(0.99) and cosine_tau(total, total, 0.99) == 1.0


class _RecordEMA(pl.Callback):
    """The key encoder before each step and the query encoder after each optimizer step (this callback runs
    before the model's EMAUpdate, which Lightning puts after the trainer's callbacks)."""

    def __init__(self):
        self.keys_before, self.online_after, self.taus = [], [], []

    @staticmethod
    def _flat(modules) -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for m in modules for p in m.parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys_before.append(self._flat([pl_module.backbone_ema, pl_module.projector_ema]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.online_after.append(self._flat([pl_module.backbone, pl_module.projector]))
        self.taus.append(cosine_tau(trainer.global_step, int(trainer.estimated_stepping_batches), 0.99, 1.0))

    def on_train_end(self, trainer, pl_module):
        self.keys_before.append(self._flat([pl_module.backbone_ema, pl_module.projector_ema]))


def test_key_encoder_starts_as_a_copy_and_is_the_ema_after_every_step():
    model = vit_model(warmup_epochs=0, lr=1e-2)
    for online, target in model.ema_pairs():
        assert all(not p.requires_grad for p in target.parameters())
        for (n, p), (_, t) in zip(online.named_parameters(), target.named_parameters()):
            assert torch.equal(p, t), n
    rec = _RecordEMA()
    quiet_trainer(max_steps=4, callbacks=[rec]).fit(model, RandomTwoViews(num_samples=32, batch_size=8, image_size=16))
    assert len(rec.online_after) == 4 and len(rec.keys_before) == 5
    for step in range(4):
        tau = rec.taus[step]
        expected = tau * rec.keys_before[step] + (1 - tau) * rec.online_after[step]
        torch.testing.assert_close(rec.keys_before[step + 1], expected, rtol=1e-6, atol=1e-7)
    assert rec.taus[0] > 0.99 and rec.taus[-1] == 1.0  # after the last of the 4 steps: m = 1
    assert not torch.equal(rec.keys_before[0], rec.keys_before[-1])


# ----------------------------------------------------------------------------- what each side sees
def test_predictor_is_on_the_query_side_only_and_the_keys_get_no_gradient():
    model = vit_model().train()
    assert not hasattr(model, "predictor_ema")
    calls = {"predictor": [], "projector_ema": []}
    model.predictor.register_forward_hook(lambda m, i, o: calls["predictor"].append(i[0]))
    model.projector_ema.register_forward_hook(lambda m, i, o: calls["projector_ema"].append(o))
    x1, x2 = views()
    torch.manual_seed(5)
    loss = model.training_step(([x1, x2], None), 0)
    assert len(calls["predictor"]) == 2 and all(i.requires_grad for i in calls["predictor"])
    assert len(calls["projector_ema"]) == 2 and not any(o.requires_grad for o in calls["projector_ema"])
    # the same loss by hand, one forward per view (the code's; BN statistics per view)
    model2 = vit_model().train()
    q1 = model2.predictor(model2.projector(model2.backbone(x1)))
    q2 = model2.predictor(model2.projector(model2.backbone(x2)))
    with torch.no_grad():
        k1 = model2.projector_ema(model2.backbone_ema(x1))
        k2 = model2.projector_ema(model2.backbone_ema(x2))
    torch.testing.assert_close(loss, mocov3_loss(q1, q2, k1, k2, 0.2))
    loss.backward()
    assert all(p.grad is None for m in (model.backbone_ema, model.projector_ema) for p in m.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())


def test_representation_is_the_query_backbone():
    model = vit_model()
    with torch.no_grad():
        for p in model.backbone_ema.parameters():
            p.add_(0.5)
    x = views()[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.eval().backbone(x))
        assert not torch.allclose(model(x), model.backbone_ema(x))
    assert "state_prefix" not in model.encoder_spec()  # load_encoder takes backbone.


# ----------------------------------------------------------------------------- ViT stability tricks
def test_patch_projection_is_frozen_and_positions_are_fixed_sincos_after_training():
    model = vit_model(warmup_epochs=0, lr=1e-2)
    inner = model.backbone.module
    proj = patch_projection(model.backbone)
    init = {n: p.detach().clone() for n, p in proj.named_parameters()}
    table = torch.cat([torch.zeros(1, 32), sincos_2d(32, (4, 4))]).unsqueeze(0)
    assert all(not p.requires_grad for p in proj.parameters())
    assert not inner.encoder.pos_embedding.requires_grad
    torch.testing.assert_close(inner.encoder.pos_embedding.detach(), table)
    # the key encoder got both before the copy
    key_inner = model.backbone_ema.module
    torch.testing.assert_close(key_inner.encoder.pos_embedding.detach(), table)
    for n, p in patch_projection(model.backbone_ema).named_parameters():
        assert torch.equal(p, init[n])
    trained_before = inner.encoder.layers[0].mlp[0].weight.detach().clone()
    quiet_trainer(max_steps=3).fit(model, RandomTwoViews(num_samples=24, batch_size=8, image_size=16))
    optimizer_params = {id(p) for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) not in optimizer_params for p in proj.parameters())
    assert id(inner.encoder.pos_embedding) not in optimizer_params
    for n, p in proj.named_parameters():
        assert p.grad is None and torch.equal(p, init[n]), n
        assert torch.equal(dict(patch_projection(model.backbone_ema).named_parameters())[n], init[n])
    torch.testing.assert_close(inner.encoder.pos_embedding.detach(), table)
    assert not torch.equal(inner.encoder.layers[0].mlp[0].weight, trained_before)  # the rest trained


def test_patch_projection_and_positions_train_when_turned_off():
    model = vit_model(warmup_epochs=0, lr=1e-2, freeze_patch_projection=False, sincos_positions=False)
    proj = patch_projection(model.backbone)
    pos = model.backbone.module.encoder.pos_embedding
    assert proj.weight.requires_grad and pos.requires_grad
    before = proj.weight.detach().clone(), pos.detach().clone()
    quiet_trainer(max_steps=2).fit(model, RandomTwoViews(num_samples=16, batch_size=8, image_size=16))
    assert not torch.equal(proj.weight, before[0]) and not torch.equal(pos, before[1])


def test_random_init_baseline_has_the_sincos_positions():
    model = vit_model()
    baseline = model.random_init_backbone(seed=3)
    torch.testing.assert_close(
        baseline.module.encoder.pos_embedding.detach(), model.backbone.module.encoder.pos_embedding.detach()
    )
    assert not torch.equal(baseline.module.conv_proj.weight, model.backbone.module.conv_proj.weight)


# ----------------------------------------------------------------------------- defaults by backbone kind
def _linears(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


def test_vit_defaults_are_the_papers_vit_recipe():
    model = MoCoV3(tiny_vit())
    cfg = model.optim_config
    assert (cfg["optimizer"], cfg["base_lr"], cfg["weight_decay"], cfg["warmup_epochs"]) == ("adamw", 1.5e-4, 0.1, 40)
    assert (model.temperature, model.ema_tau, model.ema_tau_final) == (0.2, 0.99, 1.0)
    widths = [(m.in_features, m.out_features) for m in _linears(model.projector)]
    assert widths == [(32, 4096), (4096, 4096), (4096, 256)]
    assert [(m.in_features, m.out_features) for m in _linears(model.predictor)] == [(256, 4096), (4096, 256)]
    for head in (model.projector, model.predictor):
        assert all(m.bias is None for m in _linears(head))
        assert isinstance(head[-1], nn.BatchNorm1d) and not head[-1].affine
    assert model.freeze_patch_projection and model.sincos_positions and model.hparams["temperature"] is None


def test_resnet_defaults_are_the_codes_resnet_recipe():
    model = MoCoV3(TinyConvNet())
    cfg = model.optim_config
    assert (cfg["optimizer"], cfg["base_lr"], cfg["weight_decay"], cfg["warmup_epochs"]) == ("lars", 0.6, 1e-6, 10)
    assert model.temperature == 1.0
    assert [(m.in_features, m.out_features) for m in _linears(model.projector)] == [(16, 4096), (4096, 256)]
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine
    assert isinstance(model.predictor[-1], nn.Linear) and model.predictor[-1].bias is None  # last_bn=False
    assert not model.freeze_patch_projection and not model.sincos_positions


def test_given_values_win_and_lr_defaults_follow_the_optimizer():
    model = MoCoV3(tiny_vit(), **HEADS, temperature=0.5, warmup_epochs=3, projection_layers=2, weight_decay=0.05)
    assert model.temperature == 0.5 and model.optim_config["warmup_epochs"] == 3
    assert model.optim_config["weight_decay"] == 0.05 and len(_linears(model.projector)) == 2
    lars_vit = MoCoV3(tiny_vit(), **HEADS, optimizer="lars")
    assert (lars_vit.optim_config["base_lr"], lars_vit.optim_config["weight_decay"]) == (0.6, 1e-6)
    adamw_resnet = MoCoV3(TinyConvNet(), **HEADS, optimizer="adamw", predictor_last_batch_norm=True)
    assert adamw_resnet.optim_config["base_lr"] == 1.5e-4 and adamw_resnet.temperature == 1.0
    assert isinstance(adamw_resnet.predictor[-1], nn.BatchNorm1d)
    sgd = MoCoV3(TinyConvNet(), **HEADS, optimizer="sgd", lr=0.1, weight_decay=1e-4)
    assert sgd.optim_config["lr"] == 0.1 and sgd.optim_config["optimizer"] == "sgd"


@pytest.mark.parametrize("backbone", ["vit_ti_16", "resnet18"])
def test_hparams_round_trip_rebuilds_the_same_model(backbone):
    torch.manual_seed(0)
    model = MoCoV3(backbone, small_image=True, **HEADS)
    rebuilt = type(model)(**model.hparams)
    assert dict(rebuilt.hparams) == dict(model.hparams) and rebuilt.optim_config == model.optim_config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.temperature == model.temperature
    assert rebuilt.freeze_patch_projection == model.freeze_patch_projection == (backbone == "vit_ti_16")


def test_parameter_groups_follow_the_codes_optimizers():
    model = vit_model()
    trained = [p for p in model.parameters() if p.requires_grad]
    (group,) = model.parameter_groups(0.1)  # AdamW: every trained parameter decayed, as torch.optim.AdamW(model)
    assert group["weight_decay"] == 0.1 and {id(p) for p in group["params"]} == {id(p) for p in trained}
    assert any(p.ndim == 1 for p in group["params"])  # biases and norms included
    assert all(id(p) != id(model.backbone.module.encoder.pos_embedding) for p in group["params"])
    lars = vit_model(optimizer="lars")
    decay, no_decay = lars.parameter_groups(1e-6)  # LARS: 1-d parameters without decay or adaptation
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] and not decay["lars_exclude"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trained)
    layered = vit_model(layer_decay=0.75).parameter_groups(0.1)
    assert len({g["lr_scale"] for g in layered}) > 1


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_a_few_trainer_steps_give_a_finite_changing_loss(kind):
    torch.manual_seed(0)
    backbone = tiny_vit() if kind == "vit" else TinyConvNet()
    model = MoCoV3(backbone, **HEADS, warmup_epochs=0, base_lr=1e-2 if kind == "vit" else 0.6)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = quiet_trainer(max_steps=4, callbacks=[Record()])
    trainer.fit(model, RandomTwoViews(num_samples=32, batch_size=8, image_size=16))
    assert trainer.global_step == 4 and len(losses) == 4
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) > 1
    assert "train/ema_tau" in trainer.callback_metrics


def test_bf16_autocast_step_is_finite_and_float32():
    model = vit_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step((views(), None), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(ema_tau=1.2), "ema_tau"),
        (dict(ema_tau=0.99, ema_tau_final=0.9), "ema_tau"),
        (dict(projection_layers=0), "projection_layers >= 1"),
        (dict(projection_dim=0), "projection_dim >= 1"),
        (dict(optimizer="sgd"), "no sgd recipe"),
        (dict(optimizer="rmsprop"), "optimizer must be one of"),
        (dict(final_lr=0.01), r"final_lr must lie in \[0, base_lr=0.00015\]"),
        (dict(base_lr=-1.0), "base_lr must be positive"),
        (dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoCoV3(tiny_vit(), **{**HEADS, **kwargs})


@pytest.mark.parametrize("flag", ["freeze_patch_projection", "sincos_positions"])
def test_vit_only_options_on_a_convnet_name_a_vit(flag):
    with pytest.raises(ValueError, match=rf"{flag}=True needs a ViT backbone \(e.g. 'vit_s_16'"):
        MoCoV3(TinyConvNet(), **HEADS, **{flag: True})


@pytest.mark.parametrize("count", [1, 3])
def test_training_step_needs_exactly_two_views(count):
    model = vit_model()
    with pytest.raises(ValueError, match=f"two views per image, got {count}"):
        model.training_step(([views()[0]] * count, None), 0)
