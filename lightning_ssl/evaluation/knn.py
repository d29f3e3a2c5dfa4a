"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, sec. 3.4).

Cosine similarity to the training features; each of the k neighbours votes for its class with
weight ``exp(s / T)``; defaults k = 200, T = 0.1.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = ["weighted_knn_predict", "extract_features", "few_labels_subset"]


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
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encode`` over ``(images, labels)`` batches; return all features and labels (on CPU)."""
    feats, labels = [], []
    for images, target in loader:
        feats.append(encode(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(target).cpu())
    return torch.cat(feats), torch.cat(labels)


def few_labels_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` examples of each class (all of a class when it has fewer), chosen
    deterministically from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero(as_tuple=True)[0]
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values
