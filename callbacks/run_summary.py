"""Record the whole run configuration in the loggers, and say at the end what happened and where it is."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_ssl.visualize import image_dir

__all__ = ["RunSummary"]


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else (f"{minutes} min {seconds} s" if minutes else f"{seconds} s")


class RunSummary(pl.Callback):
    """At the start of fit, adds the trainer's settings, the global batch and the seed to every logger's run
    configuration (the method's and the datamodule's arguments are there already; under the CLI the
    whole resolved config is). At the end, prints what ran, what was measured and where the checkpoint,
    the logs, the pictures and the W&B run are. Methods attach it unless the trainer has one."""

    def __init__(self):
        self._start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        settings = {
            "trainer/max_epochs": trainer.max_epochs,
            "trainer/max_steps": trainer.max_steps,
            "trainer/precision": str(trainer.precision),
            "trainer/accelerator": type(trainer.accelerator).__name__,
            "trainer/devices": trainer.num_devices,
            "trainer/num_nodes": trainer.num_nodes,
            "trainer/world_size": trainer.world_size,
            "trainer/accumulate_grad_batches": trainer.accumulate_grad_batches,
            "trainer/log_every_n_steps": trainer.log_every_n_steps,
            "seed": torch.initial_seed(),
            "method": type(pl_module).__name__,
        }
        datamodule = trainer.datamodule
        if datamodule is not None:
            settings["data/class"] = type(datamodule).__name__
            settings.update({f"data/{k}": v for k, v in getattr(datamodule, "hparams", {}).items()})
        for logger in trainer.loggers:
            logger.log_hyperparams(settings)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        batches = trainer.num_training_batches
        epochs = trainer.global_step * trainer.accumulate_grad_batches / batches if 0 < batches < float("inf") else None
        lines = [
            f"Run finished: {type(pl_module).__name__}, {trainer.global_step} optimizer steps"
            f"{f' ({epochs:.3g} epochs)' if epochs is not None else ''} in {_duration(time.monotonic() - self._start)}."
        ]
        loss = trainer.callback_metrics.get("train/loss")
        if isinstance(loss, torch.Tensor):
            lines[0] += f" Last logged loss {float(loss):.4g}."
        lines += self._measured(trainer)
        lines += self._where(trainer)
        print("\n".join(lines), flush=True)

    @staticmethod
    def _measured(trainer: pl.Trainer) -> list[str]:
        out = []
        for callback in trainer.callbacks:
            results = getattr(callback, "results", None)
            if isinstance(results, dict) and "pretrained" in results and "all" in results["pretrained"]:
                pre, rand = results["pretrained"]["all"], results["random_init"]["all"]
                out.append(f"  kNN top-1 (held-out): {pre:.4f} pretrained vs {rand:.4f} random init")
            metrics = getattr(callback, "last_metrics", None)
            if isinstance(metrics, dict) and "top1" in metrics:
                out.append(f"  online linear probe top-1 (held-out): {metrics['top1']:.4f}")
        return out

    @staticmethod
    def _where(trainer: pl.Trainer) -> list[str]:
        out = []
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt"
            shown = last if last.exists() else checkpoint.best_model_path or checkpoint.dirpath
            out.append(f"  checkpoint: {shown}  (resume: --ckpt_path last; export: lightning-ssl export CKPT OUT.pt)")
        files = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                mode = "offline" if getattr(run.settings, "_offline", False) else "online"
                where = Path(run.dir).parent if mode == "offline" else run.url
                hint = f"  (upload: wandb sync {where})" if mode == "offline" else ""
                out.append(f"  W&B ({mode}): {where}{hint}")
            elif isinstance(logger, TensorBoardLogger):
                out.append(f"  TensorBoard: tensorboard --logdir {logger.log_dir}")
            elif isinstance(logger, CSVLogger):
                out.append(f"  metrics: {Path(logger.log_dir) / 'metrics.csv'}")
                files = True
            else:
                files = True
        if files and image_dir(trainer).is_dir():
            out.append(f"  pictures: {image_dir(trainer)}")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}
