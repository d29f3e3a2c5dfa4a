"""Pictures of a run, and sending them to whichever loggers the trainer has.

- ``view_pairs_grid``: the first images of two views side by side (de-normalized), one pair per row:
  what the augmentation recipe really produces.
- ``embedding_scatter``: a 2-D map of embeddings colored by class (PCA; t-SNE with ``method="tsne"``,
  from scikit-learn, a dependency of the quickstart).
- ``log_image``: to W&B (``WandbLogger.log_image``), TensorBoard (``add_image``) and, for every other
  logger (CSV), to ``<log_dir>/images/<key>.png`` next to the metrics. A trainer without loggers
  (``logger=False``) gets no pictures: nothing is written to the working directory.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

__all__ = ["view_pairs_grid", "embedding_scatter", "log_image", "image_dir"]


def _denormalize(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    else:  # unknown normalization: stretch each image to [0, 1]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return x.clamp(0, 1)


def view_pairs_grid(
    views: Sequence[torch.Tensor],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    n: int = 8,
    min_side: int = 64,
) -> np.ndarray:
    """``H x W x 3`` uint8 picture: row i shows the views of image i side by side (global views first; views of
    other sizes are resized to the first view's size). Small images are upsampled to ``min_side`` pixels."""
    first = views[0]
    n = min(n, first.shape[0])
    side = max(first.shape[-1], min_side)
    columns = []
    for view in views:
        x = _denormalize(view[:n], mean, std)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        columns.append(F.interpolate(x[:, :3], size=(side, side), mode="nearest"))
    pad = 2
    rows = []
    for i in range(n):
        row = [F.pad(c[i], (pad, pad, pad, pad), value=1.0) for c in columns]
        rows.append(torch.cat(row, dim=2))
    grid = torch.cat(rows, dim=1)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def embedding_scatter(
    features: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str] | None = None,
    method: str = "pca",
    title: str = "",
    max_points: int = 5000,
) -> np.ndarray:
    """``H x W x 3`` uint8 scatter plot of ``features`` projected to 2-D (``"pca"`` or ``"tsne"``), colored by
    ``labels``; at most ``max_points`` evenly spaced points."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: the session's backend (e.g. a notebook's) stays as it is

    features, labels = features.detach().float().cpu(), labels.detach().cpu()
    if len(features) > max_points:
        keep = torch.linspace(0, len(features) - 1, max_points).long()
        features, labels = features[keep], labels[keep]
    x = F.normalize(features, dim=1)
    if method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=min(30.0, len(x) / 4)).fit_transform(x.numpy())
    elif method == "pca":
        x = x - x.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        xy = (x @ v[:2].T).numpy()
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    classes = sorted(labels.unique().tolist())
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, c in enumerate(classes):
        mask = (labels == c).numpy()
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        ax.scatter(xy[mask, 0], xy[mask, 1], s=6, color=cmap(i % cmap.N), label=name, alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"validation embeddings ({method.upper()})", fontsize=10)
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def image_dir(trainer: pl.Trainer) -> Path:
    """Where images go when no image-capable logger is attached: next to the metrics.

    Reads the first logger's folder itself rather than ``trainer.log_dir``: that property broadcasts from rank 0,
    a collective that would hang or desynchronize DDP when only rank 0 logs a picture."""
    folder = None
    if trainer.loggers:
        logger = trainer.loggers[0]
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return Path(folder or trainer.default_root_dir) / "images"


def log_image(trainer: pl.Trainer, key: str, image: np.ndarray, step: int | None = None) -> list[str]:
    """Send ``image`` (``H x W x 3`` uint8) to every logger of ``trainer`` (see the module docstring); returns
    where it went. Call it on every process: only the first one writes."""
    if not trainer.is_global_zero:
        return []
    step = trainer.global_step if step is None else step
    sent, file_needed = [], True
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
            sent.append(f"W&B:{key}")
            file_needed = False
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
            sent.append(f"TensorBoard:{key}")
            file_needed = False
    if not trainer.loggers:
        return sent
    if file_needed or any(not isinstance(lg, (WandbLogger, TensorBoardLogger)) for lg in trainer.loggers):
        path = image_dir(trainer) / f"{key.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        sent.append(str(path))
    return sent
