"""A SYNTHETIC multi-speaker speech corpus in the LibriSpeech layout, made with the espeak-ng synthesizer.

No speech corpus can be downloaded on the machines this library is developed on; this script makes
one locally for CPC on audio (``CPCAudio``) and its speaker evaluation. It is synthetic speech, not
recordings of people: a "speaker" is a fixed espeak-ng voice (an English accent, a voice variant,
a base pitch and a speaking rate); its utterances are sentences drawn from a fixed word list,
spoken with small per-chapter and per-utterance changes of pitch and rate, then given a random gain
and white noise (15-35 dB SNR), resampled to 16 kHz and written as FLAC:

    OUT/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.flac      (split: train, test)

with ``OUT/SPEAKERS.TXT`` (each speaker's voice and split) and ``OUT/README.TXT``. The ``test``
speakers are disjoint from the ``train`` speakers (held out for speaker verification). Same
arguments, same corpus (the text, voices, gains and noise come from ``--seed``; the synthesizer
itself is deterministic).

    python -m lightning_ssl.datamodules.synthetic_speech ~/.cache/lightning-ssl/synthetic-speech \\
        --train-speakers 60 --test-speakers 20 --utterances 24

Needs the ``espeak-ng`` program (Debian: ``apt-get install espeak-ng``) and the ``audio`` extra.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_ssl.datamodules.audio import load_audio

__all__ = ["SyntheticSpeaker", "make_speakers", "generate_corpus", "espeak_available", "WORDS"]

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# espeak-ng voice variants (espeak-ng-data/voices/!v) that sound like a person, not an effect
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Henrique", "Hugo", "Jacky",
    "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen", "Tweaky", "adam", "anika", "announcer",
    "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "marcelo",
    "grandma", "grandpa", "gustave", "iven", "john", "kaukovalta", "linda", "max", "michel", "miguel",
    "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "steph", "travis", "victor", "zac",
)  # fmt: skip
_WORD_LIST = """
the a one two three four five six seven eight nine ten house garden river mountain city village
road window door table chair book letter paper water fire stone tree flower bird horse dog cat fish
morning evening night summer winter spring autumn yellow green blue red white black small large old
young quiet loud quick slow bright dark warm cold happy tired strong gentle careful simple early
late always never often again together alone before after under over near far across behind between
inside outside walk run speak listen write read carry follow open close bring build watch remember
forget answer travel wait begin finish teacher doctor farmer sailor painter market station library
kitchen bridge harbor forest island valley meadow castle tower lantern ribbon pocket basket candle
mirror and but because while when where then so very really almost perhaps certainly today tomorrow
yesterday
"""
WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True)
class SyntheticSpeaker:
    """A fixed espeak-ng voice: ``accent+variant``, base pitch (0-99) and rate (words per minute)."""

    name: str
    split: str
    accent: str
    variant: str
    pitch: int
    rate: int


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def make_speakers(train: int, test: int, seed: int = 0) -> list[SyntheticSpeaker]:
    """``train + test`` distinct voices (no two share accent, variant, pitch and rate), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    seen, speakers = set(), []
    while len(speakers) < train + test:
        voice = (
            ACCENTS[rng.integers(len(ACCENTS))],
            VARIANTS[rng.integers(len(VARIANTS))],
            int(rng.integers(15, 86)),
            int(rng.integers(125, 196)),
        )
        if voice in seen:
            continue
        seen.add(voice)
        index = len(speakers)
        split = "train" if index < train else "test"
        speakers.append(SyntheticSpeaker(f"{1000 + index}", split, *voice))
    return speakers


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=int(rng.integers(6, 15))))


def _speak(text: str, voice: str, pitch: int, rate: int, sample_rate: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "u.wav"
        command = ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(rate), "-w", str(wav), text]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        return load_audio(wav, sample_rate)


def _utterance(job: tuple) -> None:
    import soundfile

    path, text, voice, pitch, rate, gain, snr_db, noise_seed, sample_rate = job
    x = _speak(text, voice, pitch, rate, sample_rate)
    x = x / max(float(np.abs(x).max()), 1e-6) * gain
    noise = np.random.default_rng(noise_seed).standard_normal(x.shape[0]).astype(np.float32)
    power = float(np.mean(x**2)) + 1e-12
    x = x + noise * np.sqrt(power / 10 ** (snr_db / 10))
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.clip(x, -1, 1), sample_rate, format="FLAC")


def generate_corpus(
    out: str | Path,
    train_speakers: int = 60,
    test_speakers: int = 20,
    utterances: int = 24,
    chapters: int = 2,
    sample_rate: int = 16000,
    seed: int = 0,
    workers: int = 2,
) -> list[SyntheticSpeaker]:
    """Write the corpus (see the module docstring) and return its speakers."""
    if not espeak_available():
        raise FileNotFoundError("the espeak-ng program is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    out = Path(out).expanduser()
    speakers = make_speakers(train_speakers, test_speakers, seed)
    jobs = []
    for index, spk in enumerate(speakers):
        rng = np.random.default_rng([seed, index])
        for u in range(utterances):
            chapter = u % chapters
            chapter_rng = np.random.default_rng([seed, index, chapter, 7])
            pitch = spk.pitch + int(chapter_rng.integers(-3, 4)) + int(rng.integers(-2, 3))
            rate = spk.rate + int(chapter_rng.integers(-8, 9)) + int(rng.integers(-5, 6))
            chapter_name = f"{spk.name}{chapter:02d}"
            path = out / spk.split / spk.name / chapter_name / f"{spk.name}-{chapter_name}-{u:04d}.flac"
            gain, snr = float(rng.uniform(0.3, 1.0)), float(rng.uniform(15, 35))
            voice = f"{spk.accent}+{spk.variant}"
            jobs.append(
                (path, _sentence(rng), voice, min(max(pitch, 0), 99), rate, gain, snr, [seed, index, u], sample_rate)
            )
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(_utterance, jobs))
    lines = ["; SYNTHETIC SPEECH (espeak-ng), not recordings of people", "; ID | SPLIT | ACCENT+VARIANT | PITCH | RATE"]
    lines += [f"{s.name} | {s.split} | {s.accent}+{s.variant} | {s.pitch} | {s.rate}" for s in speakers]
    (out / "SPEAKERS.TXT").write_text("\n".join(lines) + "\n")
    (out / "README.TXT").write_text(
        "Synthetic speech made by lightning_ssl.datamodules.synthetic_speech with the espeak-ng synthesizer:\n"
        f"{train_speakers} training and {test_speakers} held-out test speakers, {utterances} utterances each, "
        f"{sample_rate} Hz FLAC in the LibriSpeech layout (<split>/<speaker>/<chapter>/*.flac). seed={seed}.\n"
        "These are not recordings of people; numbers measured on it say nothing about real speech.\n"
    )
    return speakers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (train/ and test/ are written inside)")
    parser.add_argument("--train-speakers", type=int, default=60)
    parser.add_argument("--test-speakers", type=int, default=20)
    parser.add_argument("--utterances", type=int, default=24, help="per speaker")
    parser.add_argument("--chapters", type=int, default=2, help="per speaker")
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="espeak-ng processes at once")
    args = parser.parse_args(argv)
    speakers = generate_corpus(
        args.out,
        args.train_speakers,
        args.test_speakers,
        args.utterances,
        args.chapters,
        args.sample_rate,
        args.seed,
        args.workers,
    )
    print(f"wrote {len(speakers) * args.utterances} synthetic utterances of {len(speakers)} speakers to {args.out}")


if __name__ == "__main__":
    main()
