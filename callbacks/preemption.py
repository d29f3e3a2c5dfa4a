"""Save a checkpoint and stop when the cluster asks the job to end (SIGTERM, or SLURM's SIGUSR1 warning)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_info

__all__ = ["PreemptionCheckpoint", "Preempted", "PREEMPTED_EXIT_CODE"]

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers and shells expect of a job ended by SIGTERM


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with status 143."""

    def __init__(self, path: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.path = path


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM or SIGUSR1, finish the current optimizer step, write a checkpoint and exit with status
    143, so that ``--ckpt_path last`` (or ``ckpt_path="last"``) resumes exactly where the run stopped.

    The checkpoint is ``last.ckpt`` in the ``ModelCheckpoint`` folder (``<default_root_dir>/checkpoints``
    without one). Under SLURM with Lightning's auto-requeue (a ``SLURMEnvironment``), SIGUSR1 is left to
    Lightning, which writes its own checkpoint and requeues the job; SIGTERM is handled here. In a
    multi-process run every process agrees on the step to stop at (one collective per step, only then).
    Methods attach this callback unless the trainer has one.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        unknown = [s for s in signals if not hasattr(signal, s)]
        if unknown:
            raise ValueError(f"unknown signal name(s) {unknown}; use names such as SIGTERM, SIGUSR1")
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        previous = self._previous.get(signum)
        if callable(previous):  # Lightning's own SIGTERM handler (it forwards the signal to launched children)
            previous(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        for name in self.signals:
            if name == "SIGUSR1" and slurm_requeue:
                continue
            signum = getattr(signal, name)
            previous = signal.getsignal(signum)
            if previous is not self._handler:
                self._previous[signum] = previous
                signal.signal(signum, self._handler)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = callback.dirpath if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
        folder = Path(folder) if folder else Path(trainer.default_root_dir) / "checkpoints"
        name = (callback.CHECKPOINT_NAME_LAST if isinstance(callback, ModelCheckpoint) else "last") + ".ckpt"
        return folder / name

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint (and no log line saying so)
        rank_zero_info(
            f"Received {self.received or 'a stop signal on another process'}: saved {path} at step "
            f"{trainer.global_step}; resume with --ckpt_path last (or ckpt_path={str(path)!r})."
        )
        raise Preempted(str(path))
