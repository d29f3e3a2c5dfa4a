"""Long runs survive: real processes killed with SIGKILL or stopped by SIGTERM resume from the command
line exactly where an uninterrupted run goes; a non-finite loss stops training without touching the
last good checkpoint; the command line's validate and predict do something useful; errors are short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import TinyConvNet
from helpers import RandomTwoViews, quiet_trainer

from lightning_ssl import REGISTRY, SimCLR, SSLMethod
from lightning_ssl.callbacks import DivergenceError, DivergenceGuard, KNNMonitor
from lightning_ssl.datamodules import DigitsDataModule

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
EVERY, TOTAL, PAUSE = 4, 16, 10  # checkpoint every 4 steps; 16 steps (11 per epoch: crosses an epoch); stop at 10


def write_config(
    root: Path, name: str, max_steps: int = TOTAL, pause: int | None = None, shards: Path | None = None, **trainer
) -> Path:
    """A tiny CLI config: a registered method (small heads, ResNet-18 with the CIFAR stem) on 180 digits
    of 16x16 pixels (or, with ``shards``, the 180 images of ``sharded_tree``), batch 16 (11 steps per
    epoch), a checkpoint every 4 steps, one CPU thread."""
    callbacks = [
        {
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": EVERY, "save_last": True},
        }
    ]
    if pause is not None:
        callbacks.append(
            {"class_path": "helpers.PauseAt", "init_args": {"step": pause, "marker": str(root / "paused")}}
        )
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": callbacks,
            **trainer,
        },
        "model": {
            "class_path": f"lightning_ssl.{REGISTRY[name].cls.__name__}",
            "init_args": {**REGISTRY[name].named_backbone, "warmup_epochs": 1, **REGISTRY[name].small},
        },
        "data": {
            "class_path": "lightning_ssl.datamodules.DigitsDataModule",
            "init_args": {"batch_size": 16, "image_size": 16, "val_fraction": 0.9, "num_workers": 0},
        },
    }
    if shards is not None:
        config["data"] = {
            "class_path": "lightning_ssl.datamodules.ImageNetDataModule",
            "init_args": {"shards": str(shards), "batch_size": 16, "image_size": 16, "num_workers": 2},
        }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "run.yaml"  # not config.yaml: the CLI saves the resolved config there
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, wait: bool = True, timeout: float = 300) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_ssl", *args]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path.name} appeared:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


def assert_same_training_state(a: Path, b: Path) -> None:
    """Parameters, buffers (EMA copies, queue, pointer), optimizer state, step counters: bitwise equal."""
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    for (_, sa), (_, sb) in zip(ca["optimizer_states"][0]["state"].items(), cb["optimizer_states"][0]["state"].items()):
        for key, value in sa.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[key])), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: a method's 16-step run without interruption (its last checkpoint), run once per
    method (and data source) when a test first asks for it."""
    done: dict[tuple[str, Path | None], Path] = {}

    def run(name: str, shards: Path | None = None) -> Path:
        if (name, shards) not in done:
            root = tmp_path_factory.mktemp(f"straight-{name}")
            result = cli("fit", "--config", str(write_config(root, name, shards=shards)))
            assert result.returncode == 0, result.stderr[-4000:]
            done[name, shards] = root / "checkpoints" / "last.ckpt"
        return done[name, shards]

    return run


@pytest.fixture(scope="module")
def sharded_tree(tmp_path_factory) -> Path:
    """Shards (``lightning-ssl prepare``) of a generated tree: 180 training images of 10 classes."""
    from image_trees import make_tree

    from lightning_ssl.datamodules.prepare import prepare_image_folder

    tree = make_tree(tmp_path_factory.mktemp("tree"), {"train": 18, "val": 2}, [f"c{i}" for i in range(10)])
    out = tmp_path_factory.mktemp("shards")
    prepare_image_folder(tree, out, progress=False, workers=1, chunk_bytes="16KB")
    return out


