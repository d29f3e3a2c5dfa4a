"""Weighted kNN accuracy of the frozen backbone during and after pretraining."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from lightning_ssl.distributed import gather_no_grad, rank, world_size
from lightning_ssl.evaluation.knn import extract_features, few_labels_subset, weighted_knn_predict

__all__ = ["KNNMonitor"]


def _extract_sharded(encode, loader: DataLoader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the whole split, in dataset order. Under DDP each process encodes
    every ``world_size``-th example and the features are gathered (``gather_no_grad``), so every
    process holds the same full set for the kNN vote."""
    world = world_size()
    if world == 1 or len(loader.dataset) < world:
        return extract_features(encode, loader, device)
    n = len(loader.dataset)
    mine = torch.arange(rank(), n, world)
    shard = DataLoader(Subset(loader.dataset, mine.tolist()), batch_size=loader.batch_size or 256, shuffle=False)
    feats, labels = extract_features(encode, shard, device)
    per_rank = -(-n // world)  # all_gather needs equal sizes: pad, and mark the padding with index -1
    pad = per_rank - len(mine)
    index = torch.cat([mine, torch.full((pad,), -1)]).to(device)
    feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])]).to(device)
    labels = torch.cat([labels.long(), labels.new_zeros(pad).long()]).to(device)
    index, feats, labels = gather_no_grad(index), gather_no_grad(feats).cpu(), gather_no_grad(labels).cpu()
    index = index.cpu()
    keep = index >= 0
    order = index[keep].argsort()
    return feats[keep][order], labels[keep][order]


class KNNMonitor(pl.Callback):
    """Weighted kNN top-1 (k = 200, T = 0.1; Wu et al. 2018) on the datamodule's labelled
    validation split against its labelled training split.

    Under DDP every process encodes a disjoint shard of each split and the features are gathered
    across processes, so all processes vote with the same full feature bank.

    Needs ``trainer.datamodule.labelled_dataloader(split)`` for ``split`` in ``"train"``, ``"val"``,
    yielding un-augmented ``(images, labels)``. Logs ``val/knn_top1`` every ``every_n_epochs``
    epochs (0: never during training). At the end of fit, with ``report=True``, prints a table of
    the pretrained backbone next to the same architecture at random initialisation, with all
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

    def _loaders(self, trainer: pl.Trainer):
        dm = trainer.datamodule
        if dm is None or not callable(getattr(dm, "labelled_dataloader", None)):
            raise TypeError(
                "KNNMonitor needs a datamodule with labelled_dataloader('train'|'val'); "
                f"got {type(dm).__name__ if dm is not None else 'no datamodule'}"
            )
        return dm.labelled_dataloader("train"), dm.labelled_dataloader("val")

    def _evaluate(self, trainer: pl.Trainer, pl_module, backbone=None) -> dict[str, float]:
        train_loader, val_loader = self._loaders(trainer)
        was_training = pl_module.training
        pl_module.eval()
        if backbone is not None:
            backbone.eval()
        try:
            encode = lambda x: pl_module.representation(x, backbone=backbone)  # noqa: E731
            train_x, train_y = _extract_sharded(encode, train_loader, pl_module.device)
            val_x, val_y = _extract_sharded(encode, val_loader, pl_module.device)
        finally:
            pl_module.train(was_training)
        num_classes = int(torch.cat([train_y, val_y]).max()) + 1
        out = {}
        settings = [("all", None)] + [(f"{n}_per_class", n) for n in self.labels_per_class]
        for name, per_class in settings:
            idx = torch.arange(len(train_y)) if per_class is None else few_labels_subset(train_y, per_class, self.seed)
            pred = weighted_knn_predict(train_x[idx], train_y[idx], val_x, num_classes, self.k, self.temperature)
            out[name] = (pred == val_y).float().mean().item()
        return out

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
        n_train = len(self._loaders(trainer)[0].dataset)
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
