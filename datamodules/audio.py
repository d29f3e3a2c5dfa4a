"""Folders of speech with speaker labels from the path, for CPC on raw audio (``CPCAudio``).

Layouts: LibriSpeech ``<root>/<speaker>/<chapter>/<utterance>.flac`` (also VoxCeleb's
``<root>/<speaker>/<video>/<utterance>.wav``) and plain ``<root>/<speaker>/<utterance>.wav``: the
speaker is the first folder under ``root``, files are found at any depth below it.

* Audio is read with ``soundfile`` (libsndfile: FLAC, WAV, OGG), mixed down to mono and resampled to
  ``sample_rate`` (16 kHz) with ``scipy.signal.resample_poly`` when a file has another rate. Both are
  the ``audio`` extra (``pip install "lightning-ssl[audio]"``), imported when a file is first read.
* Construction reads each file's header (``verify="header"``): files without an audio extension,
  unreadable and empty files are skipped with ONE warning that counts and names them
  (``strict=True`` raises instead); ``verify="full"`` decodes everything, ``verify="none"`` trusts
  the listing. A file that fails to decode during an epoch is replaced by the next readable one,
  with one warning per file. A missing root, or one without speaker folders, raises
  ``FileNotFoundError`` naming the expected layout.
* Pretraining takes a random crop of ``crop_samples`` (the paper's 20,480) of each utterance per
  epoch; evaluation takes the centered ``eval_crop_samples`` (or the whole utterance, one per batch,
  when ``None``). Utterances shorter than a crop are repeated to fill it. Each waveform is
  standardized (zero mean, unit variance) when ``normalize`` (not in the paper: it removes the
  recording's gain).
* The pretraining loader is a ``ResumableDataLoader``: checkpoints hold the position in the epoch,
  and each crop's start is drawn from the sample's own seed (seed, epoch, index), so a killed run
  resumes with the same crops.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_ssl.datamodules.resumable import ResumableDataLoader
from lightning_ssl.datamodules.shards import ShardReader, read_manifest
from lightning_ssl.datamodules.two_views import split_key
from lightning_ssl.datamodules.unreadable import load_skipping_unreadable, summarize

__all__ = [
    "AudioFolder",
    "ShardedAudioFolder",
    "AudioFolderDataModule",
    "load_audio",
    "AUDIO_EXTENSIONS",
    "AUDIO_LAYOUT_HINT",
]

AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg")
AUDIO_LAYOUT_HINT = (
    "expected layout: <root>/<speaker>/<chapter>/<utterance>.flac (LibriSpeech, e.g. "
    "LibriSpeech/train-clean-100/19/198/19-198-0001.flac) or <root>/<speaker>/<utterance>.wav"
)


def _soundfile():
    try:
        import soundfile
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('reading audio needs the soundfile package: pip install "lightning-ssl[audio]"') from err
    return soundfile


def _decode_errors() -> tuple[type[BaseException], ...]:
    return (RuntimeError, OSError, ValueError, _soundfile().LibsndfileError)


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) of a 1-d signal from ``rate`` to ``target`` Hz."""
    if rate == target:
        return waveform
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(waveform, target // g, rate // g).astype(np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """The whole file as a float32 mono waveform at ``sample_rate`` (channels averaged); raises on
    unreadable and empty files."""
    return decode_audio(str(path), sample_rate)


def decode_audio(source: str | io.BytesIO, sample_rate: int = 16000) -> np.ndarray:
    """``load_audio`` of a path or of an encoded file's bytes in memory."""
    data, rate = _soundfile().read(source, dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError(f"{source if isinstance(source, str) else 'the audio'} holds no samples")
    return resample(data.mean(axis=1), int(rate), sample_rate)


def check_audio_bytes(name: str, data: bytes) -> None:
    """Decode an encoded audio file's bytes (raises on unreadable or empty audio), for ``prepare``."""
    decode_audio(io.BytesIO(data))


def fit_length(waveform: np.ndarray, length: int, start: int | None = None) -> np.ndarray:
    """``length`` samples of ``waveform`` from ``start`` (default: centered); a shorter waveform is
    repeated (tiled) to fill the window first."""
    if waveform.shape[0] < length:
        waveform = np.tile(waveform, -(-length // waveform.shape[0]))
    if start is None:
        start = (waveform.shape[0] - length) // 2
    return waveform[start : start + length]


class AudioFolder(Dataset):
    """``(waveform, speaker)`` pairs from ``root/<speaker>/...``; ``waveform`` is a ``1 x L`` float32 tensor.

    Args:
        root: the folder of speaker folders (e.g. ``LibriSpeech/train-clean-100``).
        speakers: speaker folder names to use, in label order (default: every sub-folder, sorted).
        sample_rate: the rate every file is resampled to.
        crop_samples: crop length; ``None`` returns whole utterances.
        random_crop: random crop start (pretraining) instead of the centered crop (evaluation).
        normalize: standardize each waveform (zero mean, unit variance) after cropping.
        max_per_speaker: keep the first (sorted) utterances of each speaker only.
        strict, verify, max_retries: as ``RobustImageFolder`` (see the module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        speakers: Sequence[str] | None = None,
        sample_rate: int = 16000,
        crop_samples: int | None = 20480,
        random_crop: bool = True,
        normalize: bool = True,
        max_per_speaker: int | None = None,
        strict: bool = False,
        verify: str = "header",
        max_retries: int = 50,
    ):
        if verify not in ("header", "full", "none"):
            raise ValueError(f"verify must be 'header', 'full' or 'none', got {verify!r}")
        if crop_samples is not None and crop_samples < 1:
            raise ValueError(f"crop_samples must be positive or None, got {crop_samples}")
        self.root = Path(root).expanduser()
        self.sample_rate, self.crop_samples, self.random_crop = sample_rate, crop_samples, random_crop
        self.normalize, self.strict, self.max_retries = normalize, strict, max_retries
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"audio folder {self.root} does not exist or is not a directory; {AUDIO_LAYOUT_HINT}"
            )
        if speakers is None:
            speakers = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
            if not speakers:
                raise FileNotFoundError(f"no speaker folders in {self.root}; {AUDIO_LAYOUT_HINT}")
        missing = [s for s in speakers if not (self.root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"speaker folder(s) missing in {self.root}: {summarize(missing)}; {AUDIO_LAYOUT_HINT}"
            )
        self.speakers = list(speakers)
        samples: list[tuple[str, int]] = []
        skipped: list[str] = []
        for label, speaker in enumerate(self.speakers):
            files = sorted(
                str(p) for p in (self.root / speaker).rglob("*") if p.is_file() and not p.name.startswith(".")
            )
            kept = 0
            for path in files:
                reason = self._check(path, verify)
                if reason is not None:
                    skipped.append(f"{path} ({reason})")
                elif max_per_speaker is None or kept < max_per_speaker:
                    samples.append((path, label))
                    kept += 1
        if skipped:
            message = f"{len(skipped)} file(s) in {self.root} are not readable audio: {summarize(skipped)}"
            if strict:
                raise ValueError(message + " (strict=True; remove them or pass strict=False to skip them)")
            warnings.warn(message + "; skipped", stacklevel=2)
        if not samples:
            raise FileNotFoundError(f"no readable audio under {self.root}; {AUDIO_LAYOUT_HINT}")
        self.samples, self.skipped = samples, skipped
        self.targets = [t for _, t in samples]
        self.bad_files: list[str] = []

    def _check(self, path: str, verify: str) -> str | None:
        if not path.lower().endswith(AUDIO_EXTENSIONS):
            return "not an audio file"
        if verify == "none":
            return None
        try:
            if verify == "full":
                load_audio(path, self.sample_rate)
                return None
            if os.path.getsize(path) == 0:
                return "empty file"
            info = _soundfile().info(path)
        except _decode_errors() as err:
            return f"unreadable: {type(err).__name__}: {err}"
        return "no samples" if info.frames == 0 else None

    @property
    def relative_paths(self) -> list[str]:
        """Each sample's path relative to ``root`` (the names trial lists use), in dataset order."""
        return [os.path.relpath(p, self.root) for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        """The mono waveform at ``index`` (or the next readable one) and its speaker label."""
        return load_skipping_unreadable(
            self.samples,
            index,
            lambda i: load_audio(self.samples[i][0], self.sample_rate),
            _decode_errors(),
            kind="audio",
            bad_files=self.bad_files,
            strict=self.strict,
            max_retries=self.max_retries,
            root=self.root,
        )

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """``index``, or an ``(index, seed)`` key of a ``ResumableSampler``: the random crop then
        depends on the sample's seed alone."""
        index, seed = split_key(key)
        waveform, label = self.load(index)
        if self.crop_samples is not None:
            start = None
            if self.random_crop:
                generator = None if seed is None else torch.Generator().manual_seed(seed)
                high = max(waveform.shape[0] - self.crop_samples, 0) + 1
                start = int(torch.randint(0, high, (), generator=generator))
            waveform = fit_length(waveform, self.crop_samples, start)
        x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        if self.normalize:
            x = (x - x.mean()) / x.std(unbiased=False).clamp_min(1e-5)
        return x.unsqueeze(0), label


class ShardedAudioFolder(AudioFolder):
    """The sharded form of ``AudioFolder`` (made by ``lightning-ssl prepare audio``): the same
    ``(waveform, speaker)`` samples, crops and normalization, the encoded files read from the shards.

    Args:
        url: the shard folder or URL. storage_options, cache_dir, fetch: see ``ShardedImageFolder``.
        Others: see ``AudioFolder``.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        speakers: Sequence[str] | None = None,
        sample_rate: int = 16000,
        crop_samples: int | None = 20480,
        random_crop: bool = True,
        normalize: bool = True,
        max_per_speaker: int | None = None,
        strict: bool = False,
        max_retries: int = 50,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        fetch: str = "chunk",
    ):
        if crop_samples is not None and crop_samples < 1:
            raise ValueError(f"crop_samples must be positive or None, got {crop_samples}")
        manifest = read_manifest(url, storage_options, kind="audio")
        self.root = str(url)
        self.sample_rate, self.crop_samples, self.random_crop = sample_rate, crop_samples, random_crop
        self.normalize, self.strict, self.max_retries = normalize, strict, max_retries
        stored = manifest["classes"]
        self.speakers = list(stored) if speakers is None else list(speakers)
        missing = [s for s in self.speakers if s not in stored]
        if missing:
            raise FileNotFoundError(f"speaker(s) missing in the shards at {url}: {summarize(missing)}")
        relabel = {stored.index(s): i for i, s in enumerate(self.speakers)}
        rows, kept = [], {}
        for i, (path, label) in enumerate(zip(manifest["paths"], manifest["labels"])):
            if label in relabel and (max_per_speaker is None or kept.get(label, 0) < max_per_speaker):
                kept[label] = kept.get(label, 0) + 1
                rows.append((i, path, relabel[label]))
        rows.sort(key=lambda row: row[2])
        if not rows:
            raise FileNotFoundError(f"no utterance of the speakers {summarize(self.speakers)} in the shards at {url}")
        self.samples = [(path, label) for _, path, label in rows]
        self._shard_index = [i for i, _, _ in rows]
        self.targets = [label for _, label in self.samples]
        self.skipped = list(manifest["skipped"])
        self.bad_files: list[str] = []
        self.reader = ShardReader(url, storage_options, cache_dir, fetch=fetch)

    @property
    def relative_paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    def _read(self, index: int) -> np.ndarray:
        data = bytes(self.reader[self._shard_index[index]]["audio"])
        return decode_audio(io.BytesIO(data), self.sample_rate)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return load_skipping_unreadable(
            self.samples,
            index,
            self._read,
            _decode_errors(),
            kind="audio",
            bad_files=self.bad_files,
            strict=self.strict,
            max_retries=self.max_retries,
            root=self.root,
        )


class _OneView(Dataset):
    """``([waveform], speaker)``: the pretraining batch format ``(views, target)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        waveform, label = self.dataset[key]
        return [waveform], label


class AudioFolderDataModule(pl.LightningDataModule):
    """Random crops of the utterances of ``root`` for pretraining, as ``([B x 1 x crop_samples], speaker)``;
    un-augmented labeled utterances for speaker evaluation.

    ``labeled_dataloader("train")``: the centered ``eval_crop_samples`` of ``root``'s utterances with
    their speaker labels; ``labeled_dataloader("val")``: those of ``val_root``, the held-out speakers
    (e.g. ``LibriSpeech/test-clean``, VoxCeleb1's test speakers), labels in ``val_root``'s own order.

    Args:
        root, val_root: folders of speaker folders (see the module docstring for the layouts).
        shards, val_shards: instead of ``root`` and ``val_root``, the folders or URLs of their
            shards made by ``lightning-ssl prepare audio`` (the same utterances and crops).
        storage_options, shard_cache_dir, shard_fetch: for shards on an object store (see
            ``ImageNetDataModule``).
        sample_rate: every file is resampled to it (paper: 16 kHz).
        crop_samples: pretraining window (paper: 20,480 samples, 1.28 s).
        eval_crop_samples: evaluation window; ``None`` for whole utterances (one per batch).
        batch_size, eval_batch_size, num_workers, pin_memory: the loaders'.
        normalize: standardize each waveform. max_per_speaker: cap on utterances per speaker.
        strict, verify: bad-file handling (see ``AudioFolder``).
    """

    def __init__(
        self,
        root: str | None = None,
        val_root: str | None = None,
        sample_rate: int = 16000,
        crop_samples: int = 20480,
        eval_crop_samples: int | None = 48000,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        normalize: bool = True,
        max_per_speaker: int | None = None,
        strict: bool = False,
        verify: str = "header",
        drop_last: bool = True,
        pin_memory: bool | None = None,
        shards: str | None = None,
        val_shards: str | None = None,
        storage_options: dict | None = None,
        shard_cache_dir: str | None = None,
        shard_fetch: str = "chunk",
    ):
        super().__init__()
        if (root is None) == (shards is None):
            raise ValueError("give the speaker folders as root=<folder> or their shards as shards=<folder or URL>")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root, self.val_root = root, val_root
        self.shards, self.val_shards = shards, val_shards
        self.shard_options = dict(storage_options=storage_options, cache_dir=shard_cache_dir, fetch=shard_fetch)
        self.sample_rate, self.crop_samples, self.eval_crop_samples = sample_rate, crop_samples, eval_crop_samples
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.normalize, self.max_per_speaker, self.strict, self.verify = normalize, max_per_speaker, strict, verify
        self.drop_last = drop_last
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._datasets: dict[tuple[str, bool], AudioFolder] = {}  # or ShardedAudioFolder

    def dataset(self, split: str, train: bool = False) -> AudioFolder:
        """The ``AudioFolder`` of ``split`` (``"train"``: ``root``, ``"val"``: ``val_root``), with the
        pretraining crops when ``train``, else the evaluation crops (built once, then reused)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        sharded = self.shards is not None
        root = (self.shards if split == "train" else self.val_shards) if sharded else None
        root = root or (self.root if split == "train" else self.val_root)
        if root is None:
            raise ValueError("labeled_dataloader('val') needs val_root (or val_shards): a folder of held-out speakers")
        key = (split, train)
        if key not in self._datasets:
            common = dict(
                sample_rate=self.sample_rate,
                crop_samples=self.crop_samples if train else self.eval_crop_samples,
                random_crop=train,
                normalize=self.normalize,
                max_per_speaker=self.max_per_speaker,
                strict=self.strict,
            )
            if sharded and (split == "train" or self.val_shards is not None):
                self._datasets[key] = ShardedAudioFolder(root, **common, **self.shard_options)
            else:
                self._datasets[key] = AudioFolder(root, verify=self.verify, **common)
        return self._datasets[key]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled random crops from a ``ResumableDataLoader`` (exact mid-epoch resume)."""
        return ResumableDataLoader(
            _OneView(self.dataset("train", train=True)),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> list:
        """None while fitting (``SpeakerVerificationMonitor`` evaluates there). ``validate``'s kNN top-1
        assumes the validation classes are the training classes, which held-out speakers are not."""
        if self.trainer is not None and self.trainer.state.fn == "validate":
            raise ValueError(
                "validate scores image kNN top-1; for a CPCAudio checkpoint run "
                "`lightning-ssl speaker-eval CKPT ROOT` (EER and minDCF on held-out speakers)"
            )
        return []

    def labeled_dataloader(self, split: str) -> DataLoader:
        """``(waveforms, speakers)`` of ``split`` in dataset order, un-augmented (centered crops)."""
        batch = self.eval_batch_size if self.eval_crop_samples is not None else 1
        return self._loader(self.dataset(split), batch, False, False)
