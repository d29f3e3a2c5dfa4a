"""Speaker evaluation of frozen utterance embeddings.

* **Speaker identification** (Oord et al. 2018, sec. 3.1, "speaker classification"): a linear
  classifier (multinomial logistic regression on standardized embeddings, scikit-learn's
  ``LogisticRegression``) trained on some utterances of each speaker and scored on the others
  (``split_per_speaker``, ``speaker_id_accuracy``).
* **Speaker verification**: trials ``(utterance i, utterance j, same speaker?)`` from a list file in
  the VoxCeleb1-O format (``read_trials``: lines ``1 id10270/x6uYqmx31kE/00001.wav id10270/...``) or
  generated deterministically from labeled utterances (``make_trials``), scored by the cosine of the
  two embeddings (optionally after subtracting a mean embedding, e.g. that of the training audio),
  summarized by the equal error rate (``equal_error_rate``) and the minimum normalized detection
  cost (``min_dcf``; NIST SRE / VoxSRC definition, P_target 0.01, C_miss = C_fa = 1 by default).

Utterance embeddings come from any ``encode(waveforms) -> B x D`` (``CPCAudio.representation``:
c or z averaged over time) through ``utterance_embeddings``.

From the command line: ``lightning-ssl speaker-eval CKPT ROOT [--trials FILE]`` (``lightning_ssl.cli``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_ssl.evaluation.knn import extract_features

__all__ = [
    "utterance_embeddings",
    "split_per_speaker",
    "speaker_id_accuracy",
    "make_trials",
    "read_trials",
    "cosine_scores",
    "equal_error_rate",
    "min_dcf",
    "verification_metrics",
    "mfcc_embeddings",
]


def utterance_embeddings(
    encode: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings N x D, speaker labels N)`` of a loader of ``(waveforms, speakers)``, in dataset
    order (sharded over processes in a distributed run, as ``extract_features``)."""
    return extract_features(encode, loader, device)


def split_per_speaker(labels: torch.Tensor, train_fraction: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Indices ``(train, test)``: for each speaker, ``round(train_fraction x n)`` of its ``n`` utterances
    (at least one, and at least one left for testing when ``n >= 2``) chosen at random from ``seed``."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for speaker in labels.unique(sorted=True):
        idx = (labels == speaker).nonzero(as_tuple=True)[0]
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = min(max(1, round(train_fraction * idx.numel())), max(idx.numel() - 1, 1))
        train.append(idx[:k])
        test.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def speaker_id_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    c: float = 1.0,
    max_iter: int = 2000,
) -> float:
    """Top-1 accuracy of a linear speaker classifier (L2-regularized multinomial logistic regression
    with inverse strength ``c``, on embeddings standardized with the training statistics)."""
    from sklearn.linear_model import LogisticRegression

    unknown = set(test_y.tolist()) - set(train_y.tolist())
    if unknown:
        raise ValueError(f"test speakers {sorted(unknown)[:10]} have no training utterance; split per speaker")
    mean, std = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-8)
    xtr = ((train_x.double() - mean) / std).numpy()
    xte = ((test_x.double() - mean) / std).numpy()
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(xtr, train_y.numpy())
    return float((clf.predict(xte) == test_y.numpy()).mean())


