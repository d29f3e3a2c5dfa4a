"""CPC on raw audio: the encoder's rate and look-ahead, a causal context network, the sequence
InfoNCE against a naive float64 loop, the method's step and errors, two processes against one,
and ``lightning-ssl fit --config configs/cpc_audio_synthetic.yaml`` on a generated tree."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from audio_trees import speaker_signal, write_tree
from dist_utils import run_distributed
from helpers import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_ssl import CPCAudio
from lightning_ssl.audio_encoders import ConvWaveformEncoder, CPCAudioEncoder, build_audio_encoder
from lightning_ssl.cli import main as cli_main
from lightning_ssl.evaluation import load_encoder
from lightning_ssl.losses import cpc_sequence_info_nce

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("vectors", [1, 7, 128])
def test_one_vector_per_160_samples_with_the_paper_strides(norm, vectors):
    encoder = ConvWaveformEncoder(channels=8, norm=norm).eval()
    assert encoder.hop == 160
    assert encoder(torch.randn(2, 1, 160 * vectors)).shape == (2, 8, vectors)
    paper = CPCAudioEncoder()  # 512 channels, 256-d GRU
    assert paper.frames(torch.randn(1, 20480)).shape == (1, 128, 512) and paper.context_dim == 256


def test_the_encoder_looks_at_most_two_hops_ahead():
    """z_t covers samples up to 160 t + 311 (kernels/strides/paddings 10/5/3, 8/4/2, then 4/2/1 three
    times): changing samples from 160 (t + 2) on leaves z_0..z_t unchanged."""
    encoder = CPCAudioEncoder(channels=8, context_dim=6).eval()
    x = torch.randn(1, 1, 160 * 20)
    z, c = encoder.frames(x), encoder.contexts(encoder.frames(x))
    for t in (0, 5, 17):
        y = x.clone()
        y[..., 160 * (t + 2) :] += torch.randn_like(y[..., 160 * (t + 2) :])
        zy = encoder.frames(y)
        assert torch.equal(zy[:, : t + 1], z[:, : t + 1]) and torch.equal(
            encoder.contexts(zy)[:, : t + 1], c[:, : t + 1]
        )
        assert not torch.allclose(zy[:, t + 2], z[:, t + 2])


def test_context_network_is_causal_by_perturbation():
    encoder = CPCAudioEncoder(channels=6, context_dim=5).eval()
    z = torch.randn(2, 12, 6)
    base = encoder.contexts(z)
    for t in range(12):
        perturbed = z.clone()
        perturbed[:, t + 1 :] += torch.randn_like(perturbed[:, t + 1 :])
        out = encoder.contexts(perturbed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"c_{t} changed when z after t changed"
        if t + 1 < 12:
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_context_network_is_causal_by_autograd():
    encoder = CPCAudioEncoder(channels=4, context_dim=5)
    z = torch.randn(1, 10, 4, requires_grad=True)
    c = encoder.contexts(z)
    for t in range(10):
        (grad,) = torch.autograd.grad(c[:, t].sum(), z, retain_graph=True)
        seen = grad.abs().sum(dim=(0, 2)) > 0
        assert not seen[t + 1 :].any(), f"c_{t} depends on z after t"
        assert seen[: t + 1].all(), f"c_{t} does not see every z up to t"


def test_backbone_argument_errors():
    with pytest.raises(ValueError, match="unknown audio backbone 'wav2vec'.*cpc"):
        build_audio_encoder("wav2vec")
    with pytest.raises(TypeError, match="must be a CPCAudioEncoder"):
        build_audio_encoder(nn.Linear(2, 2))
    custom = CPCAudioEncoder(channels=12, context_dim=7, embedding="frames")
    model = CPCAudio(custom, prediction_steps=2)
    assert model.backbone is custom and model.feature_dim == 12 and "backbone" not in model.hparams
    with pytest.raises(ValueError, match="mono waveforms"):
        custom(torch.randn(2, 2, 1600))
    with pytest.raises(ValueError, match="embedding must be"):
        CPCAudioEncoder(embedding="max")
    with pytest.raises(ValueError, match="norm must be"):
        ConvWaveformEncoder(norm="layer")


# ------------------------------------------------------------------------------------------ loss
def _naive_loss(predictions, targets, steps, negatives):
    b, _, t, _ = predictions.shape
    per_step = []
    for s, k in enumerate(steps):
        terms = []
        for n in range(b):
            for i in range(t - k):
                q = predictions[n, s, i]
                candidates = (
                    [(m, j) for m in range(b) for j in range(t)] if negatives == "batch" else [(n, j) for j in range(t)]
                )
                scores = torch.stack([q @ targets[m, j] for m, j in candidates])
                terms.append(torch.logsumexp(scores, 0) - q @ targets[n, i + k])
        per_step.append(torch.stack(terms).mean())
    return torch.stack(per_step).mean()


@pytest.mark.parametrize("negatives", ["batch", "same_sequence"])
@pytest.mark.parametrize("shape,steps", [((2, 3, 6, 4), [1, 2, 3]), ((3, 2, 5, 3), [2, 4]), ((1, 1, 4, 2), [3])])
def test_loss_and_its_gradients_equal_a_naive_float64_loop(negatives, shape, steps):
    b, s, t, d = shape
    gen = torch.Generator().manual_seed(sum(shape))
    predictions = torch.randn(b, s, t, d, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randn(b, t, d, dtype=torch.float64, generator=gen, requires_grad=True)
    fast = cpc_sequence_info_nce(predictions, targets, steps, negatives)
    naive = _naive_loss(predictions, targets, steps, negatives)
    torch.testing.assert_close(fast, naive)
    for a, n in zip(
        torch.autograd.grad(fast, [predictions, targets]), torch.autograd.grad(naive, [predictions, targets])
    ):
        torch.testing.assert_close(a, n)


@pytest.mark.parametrize("negatives", ["batch", "same_sequence"])
def test_loss_is_log_n_for_random_vectors_and_falls_for_perfect_predictions(negatives):
    b, t, d, steps = 8, 32, 256, list(range(1, 13))
    targets = torch.randn(b, t, d) / d**0.5
    predictions = torch.randn(b, len(steps), t, d) / d**0.5
    n = b * t if negatives == "batch" else t
    random_loss = cpc_sequence_info_nce(predictions, targets, steps, negatives)
    assert abs(random_loss.item() - math.log(n)) < 0.05 * math.log(n)
    exact = torch.zeros_like(predictions)
    for s, k in enumerate(steps):
        exact[:, s, : t - k] = targets[:, k:]
    assert cpc_sequence_info_nce(exact * 10, targets * 10, steps, negatives) < 0.05 * random_loss
    assert cpc_sequence_info_nce(exact, targets, steps, negatives) < random_loss


def test_loss_rejects_bad_inputs():
    p, z = torch.randn(2, 3, 6, 4), torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="negatives must be one of batch, same_sequence"):
        cpc_sequence_info_nce(p, z, [1, 2, 3], "mixed")
    with pytest.raises(ValueError, match="B x S x T x D"):
        cpc_sequence_info_nce(z, z, [1, 2, 3])
    with pytest.raises(ValueError, match="do not match"):
        cpc_sequence_info_nce(p, torch.randn(2, 5, 4), [1, 2, 3])
    for negatives in ("batch", "same_sequence"):
        with pytest.raises(ValueError, match="step"):
            cpc_sequence_info_nce(p, z, [1, 2, 6], negatives)


# ---------------------------------------------------------------------------------------- method
def test_method_defaults_are_the_papers():
    model = CPCAudio()
    assert model.backbone.config == {
        "channels": 512, "context_dim": 256, "strides": [5, 4, 2, 2, 2], "kernel_sizes": [10, 8, 4, 4, 4],
        "norm": "batch", "embedding": "context",
    }  # fmt: skip
    assert model.steps == list(range(1, 13)) and model.negatives == "batch" and model.feature_dim == 256
    assert model.predictor.in_features == 256 and model.predictor.out_features == 12 * 512
    assert model.predictor.bias is None
    assert model.optim_config["optimizer"] == "adamw" and model.optim_config["weight_decay"] == 0.0
    assert model.optim_config["base_lr"] * 64 / 256 == pytest.approx(2e-4)  # the paper's lr at its batch of 64


def test_method_errors_name_the_problem():
    with pytest.raises(ValueError, match="channels_last"):
        CPCAudio(channels_last=True)
    with pytest.raises(ValueError, match="small_image"):
        CPCAudio(small_image=True)
    with pytest.raises(ValueError, match="negatives must be"):
        CPCAudio(negatives="other")
    model = CPCAudio(encoder_dim=8, context_dim=4, prediction_steps=12)
    with pytest.raises(ValueError, match=r"at least 2080 samples"):
        model.loss(torch.randn(2, 1, 1600))


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


class _OneView(torch.utils.data.Dataset):
    def __init__(self, waves, labels):
        self.waves, self.labels = waves, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return [self.waves[i]], self.labels[i]


@pytest.mark.slow  # 60 steps: about a minute on 2 shared cores
def test_training_on_speaker_tones_lowers_the_loss(tmp_path):
    waves = torch.stack([torch.from_numpy(speaker_signal(s, u, 0.5)) for s in range(4) for u in range(8)])
    data = DataLoader(_OneView(waves.unsqueeze(1), torch.arange(32) // 8), batch_size=8, shuffle=True)
    torch.manual_seed(0)
    model, record = CPCAudio(encoder_dim=32, context_dim=16, prediction_steps=4, lr=2e-3), _Losses()
    quiet_trainer(max_epochs=15, default_root_dir=tmp_path, callbacks=[record]).fit(model, data)
    losses = record.losses
    assert len(losses) == 60 and sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
    fresh = model.random_init_backbone()
    assert not torch.equal(fresh.context.weight_hh_l0, model.backbone.context.weight_hh_l0)
    assert torch.equal(fresh.encoder[1].running_mean, torch.zeros(32))  # fresh batch-norm statistics


def _loss_worker(rank, world, negatives):
    torch.manual_seed(0)
    model = CPCAudio(encoder_dim=8, context_dim=6, prediction_steps=3, negatives=negatives).double().eval()
    x = torch.randn(4, 1, 160 * 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ddp = nn.parallel.DistributedDataParallel(model)
    loss = ddp.module.loss(x[rank * 2 : rank * 2 + 2])
    loss.backward()
    mean = loss.detach().clone()
    torch.distributed.all_reduce(mean)
    # DDP's gradient averaging happens in its backward hooks; the module's loss bypasses forward,
    # so average by hand as DDP would
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        torch.distributed.all_reduce(g)
        grads[name] = g / world
    return {"loss": mean / world, "grads": grads}


@pytest.mark.slow  # two spawned processes importing torch: 15-60 s on 2 shared cores
@pytest.mark.parametrize("negatives", ["batch", "same_sequence"])
def test_two_processes_equal_one_process_with_the_whole_batch(negatives):
    """(The batch-negatives case also runs by default through tests/test_distributed.py's contract.)"""
    results = run_distributed(_loss_worker, 2, negatives)
    torch.manual_seed(0)
    model = CPCAudio(encoder_dim=8, context_dim=6, prediction_steps=3, negatives=negatives).double().eval()
    x = torch.randn(4, 1, 160 * 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = model.loss(x)
    loss.backward()
    for r in results:
        torch.testing.assert_close(r["loss"], loss.detach())
        for name, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, msg=name)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_fit_with_the_synthetic_config_on_a_generated_tree(tmp_path, capsys):
    """The documented command, shortened: 2 epochs of 2 steps on 4 speakers, then the online EER on
    the 3 held-out speakers, a checkpoint and its encoder."""
    write_tree(tmp_path / "corpus" / "train", speakers=4, utterances=2, seconds=0.5)
    write_tree(tmp_path / "corpus" / "test", speakers=3, utterances=3, seconds=0.5, first_speaker=10)
    out = tmp_path / "out"
    cli_main(
        [
            "fit", "--config", str(REPO / "configs" / "cpc_audio_synthetic.yaml"),
            "--data.init_args.root", str(tmp_path / "corpus" / "train"),
            "--data.init_args.val_root", str(tmp_path / "corpus" / "test"),
            "--data.init_args.crop_samples", "3200", "--data.init_args.eval_crop_samples", "4800",
            "--data.init_args.batch_size", "4",
            "--model.init_args.encoder_dim", "16", "--model.init_args.context_dim", "8",
            "--model.init_args.prediction_steps", "4",
            "--trainer.max_epochs", "2", "--trainer.max_time", "null", "--trainer.log_every_n_steps", "1",
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    (metrics,) = out.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    eers = [float(r["val/eer"]) for r in rows if r.get("val/eer")]
    assert len(eers) == 1 and 0 <= eers[0] <= 1  # every 2 epochs
    assert sum(1 for r in rows if r.get("train/loss")) == 4
    (ckpt,) = out.rglob("*.ckpt")
    encoder, dim = load_encoder(ckpt)
    assert dim == 8 and encoder.eval()(torch.randn(2, 1, 3200)).shape == (2, 8)

    # lightning-ssl speaker-eval: a VoxCeleb1-O style list, then every pair with the speaker-ID probe
    test_root = tmp_path / "corpus" / "test"
    names = sorted(str(p.relative_to(test_root)) for p in test_root.rglob("*.flac"))
    trials = tmp_path / "trials.txt"
    trials.write_text(f"1 {names[0]} {names[1]}\n0 {names[0]} {names[3]}\n0 {names[2]} {names[8]}\n")
    capsys.readouterr()
    cli_main(["speaker-eval", str(ckpt), str(test_root), "--trials", str(trials), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "trials=3" in printed and "eer=" in printed and "min_dcf=" in printed
    cli_main(["speaker-eval", str(ckpt), str(test_root), "--speaker-id", "--crop", "3200", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "trials=36" in printed and "speaker_id=" in printed

    # validate (image kNN) names the command that evaluates speakers, in one line
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "validate", "--config", str(REPO / "configs" / "cpc_audio_synthetic.yaml"),
                "--data.init_args.root", str(tmp_path / "corpus" / "train"), "--ckpt_path", str(ckpt),
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            ]
        )  # fmt: skip
    assert exit_info.value.code == 1 and "lightning-ssl speaker-eval" in capsys.readouterr().err


def test_configs_hold_what_their_headers_state():
    import yaml

    paper = yaml.safe_load((REPO / "configs" / "cpc_audio_librispeech.yaml").read_text())
    model, data = paper["model"]["init_args"], paper["data"]["init_args"]
    assert (model["encoder_dim"], model["context_dim"], model["prediction_steps"]) == (512, 256, 12)
    assert model["negatives"] == "batch" and data["crop_samples"] == 20480 and data["sample_rate"] == 16000
    global_batch = data["batch_size"] * paper["trainer"]["devices"]
    assert global_batch == 64 and model["base_lr"] * global_batch / 256 == pytest.approx(2e-4)
    assert model["optimizer"] == "adamw" and model["weight_decay"] == 0.0 and "train-clean-100" in data["root"]
    cpu = yaml.safe_load((REPO / "configs" / "cpc_audio_synthetic.yaml").read_text())
    model, data = cpu["model"]["init_args"], cpu["data"]["init_args"]
    assert (model["encoder_dim"], model["context_dim"], model["prediction_steps"]) == (128, 128, 12)
    assert model["lr"] == 2e-4 and data["crop_samples"] == 20480 and data["batch_size"] == 8
    assert cpu["trainer"]["max_time"] == "00:00:20:00" and "synthetic-speech/train" in data["root"]
