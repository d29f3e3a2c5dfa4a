"""What a person watching a run sees: a W&B offline run (decoded here without wandb's API or network)
with the learning rate, the EMA rate, the view grid, the embedding picture, the final metrics and
table, and the whole configuration; the same pictures next to CSV logs; the progress bar's loss with
no host synchronization between its reads; the end-of-run summary."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from conftest import TinyConvNet
from helpers import SyncCounter, quiet_trainer
from wandb.proto import wandb_internal_pb2

from lightning_ssl import BYOL, SimCLR
from lightning_ssl.callbacks import KNNMonitor, SSLProgressBar
from lightning_ssl.datamodules import DigitsDataModule

REPO = Path(__file__).resolve().parents[1]


def read_wandb_run(run_dir: Path) -> dict:
    """Decode an offline run's ``run-*.wandb`` file: W&B writes protobuf ``Record``s in the LevelDB log
    format (a 7-byte file header, then 32 KiB blocks of records, each with a 7-byte header: CRC32,
    length, fragment type FULL=1/FIRST=2/MIDDLE=3/LAST=4). Returns the config, the history rows and the
    media files. Waits (up to a minute) for the run's ``exit`` record: W&B's service may still be writing
    after ``finish()`` returns."""
    deadline = time.monotonic() + 60
    while True:
        records = _records(next(run_dir.glob("run-*.wandb")).read_bytes())
        kinds = {r.WhichOneof("record_type") for r in records}
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    config, history = {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    media = sorted(p.relative_to(run_dir / "files").as_posix() for p in (run_dir / "files").rglob("*") if p.is_file())
    return {"config": config, "history": history, "media": media}


def _records(data: bytes) -> list:
    records, fragment, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            fragment = chunk if kind == 2 else fragment + chunk
        elif kind == 4:
            records.append(fragment + chunk)
        elif kind == 0 and length == 0:
            break
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def digits(**kw) -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, image_size=16, val_fraction=0.9, **kw)


def test_wandb_offline_run_has_the_dashboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = pl.loggers.WandbLogger(project="lightning-ssl-test", offline=True, save_dir=str(tmp_path))
    model = BYOL(TinyConvNet(), projection_hidden_dim=32, projection_dim=16, warmup_epochs=1)
    trainer = quiet_trainer(
        max_epochs=2,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[
            KNNMonitor(every_n_epochs=1, labels_per_class=[2], max_report_images=100),
            pl.callbacks.LearningRateMonitor(),
        ],
    )
    trainer.fit(model, digits())
    logger.experiment.finish()
    run = read_wandb_run(next((tmp_path / "wandb").glob("offline-run-*")))
    logged = {key for row in run["history"] for key in row}
    assert {"lr-LARS/pg1", "train/ema_tau", "train/loss", "val/knn_top1"} <= logged
    assert {
        "final/knn_top1_pretrained",
        "final/knn_top1_random_init",
        "final/knn_top1_2_per_class_pretrained",
    } <= logged
    assert any(key.startswith("final/knn/") for key in logged)  # the W&B table
    assert any(m.startswith("media/images/media/views") for m in run["media"])
    assert any(m.startswith("media/images/media/embeddings") for m in run["media"])
    assert any(m.startswith("media/table/final/knn") for m in run["media"])
    config = run["config"]
    assert config["ema_tau"] == 0.996 and config["projection_dim"] == 16  # the method's arguments
    assert config["trainer/max_epochs"] == 2 and config["seed"] == torch.initial_seed()  # trainer and seed
    assert config["data/batch_size"] == 32 and config["data/augmentation"] == "digits"  # the data


def test_cli_run_config_holds_the_whole_resolved_config(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(max_steps=2, default_root_dir=str(tmp_path), enable_progress_bar=False)
    config["trainer"]["logger"] = {
        "class_path": "pytorch_lightning.loggers.WandbLogger",
        "init_args": {"project": "quickstart", "offline": True, "save_dir": str(tmp_path)},
    }
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "KNNMonitor" not in c["class_path"]]
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    config["data"]["init_args"].update(image_size=16, batch_size=64)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "lightning_ssl", "fit", "--config", str(tmp_path / "run.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = read_wandb_run(next((tmp_path / "wandb").glob("offline-run-*")))
    resolved = run["config"]["config"]
    assert resolved["model"]["class_path"] == "lightning_ssl.SimCLR" and resolved["seed_everything"] == 0
    assert resolved["data"]["init_args"]["batch_size"] == 64 and resolved["trainer"]["max_steps"] == 2
    assert "W&B (offline)" in done.stdout and "wandb sync" in done.stdout  # the summary says where it went


def test_without_wandb_the_pictures_go_next_to_the_csv_logs(tmp_path, capsys):
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = quiet_trainer(
        max_epochs=1, logger=logger, callbacks=[KNNMonitor(every_n_epochs=0, max_report_images=100)]
    )
    trainer.fit(SimCLR(TinyConvNet(), projection_dim=8), digits())
    images = Path(logger.log_dir) / "images"
    assert (images / "media_views.png").is_file() and (images / "media_embeddings.png").is_file()
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "final/knn_top1_pretrained" in metrics and "final/knn_top1_random_init" in metrics
    summary = capsys.readouterr().out
    assert "Run finished: SimCLR, 5 optimizer steps (1 epochs)" in summary
    assert f"metrics: {Path(logger.log_dir) / 'metrics.csv'}" in summary and f"pictures: {images}" in summary


class _Views(torch.utils.data.Dataset):
    def __init__(self):
        self.views = torch.randn(2, 64, 3, 16, 16)

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return [self.views[0, i], self.views[1, i]], 0


def test_progress_bar_shows_the_loss_and_syncs_only_when_it_reads_it(tmp_path, monkeypatch):
    counter, bar = SyncCounter(), SSLProgressBar()
    trainer = quiet_trainer(max_steps=7, log_every_n_steps=3, callbacks=[counter, bar], enable_progress_bar=True)
    counter.patch(monkeypatch)
    trainer.fit(SimCLR(TinyConvNet(), projection_dim=8), torch.utils.data.DataLoader(_Views(), batch_size=8))
    # after steps 1..6 (the counter sees each step at the next batch start): reads at global steps 3 and 6,
    # each one .item() by Lightning's logger (train/loss at log steps) and one float() by the bar
    assert counter.per_step == [0, 0, 2, 0, 0, 2], counter.per_step
    shown = bar.get_metrics(trainer, trainer.lightning_module)
    assert "loss" in shown and float(shown["loss"]) > 0 and "img/s" in shown and "v_num" not in shown


def test_cli_progress_bar_prints_the_loss(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(max_steps=3, log_every_n_steps=1, default_root_dir=str(tmp_path), logger=False)
    config["trainer"]["callbacks"] = []
    config["data"]["init_args"].update(image_size=16, batch_size=64)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "lightning_ssl", "fit", "--config", str(tmp_path / "run.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    bar = done.stdout + done.stderr  # Lightning's tqdm bars write to stdout
    assert "loss=" in bar and "img/s=" in bar and "v_num" not in bar


def test_embedding_picture_leaves_the_matplotlib_backend_alone():
    """A notebook's inline backend survives the embedding picture a run logs (plots after fit still show)."""
    import matplotlib

    from lightning_ssl.visualize import embedding_scatter

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        image = embedding_scatter(torch.randn(40, 8), torch.arange(40) % 4, ["a", "b", "c", "d"])
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
