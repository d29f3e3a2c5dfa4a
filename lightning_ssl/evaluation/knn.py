"""Weighted k-nearest-neighbor classification of frozen features (Wu et al. 2018, sec. 3.4).

Cosine similarity to the training features; each of the k neighbors votes for its class with
weight ``exp(s / T)``; defaults k = 200, T = 0.1. ``extract_features`` encodes a labeled loader
(sharded over processes in a distributed run); ``knn_accuracy`` scores a split against another,
with all training labels and with a few labels per class. The kNN monitor, the final report and
the benchmarks all use these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lightning_ssl.distributed import gather_no_grad, rank, world_size

__all__ = ["weighted_knn_predict", "extract_features", "few_labels_subset", "knn_accuracy"]


@torch.no_grad()
def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class of each test feature. ``k`` larger than the training set uses all of it;
    ties in the class scores go to the smaller class index (``argmax``)."""
    if train_features.shape[0] == 0:
        raise ValueError("weighted kNN needs at least one training feature")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} training features but {train_labels.shape[0]} labels")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    preds = []
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)  # n x k
        weights = (sims / temperature).exp()
        scores = torch.zeros(test.shape[0], num_classes, device=test.device)
        scores.scatter_add_(1, labels[idx], weights)
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds)


@torch.no_grad()
def _encode_all(
    encode: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device | str,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    if desc is not None:  # a progress bar, on the first process only
        loader = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=rank() != 0)
    for images, target in loader:
        feats.append(encode(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(target).cpu())
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encode`` over ``(images, labels)`` batches; return all features and labels (on CPU), in
    dataset order.

    In a distributed run, with a ``DataLoader`` over a map-style dataset, each process encodes every
    ``world_size``-th example and the features are gathered, so every process returns the same full
    set at a fraction of the cost."""
    world = world_size()
    dataset = getattr(loader, "dataset", None)
    if world == 1 or not isinstance(loader, DataLoader) or dataset is None or len(dataset) < world:
        return _encode_all(encode, loader, device, desc)
    n = len(dataset)
    mine = torch.arange(rank(), n, world)
    shard = DataLoader(Subset(dataset, mine.tolist()), batch_size=loader.batch_size or 256, shuffle=False)
    feats, labels = _encode_all(encode, shard, device, desc)
    per_rank = -(-n // world)  # all_gather needs equal sizes: pad, and mark the padding with index -1
    pad = per_rank - len(mine)
    index = torch.cat([mine, torch.full((pad,), -1)]).to(device)
    feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])]).to(device)
    labels = torch.cat([labels.long(), labels.new_zeros(pad).long()]).to(device)
    index, feats, labels = gather_no_grad(index).cpu(), gather_no_grad(feats).cpu(), gather_no_grad(labels).cpu()
    keep = index >= 0
    order = index[keep].argsort()
    return feats[keep][order], labels[keep][order]


def few_labels_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` examples of each class (all of a class when it has fewer), chosen
    deterministically from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero(as_tuple=True)[0]
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    labels_per_class: Sequence[int] = (),
    seed: int = 0,
) -> dict[str, float]:
    """Weighted kNN top-1 on the validation features: ``{"all": ...}`` with every training label and
    ``{"<n>_per_class": ...}`` with ``n`` training labels per class (a fixed subset from ``seed``). An ``n``
    at least the largest class's count would use every label, the same as ``"all"``: it has no entry."""
    num_classes = int(torch.cat([train_labels, val_labels]).max()) + 1
    largest_class = int(torch.bincount(train_labels).max()) if len(train_labels) else 0
    out = {}
    for name, per_class in [("all", None)] + [(f"{n}_per_class", n) for n in labels_per_class]:
        if per_class is not None and per_class >= largest_class:
            continue
        idx = torch.arange(len(train_labels)) if per_class is None else few_labels_subset(train_labels, per_class, seed)
        pred = weighted_knn_predict(train_features[idx], train_labels[idx], val_features, num_classes, k, temperature)
        out[name] = (pred == val_labels).float().mean().item()
    return out