# SimCLR and MoCo v2 (queue) by default; BYOL (EMA) and CPC in the slow run (-m slow)
@pytest.mark.parametrize(
    "name", ["simclr", "mocov2", *(pytest.param(n, marks=pytest.mark.slow) for n in ("byol", "cpc"))]
)
def test_sigkill_mid_epoch_then_resume_from_the_cli_is_exact(tmp_path, name, uninterrupted):
    """A real process killed with SIGKILL at step 10 (mid-epoch; checkpoint at step 8), resumed with
    ``--ckpt_path last``, ends with exactly the uninterrupted run's weights, EMA copies, queue and
    optimizer state: the loader continues at the right sample with the same augmentations, the random
    streams continue, the schedule and the EMA rate continue."""
    config = write_config(tmp_path, name, pause=PAUSE)
    proc = cli("fit", "--config", str(config), wait=False)
    wait_for(tmp_path / "paused", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 8  # the work after it was lost with the process
    resumed = cli("fit", "--config", str(write_config(tmp_path, name)), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_training_state(tmp_path / "checkpoints" / "last.ckpt", uninterrupted(name))


def test_sigkill_mid_epoch_then_resume_from_sharded_data_is_exact(tmp_path, sharded_tree, uninterrupted):
    """The same with the data read from litdata shards by 2 loader workers: the resumed run continues at
    the right sample of the shards, and ends equal to the uninterrupted one."""
    proc = cli("fit", "--config", str(write_config(tmp_path, "simclr", pause=PAUSE, shards=sharded_tree)), wait=False)
    wait_for(tmp_path / "paused", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = cli("fit", "--config", str(write_config(tmp_path, "simclr", shards=sharded_tree)), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_training_state(tmp_path / "checkpoints" / "last.ckpt", uninterrupted("simclr", sharded_tree))


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(tmp_path, uninterrupted):
    config = write_config(tmp_path, "simclr", pause=PAUSE)
    proc = cli("fit", "--config", str(config), wait=False)
    wait_for(tmp_path / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-3000:]
    assert "Resume with --ckpt_path last" in output
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == PAUSE  # the step in progress finished and was saved
    resumed = cli("fit", "--config", str(write_config(tmp_path, "simclr")), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_training_state(tmp_path / "checkpoints" / "last.ckpt", uninterrupted("simclr"))


def test_validate_and_predict_from_the_cli(tmp_path, uninterrupted):
    config = write_config(tmp_path, "simclr")
    ckpt = str(uninterrupted("simclr"))
    validated = cli("validate", "--config", str(config), "--ckpt_path", ckpt)
    assert validated.returncode == 0, validated.stderr[-4000:]
    assert "val/knn_top1" in validated.stdout
    predicted = cli("predict", "--config", str(config), "--ckpt_path", ckpt)
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    path = (tmp_path / "embeddings.pt").resolve()
    assert f"Embeddings: 1618 x 512 {{'features', 'labels'}} written to {path} (torch.load)" in predicted.stdout
    embeddings = torch.load(path, weights_only=True)
    assert embeddings["features"].shape == (1618, 512) and embeddings["labels"].shape == (1618,)  # the 90% held out
    not_offered = cli("test", "--config", str(config))
    assert not_offered.returncode == 2 and "invalid choice" in not_offered.stderr


# ----------------------------------------------------------------------------- divergence
class PoisonAt(pl.Callback):
    """Makes the loss of optimizer step ``step`` non-finite (NaN weights from then on, or one NaN batch)."""

    def __init__(self, step: int, once: bool = False):
        self.step, self.once = step, once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        views, _ = batch
        if trainer.global_step + 1 == self.step and self.once:
            views[0].fill_(float("nan"))
        elif trainer.global_step + 1 == self.step:
            with torch.no_grad():
                next(pl_module.backbone.parameters()).fill_(float("nan"))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    model = SimCLR(TinyConvNet(), projection_dim=8, warmup_epochs=0)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    trainer = quiet_trainer(max_steps=12, callbacks=[checkpoints, PoisonAt(5)], enable_checkpointing=True)
    with pytest.raises(DivergenceError, match="NaN or inf at optimizer step 5") as err:
        trainer.fit(model, RandomTwoViews(num_samples=64, batch_size=8))
    assert "SimCLR" in str(err.value) and "learning rate" in str(err.value)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # the save at step 6 was refused: the last good checkpoint stays
    loaded = SimCLR.load_from_checkpoint(tmp_path / "last.ckpt", backbone=TinyConvNet())
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_divergence_guard_can_skip_a_bounded_number_of_bad_steps(tmp_path):
    model = SimCLR(TinyConvNet(), projection_dim=8, warmup_epochs=0, optimizer="sgd")
    guard = DivergenceGuard(max_skipped_steps=1)

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step + 1 == 3:
                self.before = [p.detach().clone() for p in pl_module.parameters()]
                self.state = {
                    k: v["momentum_buffer"].clone() for k, v in enumerate(trainer.optimizers[0].state.values())
                }

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                self.after = [p.detach().clone() for p in pl_module.parameters()]

    snap = Snapshot()
    trainer = quiet_trainer(max_steps=6, callbacks=[guard, PoisonAt(3, once=True), snap])
    trainer.fit(model, RandomTwoViews(num_samples=64, batch_size=8))
    assert guard.skipped == [2] and trainer.global_step == 6  # step 3 (index 2) skipped, training went on
    assert all(torch.equal(a, b) for a, b in zip(snap.before, snap.after))  # the skipped step changed nothing
    assert all(torch.isfinite(p).all() for p in model.parameters())
    guard = DivergenceGuard(max_skipped_steps=1)
    poisons = [PoisonAt(2, once=True), PoisonAt(4, once=True)]
    with pytest.raises(DivergenceError, match="more than max_skipped_steps=1"):
        quiet_trainer(max_steps=6, callbacks=[guard, *poisons]).fit(
            SimCLR(TinyConvNet(), projection_dim=8, warmup_epochs=0), RandomTwoViews(num_samples=64, batch_size=8)
        )


# ----------------------------------------------------------------------------- schedules and seams
@pytest.mark.parametrize("limit", [dict(max_steps=40, max_epochs=-1), dict(max_epochs=2)])
def test_warmup_lasts_its_epochs_with_max_steps_and_with_max_epochs(tmp_path, limit):
    """20 batches per epoch, warmup_epochs=1: the lr ramps over exactly 20 steps either way."""
    model = SimCLR(TinyConvNet(), projection_dim=8, warmup_epochs=1, optimizer="sgd", lr=1.0)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    quiet_trainer(callbacks=[Record()], **limit).fit(model, RandomTwoViews(num_samples=160, batch_size=8))
    assert len(lrs) == 40
    assert lrs[:20] == pytest.approx([(i + 1) / 20 for i in range(20)])
    assert lrs[20] == pytest.approx(1.0) and lrs[-1] < 0.01


def test_forward_is_the_frozen_representation_and_changes_no_state():
    model = SimCLR(TinyConvNet(), projection_dim=8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    out = model(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BN statistics untouched
    assert model.training and model.backbone.training  # modes restored
    torch.testing.assert_close(out, model.eval().representation(x))


def test_training_data_that_cannot_train_says_so(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        quiet_trainer(max_steps=2).fit(SimCLR(TinyConvNet()), RandomTwoViews(num_samples=8, batch_size=16))

    class Ragged(RandomTwoViews):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, drop_last=False)

    with pytest.raises(ValueError, match="single image"):
        quiet_trainer(max_steps=2).fit(SimCLR(TinyConvNet()), Ragged(num_samples=9, batch_size=8))


def test_checkpoint_of_another_method_is_named(tmp_path):
    model = SimCLR(backbone="resnet18", projection_dim=8)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, RandomTwoViews(num_samples=8, batch_size=8))
    trainer.save_checkpoint(tmp_path / "simclr.ckpt")
    with pytest.raises(TypeError, match="checkpoint of SimCLR, not of MoCoV2"):
        REGISTRY["mocov2"].cls.load_from_checkpoint(tmp_path / "simclr.ckpt")
    assert type(SSLMethod.load_from_checkpoint(tmp_path / "simclr.ckpt")) is SimCLR  # the base class dispatches
    moco = REGISTRY["mocov2"].build(size="small", backbone="resnet18")
    with pytest.raises(TypeError, match="written by SimCLR, but the model is MoCoV2"):
        quiet_trainer(max_steps=2).fit(
            moco, RandomTwoViews(num_samples=8, batch_size=8), ckpt_path=tmp_path / "simclr.ckpt"
        )


def test_final_report_is_bounded_and_skipped_without_training(tmp_path, capsys):
    dm = DigitsDataModule(batch_size=64, image_size=16)
    monitor = KNNMonitor(every_n_epochs=0, labels_per_class=[2], max_report_images=100)
    quiet_trainer(max_steps=1, callbacks=[monitor]).fit(SimCLR(TinyConvNet(), projection_dim=8), dm)
    out = capsys.readouterr()
    assert "all (100)" in out.out and "100 held-out images" in out.err + out.out
    monitor = KNNMonitor(every_n_epochs=0)
    quiet_trainer(max_steps=0, callbacks=[monitor]).fit(SimCLR(TinyConvNet(), projection_dim=8), dm)
    assert monitor.results == {}


def test_cli_errors_are_short_and_leave_no_empty_run_folder(tmp_path):
    config = write_config(tmp_path, "simclr")
    logged = yaml.safe_load(config.read_text())
    logged["trainer"]["logger"] = {
        "class_path": "pytorch_lightning.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path / "logs")},
    }
    config.write_text(yaml.safe_dump(logged))
    bad = cli("fit", "--config", str(config), "--model.init_args.temperature", "-1")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-2:] == [
        "lightning-ssl: error: temperature must be positive, got -1.0",
        "(set LIGHTNING_SSL_DEBUG=1 to see the traceback)",
    ]
    assert "Traceback" not in bad.stderr
    assert not list((tmp_path / "logs").rglob("version_*"))  # no empty version folder left behind
    typo = cli("fit", "--config", str(config), "--model.init_args.temprature", "0.1")
    assert typo.returncode == 2 and len(typo.stderr.strip().splitlines()) == 2
    assert "Option 'temprature' is not accepted (did you mean temperature?)" in typo.stderr
    missing = cli("fit", "--config", str(REPO / "configs" / "simclr_cifar10.yaml"), "--data.init_args.root", "/nope")
    assert (
        missing.returncode == 1 and "no CIFAR-10 data at /nope" in missing.stderr and "Traceback" not in missing.stderr
    )


def test_cli_resume_of_the_quickstart_config(tmp_path):
    """The documented resume command: the quickstart config, a checkpoint, then --ckpt_path last."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    trainer = config["trainer"]
    trainer["default_root_dir"] = trainer["logger"]["init_args"]["save_dir"] = str(tmp_path)
    trainer["callbacks"][0]["init_args"].update(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=1)
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(tmp_path / "quickstart.yaml"), "--trainer.enable_progress_bar", "false"]
    args += ["--data.init_args.batch_size", "64", "--data.init_args.image_size", "16"]
    first = cli(*args, "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli(*args, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert "Restoring states from the checkpoint path" in again.stdout + again.stderr
