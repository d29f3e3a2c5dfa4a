"""Small audio trees for the tests, synthesized with numpy (no synthesizer, no download): each
"speaker" is a harmonic tone with its own fundamental frequency and formant-like spectral tilt,
with a slow pitch wobble and white noise, so utterances of one speaker sound alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile


def speaker_signal(speaker: int, utterance: int, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    rng = np.random.default_rng([speaker, utterance])
    t = np.arange(int(seconds * rate)) / rate
    f0 = 90.0 + 35.0 * speaker + rng.uniform(-3, 3)
    phase = 2 * np.pi * f0 * (t + 0.002 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
    tilt = 0.4 + 0.15 * (speaker % 4)
    x = sum(tilt**h * np.sin(h * phase) for h in range(1, 8))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(1, 3) * t) ** 2)  # syllable-like envelope
    x = x + 0.05 * rng.standard_normal(t.size)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def write_tree(
    root: Path,
    speakers: int = 3,
    utterances: int = 4,
    layout: str = "librispeech",
    rate: int = 16000,
    channels: int = 1,
    seconds: float = 1.0,
    first_speaker: int = 0,
) -> list[Path]:
    """``root/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac`` (LibriSpeech) or ``root/<speaker>/<n>.wav``
    (flat); returns the files written, sorted."""
    paths = []
    for s in range(first_speaker, first_speaker + speakers):
        for u in range(utterances):
            x = speaker_signal(s, u, seconds, rate)
            if channels == 2:
                x = np.stack([x, 0.5 * x], axis=1)
            if layout == "librispeech":
                chapter = f"{s}{u % 2}"
                path = root / f"{s}" / chapter / f"{s}-{chapter}-{u:04d}.flac"
            else:
                path = root / f"spk{s}" / f"{u:03d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(str(path), x, rate)
            paths.append(path)
    return sorted(paths)
