"""Weighted kNN accuracy of the frozen backbone during and after pretraining."""

from __future__ import annotations

import pytorch_lightning as pl
from torch import nn

from lightning_ssl.contracts import HasRandomInit, HasRepresentation, LabeledDataModule, require
from lightning_ssl.evaluation.knn import extract_features, knn_accuracy

__all__ = ["KNNMonitor"]


class KNNMonitor(pl.Callback):
    """Weighted kNN top-1 (k = 200, T = 0.1; Wu et al. 2018) on the datamodule's labeled
    validation split against its labeled training split.

    Under DDP every process encodes a disjoint shard of each split and the features are gathered
    across processes, so all processes vote with the same full feature bank.

    Needs ``trainer.datamodule.labeled_dataloader(split)`` for ``split`` in ``"train"``, ``"val"``,
    yielding un-augmented ``(images, labels)``. Logs ``val/knn_top1`` every ``every_n_epochs``
    epochs (0: never during training). At the end of fit, with ``report=True``, prints a table of
    the pretrained backbone next to the same architecture at random initialization, with all
    training labels and with ``labels_per_class`` labels of each class.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 200,
        temperature: float = 0.1,
        labels_per_class: list[int] | None = None,
        report: bool = True,
        seed: int = 0,
    ):
        self.every_n_epochs = every_n_epochs
        self.k, self.temperature = k, temperature
        self.labels_per_class = list(labels_per_class or [])
        self.report = report
        self.seed = seed
        self.results: dict[str, dict[str, float]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require(pl_module, HasRepresentation, "KNNMonitor", "a module with representation(images)")
        if self.report:
            require(pl_module, HasRandomInit, "KNNMonitor(report=True)", "a module with random_init_backbone()")
        require(
            trainer.datamodule, LabeledDataModule, "KNNMonitor", "a datamodule with labeled_dataloader('train'|'val')"
        )

    def _evaluate(self, trainer: pl.Trainer, pl_module, backbone: nn.Module | None = None) -> dict[str, float]:
        dm = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        if backbone is not None:
            backbone.eval()
        try:
            encode = lambda x: pl_module.representation(x, backbone=backbone)  # noqa: E731
            train_x, train_y = extract_features(encode, dm.labeled_dataloader("train"), pl_module.device)
            val_x, val_y = extract_features(encode, dm.labeled_dataloader("val"), pl_module.device)
        finally:
            pl_module.train(was_training)
        return knn_accuracy(train_x, train_y, val_x, val_y, self.k, self.temperature, self.labels_per_class, self.seed)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        scores = self._evaluate(trainer, pl_module)
        for name, value in scores.items():
            key = "val/knn_top1" if name == "all" else f"val/knn_top1_{name}"
            pl_module.log(key, value, prog_bar=name == "all")

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not self.report:
            return
        self.results = {
            "pretrained": self._evaluate(trainer, pl_module),
            "random_init": self._evaluate(trainer, pl_module, pl_module.random_init_backbone(self.seed)),
        }
        n_train = len(trainer.datamodule.labeled_dataloader("train").dataset)
        lines = [
            f"Weighted kNN top-1 on the held-out split (k={self.k}, T={self.temperature}), frozen backbone:",
            f"  {'training labels':<22}{'pretrained':>12}{'random init':>14}",
        ]
        for name in self.results["pretrained"]:
            label = f"all ({n_train})" if name == "all" else name.replace("_", " ")
            lines.append(
                f"  {label:<22}{self.results['pretrained'][name]:>12.4f}{self.results['random_init'][name]:>14.4f}"
            )
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)
