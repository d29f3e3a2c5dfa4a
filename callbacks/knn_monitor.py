"""Weighted kNN accuracy of the frozen backbone during and after pretraining."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_ssl.contracts import HasRandomInit, HasRepresentation, LabeledDataModule, require
from lightning_ssl.evaluation.knn import extract_features, knn_accuracy
from lightning_ssl.visualize import embedding_scatter, log_image

__all__ = ["KNNMonitor"]


class KNNMonitor(pl.Callback):
    """Weighted kNN top-1 (k = 200, T = 0.1; Wu et al. 2018) on the datamodule's labeled
    validation split against its labeled training split.

    Under DDP every process encodes a disjoint shard of each split and the features are gathered
    across processes, so all processes vote with the same full feature bank.

    Needs ``trainer.datamodule.labeled_dataloader(split)`` for ``split`` in ``"train"``, ``"val"``,
    yielding un-augmented ``(images, labels)``. Logs ``val/knn_top1`` every ``every_n_epochs``
    epochs (0: never during training). At the end of fit, with ``report=True``, prints a table of
    the pretrained backbone next to the same architecture at random initialization (its batch-norm
    statistics recomputed on the training images, no weight changed: ``calibrate_norm_statistics``), with all
    training labels and with ``labels_per_class`` labels of each class. The report encodes at most
    ``max_report_images`` images of each split (an evenly spaced subset; ``None``: all), shows its
    progress, and is skipped when the run took no optimizer step.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 200,
        temperature: float = 0.1,
        labels_per_class: list[int] | None = None,
        report: bool = True,
        seed: int = 0,
        max_report_images: int | None = 10_000,
    ):
        self.every_n_epochs = every_n_epochs
        self.k, self.temperature = k, temperature
        self.labels_per_class = list(labels_per_class or [])
        self.report = report
        self.seed = seed
        self.max_report_images = max_report_images
        self.results: dict[str, dict[str, float]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require(pl_module, HasRepresentation, "KNNMonitor", "a module with representation(images)")
        if self.report:
            require(pl_module, HasRandomInit, "KNNMonitor(report=True)", "a module with random_init_backbone()")
        require(
            trainer.datamodule, LabeledDataModule, "KNNMonitor", "a datamodule with labeled_dataloader('train'|'val')"
        )

    def _loaders(self, trainer: pl.Trainer, limit: int | None) -> tuple[DataLoader, DataLoader]:
        loaders = []
        for split in ("train", "val"):
            loader = trainer.datamodule.labeled_dataloader(split)
            n = len(loader.dataset)
            if limit is not None and n > limit:  # an evenly spaced subset keeps every class in proportion
                keep = torch.linspace(0, n - 1, limit).round().long().unique().tolist()
                loader = DataLoader(
                    Subset(loader.dataset, keep), batch_size=loader.batch_size, num_workers=loader.num_workers
                )
            loaders.append(loader)
        return loaders[0], loaders[1]

    def _evaluate(
        self, trainer: pl.Trainer, pl_module, backbone: nn.Module | None = None, limit: int | None = None, desc=None
    ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """kNN scores, and the held-out features and labels they came from."""
        train_loader, val_loader = self._loaders(trainer, limit)
        was_training = pl_module.training
        pl_module.eval()
        if backbone is not None:
            backbone.eval()
        try:
            # in the module's precision (float64 under precision='64-true'): these loaders bypass Lightning's
            encode = lambda x: pl_module.representation(x.to(pl_module.dtype), backbone=backbone)  # noqa: E731
            train_x, train_y = extract_features(encode, train_loader, pl_module.device, desc and f"{desc}: train")
            val_x, val_y = extract_features(encode, val_loader, pl_module.device, desc and f"{desc}: held-out")
        finally:
            pl_module.train(was_training)
        scores = knn_accuracy(
            train_x, train_y, val_x, val_y, self.k, self.temperature, self.labels_per_class, self.seed
        )
        return scores, val_x, val_y

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        scores, _, _ = self._evaluate(trainer, pl_module)
        for name, value in scores.items():
            key = "val/knn_top1" if name == "all" else f"val/knn_top1_{name}"
            pl_module.log(key, value, prog_bar=name == "all")

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not self.report:
            return
        if trainer.global_step == 0:
            rank_zero_info("KNNMonitor: no optimizer step was taken, so there is no pretrained encoder to report on.")
            return
        train_loader, val_loader = self._loaders(trainer, self.max_report_images)
        n_train, n_val = len(train_loader.dataset), len(val_loader.dataset)
        if trainer.is_global_zero:
            full = [len(trainer.datamodule.labeled_dataloader(split).dataset) for split in ("train", "val")]
            cut = full != [n_train, n_val]
            subsets = f" (evenly spaced subsets of at most max_report_images={self.max_report_images})" if cut else ""
            print(
                f"Final report: weighted kNN of the pretrained and of a random-init encoder on {n_train} training "
                f"and {n_val} held-out images{subsets}...",
                flush=True,
            )
        bar, limit = trainer.progress_bar_callback is not None, self.max_report_images
        # the baseline's batch-norm statistics recomputed on training images (no weight change): honest
        random_init = pl_module.random_init_backbone(self.seed, calibrate_on=train_loader, max_images=limit)
        pretrained, val_x, val_y = self._evaluate(trainer, pl_module, None, limit, "pretrained" if bar else None)
        baseline, _, _ = self._evaluate(trainer, pl_module, random_init, limit, "random init" if bar else None)
        self.results = {"pretrained": pretrained, "random_init": baseline}
        self._log_results(trainer, n_train)
        classes = getattr(trainer.datamodule, "classes", None)
        title = f"{type(pl_module).__name__}: held-out embeddings after {trainer.global_step} steps (PCA)"
        log_image(trainer, "media/embeddings", embedding_scatter(val_x, val_y, classes, title=title))
        lines = [
            f"Weighted kNN top-1 on the held-out split (k={self.k}, T={self.temperature}), frozen backbone "
            "(random init: batch-norm statistics recomputed on the training images):",
            f"  {'training labels':<22}{'pretrained':>12}{'random init':>14}",
        ]
        for name in self.results["pretrained"]:
            label = f"all ({n_train})" if name == "all" else name.replace("_", " ")
            lines.append(
                f"  {label:<22}{self.results['pretrained'][name]:>12.4f}{self.results['random_init'][name]:>14.4f}"
            )
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)

    def _log_results(self, trainer: pl.Trainer, n_train: int) -> None:
        """The final table as metrics ``final/knn_top1[_<n>_per_class]_{pretrained,random_init}`` in every
        logger (metrics.csv included) and, in W&B, as the table ``final/knn``."""
        if not trainer.is_global_zero:
            return
        metrics = {}
        for encoder, scores in self.results.items():
            for name, value in scores.items():
                suffix = "" if name == "all" else f"_{name}"
                metrics[f"final/knn_top1{suffix}_{encoder}"] = value
        labels = {
            name: f"all ({n_train})" if name == "all" else name.replace("_", " ") for name in self.results["pretrained"]
        }
        rows = [[labels[n], self.results["pretrained"][n], self.results["random_init"][n]] for n in labels]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_table(key="final/knn", columns=["training labels", "pretrained", "random init"], data=rows)
            logger.save()
