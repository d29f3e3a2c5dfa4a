"""Online speaker verification: EER and minDCF of the frozen encoder on held-out speakers during pretraining."""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_ssl.contracts import HasRepresentation, LabeledDataModule, require
from lightning_ssl.evaluation.speaker import make_trials, utterance_embeddings, verification_metrics

__all__ = ["SpeakerVerificationMonitor"]


class SpeakerVerificationMonitor(pl.Callback):
    """Every ``every_n_epochs`` epochs, embeds ``trainer.datamodule.labeled_dataloader("val")`` (the
    held-out speakers' utterances) with ``pl_module.representation`` in eval mode, scores trials by
    cosine after subtracting the mean embedding of those utterances (no labels used), and logs
    ``val/eer`` and ``val/min_dcf`` (P_target ``p_target``). Trials: every pair of utterances, or a
    fixed balanced sample of ``max_trials`` (``make_trials``). Under DDP every process embeds a shard
    and the embeddings are gathered, so all processes log the same values.
    """

    def __init__(
        self, every_n_epochs: int = 1, max_trials: int | None = 100_000, p_target: float = 0.01, seed: int = 0
    ):
        self.every_n_epochs, self.max_trials, self.p_target, self.seed = every_n_epochs, max_trials, p_target, seed
        self.last_metrics: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require(pl_module, HasRepresentation, "SpeakerVerificationMonitor", "a module with representation(waveforms)")
        require(
            trainer.datamodule,
            LabeledDataModule,
            "SpeakerVerificationMonitor",
            "a datamodule with labeled_dataloader('val') of held-out speakers",
        )

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        try:
            loader = trainer.datamodule.labeled_dataloader("val")
            embeddings, speakers = utterance_embeddings(pl_module.representation, loader, pl_module.device)
        finally:
            pl_module.train(was_training)
        trials = make_trials(speakers, self.max_trials, self.seed)
        return verification_metrics(embeddings, trials, center=embeddings.mean(0), p_target=self.p_target)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.last_metrics = self.evaluate(trainer, pl_module)
        pl_module.log("val/eer", self.last_metrics["eer"], prog_bar=True)
        pl_module.log("val/min_dcf", self.last_metrics["min_dcf"])
