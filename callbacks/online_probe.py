"""Online linear probe: a linear classifier trained on detached backbone features during pretraining
(as Bolts' ``SSLOnlineEvaluator`` and solo-learn's online classifier; Chen et al. 2020 report it
tracks offline linear accuracy).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy

from lightning_ssl.contracts import HasRepresentation, LabeledDataModule, require
from lightning_ssl.distributed import is_distributed, rank, world_size

__all__ = ["OnlineLinearProbe"]


class OnlineLinearProbe(pl.Callback):
    """Trains ``nn.Linear(feature_dim, num_classes)`` on the backbone's features of the first view of
    every training batch ``(views, target)`` whose targets are labels (entries ``< 0`` mean
    "unlabeled" and are skipped), with its own Adam optimizer stepped here. Features come from
    ``pl_module.representation`` under ``no_grad`` with the module in eval mode, so no gradient and no
    BN-statistics update reaches the backbone.

    Every ``every_n_epochs`` epochs, top-1/top-5 (torchmetrics) on
    ``trainer.datamodule.labeled_dataloader("val")`` are logged as ``probe/top1`` and ``probe/top5``;
    ``probe/train_loss`` is logged on training batches.

    Distributed: the probe starts from the same seeded weights on every process and its gradients
    are averaged over processes before each step, so there is one set of weights; each process
    validates a disjoint shard of the validation set and the metrics are reduced over processes.
    The probe and its optimizer are saved in and restored from checkpoints.
    """

    def __init__(
        self,
        num_classes: int,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        every_n_epochs: int = 1,
        seed: int = 0,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes, self.lr, self.weight_decay = num_classes, lr, weight_decay
        self.every_n_epochs, self.seed = every_n_epochs, seed
        self.probe: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None
        self._warned_unlabeled = False
        self.last_metrics: dict[str, float] = {}

    # ----------------------------------------------------------------- construction & state
    def _ensure_probe(self, feature_dim: int, device: torch.device) -> nn.Linear:
        if self.probe is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.probe = nn.Linear(feature_dim, self.num_classes)
            self.probe.to(device)
            if is_distributed():  # one set of weights even if a process was seeded differently
                for p in self.probe.parameters():
                    dist.broadcast(p.data, src=0)
            self.optimizer = torch.optim.Adam(self.probe.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            if self._pending_state is not None:
                self.probe.load_state_dict(self._pending_state["probe"])
                self.optimizer.load_state_dict(self._pending_state["optimizer"])
                self._pending_state = None
        return self.probe

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dim = getattr(pl_module, "feature_dim", None)
        if dim is not None:
            self._ensure_probe(int(dim), pl_module.device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require(pl_module, HasRepresentation, "OnlineLinearProbe", "a module with representation(images)")
        if self.every_n_epochs > 0:
            require(
                trainer.datamodule,
                LabeledDataModule,
                "OnlineLinearProbe",
                "a datamodule with labeled_dataloader('val')",
            )
        if self.probe is not None:
            self.probe.to(pl_module.device)
            for state in self.optimizer.state.values():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and k != "step":
                        state[k] = v.to(pl_module.device)

    def state_dict(self) -> dict[str, Any]:
        if self.probe is None:
            return dict(self._pending_state or {})
        return {"probe": self.probe.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.probe is None:
            self._pending_state = state_dict
        else:
            self.probe.load_state_dict(state_dict["probe"])
            self.optimizer.load_state_dict(state_dict["optimizer"])

    # ----------------------------------------------------------------- features
    @staticmethod
    @torch.no_grad()
    def _features(pl_module: pl.LightningModule, images: torch.Tensor) -> torch.Tensor:
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            return pl_module.representation(images).detach().float()
        finally:
            for module, mode in modes:  # restore each submodule's own mode
                module.training = mode

    # ----------------------------------------------------------------- training
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        views, target = batch
        images = views[0] if isinstance(views, (list, tuple)) else views
        loss = self.train_step(pl_module, images, target)
        if loss is not None:
            pl_module.log("probe/train_loss", loss, on_step=True, on_epoch=False)

    def train_step(self, pl_module: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """One probe update on the labeled examples (``target >= 0``) of a batch; returns this
        process's mean loss, or ``None`` when it had no labeled example."""
        device = next(pl_module.parameters()).device
        target = torch.as_tensor(target, device=device)
        labeled = target >= 0
        if not bool(labeled.any()) and not is_distributed():
            if not self._warned_unlabeled:
                rank_zero_warn(
                    "OnlineLinearProbe: training batches carry no labels (targets < 0); the probe does not train."
                )
                self._warned_unlabeled = True
            return None
        feats = self._features(pl_module, images.to(device))
        probe = self._ensure_probe(feats.shape[1], feats.device)
        count = labeled.sum().float()
        total = count.clone()
        if is_distributed():  # every process takes part, even with no labeled example of its own
            dist.all_reduce(total)
        with torch.enable_grad():
            logits = probe(feats[labeled])
            loss_sum = F.cross_entropy(logits, target[labeled], reduction="sum") if count > 0 else logits.sum() * 0.0
            self.optimizer.zero_grad(set_to_none=False)
            # sum over local labeled examples / their global count, x world size: the average of
            # the gradients over processes then equals one process holding every labeled example
            (loss_sum * world_size() / total.clamp_min(1)).backward()
        if is_distributed():
            for p in probe.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size()
        if total > 0:
            self.optimizer.step()
        return loss_sum.detach() / count if count > 0 else None

    # ----------------------------------------------------------------- validation
    def _val_loader(self, trainer: pl.Trainer) -> DataLoader:
        loader = trainer.datamodule.labeled_dataloader("val")
        if world_size() > 1:  # a disjoint shard per process; the metrics are summed over processes
            shard = Subset(loader.dataset, list(range(rank(), len(loader.dataset), world_size())))
            loader = DataLoader(shard, batch_size=loader.batch_size or 256, shuffle=False, num_workers=0)
        return loader

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Top-1/top-5 of the probe on the labeled validation split, reduced over processes."""
        if self.probe is None:
            raise RuntimeError(
                "the probe has not been built yet (no labeled training batch and no pl_module.feature_dim)"
            )
        device = pl_module.device
        top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro").to(device)
        top5 = MulticlassAccuracy(self.num_classes, top_k=min(5, self.num_classes), average="micro").to(device)
        self.probe.eval()
        for images, target in self._val_loader(trainer):
            logits = self.probe(self._features(pl_module, images.to(device)))
            target = torch.as_tensor(target, device=device)
            top1.update(logits, target)
            top5.update(logits, target)
        self.probe.train()
        # compute() all-reduces the confusion counts over processes (torchmetrics' dist_sync)
        return {"top1": float(top1.compute()), "top5": float(top5.compute())}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs <= 0 or (trainer.current_epoch + 1) % self.every_n_epochs != 0 or self.probe is None:
            return
        self.last_metrics = self.evaluate(trainer, pl_module)
        pl_module.log("probe/top1", self.last_metrics["top1"], prog_bar=True)
        pl_module.log("probe/top5", self.last_metrics["top5"])