def make_trials(labels: torch.Tensor, max_trials: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Verification trials ``(i, j, target)`` over utterances with speaker ``labels``: every pair
    ``i < j`` (``target``: same speaker), or, with ``max_trials``, a deterministic sample from
    ``seed`` of at most ``max_trials // 2`` target and as many non-target pairs."""
    n = labels.numel()
    i, j = torch.triu_indices(n, n, offset=1)
    target = labels[i] == labels[j]
    if target.all() or not target.any():
        raise ValueError("trials need utterances of at least two speakers and a speaker with two utterances")
    if max_trials is not None and i.numel() > max_trials:
        gen = torch.Generator().manual_seed(seed)
        keep = []
        for group in (target.nonzero(as_tuple=True)[0], (~target).nonzero(as_tuple=True)[0]):
            keep.append(group[torch.randperm(group.numel(), generator=gen)[: max_trials // 2]])
        keep = torch.cat(keep).sort().values
        i, j, target = i[keep], j[keep], target[keep]
    return i, j, target


def read_trials(path: str | Path, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Trials ``(i, j, target)`` of a list file in the VoxCeleb1-O format, one trial a line:
    ``<1 if same speaker else 0> <path1> <path2>``, paths relative to the audio root; ``names`` are the
    relative paths of the embedded utterances (``AudioFolder.relative_paths``), in embedding order."""
    index = {name.replace("\\", "/"): k for k, name in enumerate(names)}
    i, j, target, missing = [], [], [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise ValueError(f"{path}:{number}: expected '<0|1> <path1> <path2>', got {line!r}")
        for p in parts[1:]:
            if p not in index:
                missing.append(p)
        if parts[1] in index and parts[2] in index:
            i.append(index[parts[1]])
            j.append(index[parts[2]])
            target.append(parts[0] == "1")
    if missing:
        raise ValueError(
            f"{len(missing)} trial path(s) of {path} are not among the {len(names)} embedded utterances, e.g. "
            f"{', '.join(sorted(set(missing))[:5])}; the paths must be relative to the audio root"
        )
    return torch.tensor(i, dtype=torch.long), torch.tensor(j, dtype=torch.long), torch.tensor(target)


def cosine_scores(
    embeddings: torch.Tensor, i: torch.Tensor, j: torch.Tensor, center: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine similarity of the embeddings of each trial's two utterances, after subtracting ``center``
    (e.g. the mean embedding of the training audio) when given."""
    x = embeddings.double()
    if center is not None:
        x = x - center.double()
    x = F.normalize(x, dim=1)
    return (x[i] * x[j]).sum(dim=1)


def _error_rates(scores: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Miss and false-alarm rates when accepting ``score >= theta``, for theta at every distinct score
    (ascending) and then above the largest one."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    t = np.asarray(targets, dtype=bool).ravel()
    if s.shape != t.shape:
        raise ValueError(f"{s.size} scores but {t.size} target flags")
    if not t.any() or t.all():
        raise ValueError("error rates need both target and non-target trials")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    thresholds = np.unique(s)
    # misses: targets below theta; false alarms: non-targets at or above theta
    miss = np.searchsorted(np.sort(s[t]), thresholds, side="left") / t.sum()
    fa = 1.0 - np.searchsorted(np.sort(s[~t]), thresholds, side="left") / (~t).sum()
    return np.append(miss, 1.0), np.append(fa, 0.0)


def equal_error_rate(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The rate at which misses equal false alarms: the miss and false-alarm rates are evaluated at
    every distinct score as threshold (accept ``score >= threshold``, plus a threshold above all
    scores) and joined by straight lines (tied scores move both rates at once, along one segment);
    the EER is where that curve crosses ``miss = false alarm`` (the usual ``brentq`` on the
    interpolated ROC)."""
    miss, fa = _error_rates(scores, targets)
    diff = miss - fa  # rises from <= 0 (threshold at the lowest score: no miss) to 1
    k = int(np.argmax(diff >= 0))
    if k == 0:
        return float(miss[0])
    d0, d1 = diff[k - 1], diff[k]
    w = d0 / (d0 - d1)
    return float(miss[k - 1] + w * (miss[k] - miss[k - 1]))


def min_dcf(
    scores: torch.Tensor, targets: torch.Tensor, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> float:
    """Minimum over thresholds of the normalized detection cost
    ``(c_miss P_miss p_target + c_fa P_fa (1 - p_target)) / min(c_miss p_target, c_fa (1 - p_target))``."""
    if not 0 < p_target < 1:
        raise ValueError(f"p_target must lie strictly between 0 and 1, got {p_target}")
    miss, fa = _error_rates(scores, targets)
    cost = c_miss * miss * p_target + c_fa * fa * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


def verification_metrics(
    embeddings: torch.Tensor,
    trials: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    center: torch.Tensor | None = None,
    p_target: float = 0.01,
) -> dict[str, float]:
    """``{"eer", "min_dcf", "trials"}`` of cosine scoring of ``trials`` (``make_trials`` / ``read_trials``)."""
    i, j, target = trials
    scores = cosine_scores(embeddings, i, j, center)
    return {
        "eer": equal_error_rate(scores, target),
        "min_dcf": min_dcf(scores, target, p_target),
        "trials": int(target.numel()),
    }


def mfcc_embeddings(
    loader: Iterable, sample_rate: int = 16000, numcep: int = 13, nfilt: int = 26
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MFCC baseline: per utterance, the mean and standard deviation over frames of its MFCCs
    (``python_speech_features.mfcc``: 25 ms Hamming-windowed frames every 10 ms, pre-emphasis 0.97,
    ``nfilt`` mel filters, ``numcep`` cepstra with the first replaced by the log frame energy,
    liftering 22). Returns ``(N x 2 numcep, labels)`` over ``(waveforms, speakers)`` batches."""
    from python_speech_features import mfcc

    feats, labels = [], []
    for waveforms, target in loader:
        for x in waveforms.reshape(waveforms.shape[0], -1).double().numpy():
            coefficients = mfcc(x, sample_rate, numcep=numcep, nfilt=nfilt, winfunc=np.hamming)
            feats.append(np.concatenate([coefficients.mean(0), coefficients.std(0)]))
        labels.append(torch.as_tensor(target))
    return torch.from_numpy(np.stack(feats)), torch.cat(labels)
