"""Weights & Biases logging works offline (no network): metrics land in the local run directory."""

import pytorch_lightning as pl
from helpers import RandomTwoViews, quiet_trainer

from lightning_ssl import BYOL


def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = pl.loggers.WandbLogger(project="lightning-ssl-test", offline=True, save_dir=str(tmp_path))
    model = BYOL(backbone="resnet18", projection_hidden_dim=32, projection_dim=16, warmup_epochs=0)
    trainer = quiet_trainer(
        max_steps=2,
        logger=logger,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, RandomTwoViews(num_samples=16, batch_size=8))
    logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
