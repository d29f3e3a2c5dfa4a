"""The audio datamodule on generated trees in both layouts (LibriSpeech FLAC and flat WAV), with
resampling, mono mixdown, crops, bad files and missing folders; the synthetic corpus generator."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import soundfile
import torch
from audio_trees import speaker_signal, write_tree

from lightning_ssl.datamodules import AudioFolderDataModule
from lightning_ssl.datamodules.audio import AudioFolder, fit_length, load_audio
from lightning_ssl.datamodules.synthetic_speech import espeak_available, generate_corpus, make_speakers


def test_librispeech_layout_labels_paths_and_crops(tmp_path):
    files = write_tree(tmp_path, speakers=3, utterances=4, seconds=1.5)
    ds = AudioFolder(tmp_path, crop_samples=8000, random_crop=True)
    assert ds.speakers == ["0", "1", "2"] and len(ds) == 12
    assert ds.targets == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.relative_paths[0] == "0/00/0-00-0000.flac" and [p for p, _ in ds.samples] == [str(f) for f in files]
    x, label = ds[5]
    assert x.shape == (1, 8000) and x.dtype == torch.float32 and label == 1
    torch.testing.assert_close(x.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)  # standardized
    torch.testing.assert_close(x.std(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)
    torch.manual_seed(0)
    crops = torch.stack([ds[5][0] for _ in range(4)])
    assert not torch.allclose(crops[0], crops[1])  # random windows
    center = AudioFolder(tmp_path, crop_samples=8000, random_crop=False, normalize=False)
    raw = load_audio(files[5])
    torch.testing.assert_close(center[5][0][0], torch.from_numpy(raw[8000:16000]))  # the centered window
    assert torch.equal(center[5][0], center[5][0])


def test_flat_wav_layout_is_resampled_and_mixed_down(tmp_path):
    write_tree(tmp_path, speakers=2, utterances=2, layout="flat", rate=22050, channels=2, seconds=1.0)
    ds = AudioFolder(tmp_path, crop_samples=None, normalize=False)
    assert ds.speakers == ["spk0", "spk1"] and ds.relative_paths[1] == "spk0/001.wav"
    x, _ = ds[0]
    assert x.shape == (1, 16000)  # 1 s at 22,050 Hz -> 16,000 samples
    left = speaker_signal(0, 0, 1.0, 22050)
    expected = load_audio_reference(0.75 * left, 22050)  # mean of the channels x and 0.5 x
    torch.testing.assert_close(x[0], torch.from_numpy(expected), atol=2e-4, rtol=0)


def load_audio_reference(x: np.ndarray, rate: int) -> np.ndarray:
    from scipy.signal import resample_poly

    return resample_poly(x.astype(np.float32), 320, 441).astype(np.float32)


def test_a_tone_keeps_its_frequency_through_resampling(tmp_path):
    rate, f = 44100, 440.0
    t = np.arange(rate) / rate
    (tmp_path / "a").mkdir()
    soundfile.write(str(tmp_path / "a" / "tone.wav"), 0.5 * np.sin(2 * np.pi * f * t), rate)
    x = load_audio(tmp_path / "a" / "tone.wav", 16000)
    assert x.shape == (16000,)
    assert np.argmax(np.abs(np.fft.rfft(x))) == 440  # 1 Hz bins over one second


def test_short_utterances_are_repeated_to_fill_the_window():
    x = np.arange(5, dtype=np.float32)
    assert fit_length(x, 12, start=0).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert fit_length(x, 3).tolist() == [1, 2, 3]  # centered
    assert fit_length(x, 3, start=2).tolist() == [2, 3, 4]


def test_bad_files_are_skipped_with_one_warning_and_strict_raises(tmp_path):
    write_tree(tmp_path, speakers=2, utterances=3)
    (tmp_path / "0" / "00" / "empty.flac").write_bytes(b"")
    (tmp_path / "0" / "00" / "garbage.flac").write_bytes(b"this is not audio at all" * 10)
    (tmp_path / "1" / "notes.txt").write_text("transcript")
    soundfile.write(str(tmp_path / "1" / "silent.wav"), np.zeros((0,), dtype=np.float32), 16000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = AudioFolder(tmp_path, crop_samples=1000)
    messages = [str(w.message) for w in caught if "not readable audio" in str(w.message)]
    assert len(messages) == 1 and "4 file(s)" in messages[0]
    for name in ("empty.flac (empty file)", "garbage.flac (unreadable", "notes.txt (not an audio file)", "silent.wav"):
        assert name in messages[0], name
    assert len(ds) == 6 and len(ds.skipped) == 4
    with pytest.raises(ValueError, match="strict=True"):
        AudioFolder(tmp_path, strict=True)


def test_a_file_failing_mid_epoch_is_replaced_once_with_a_warning(tmp_path):
    files = write_tree(tmp_path, speakers=1, utterances=3)
    files[1].write_bytes(b"RIFF-broken" * 20)  # listed (verify="none"), fails when read
    ds = AudioFolder(tmp_path, crop_samples=1000, random_crop=False, verify="none", normalize=False)
    with pytest.warns(UserWarning, match=f"cannot decode audio .*{files[1].name}"):
        x, _ = ds[1]
    torch.testing.assert_close(x[0], torch.from_numpy(fit_length(load_audio(files[2]), 1000)))  # the next file
    assert ds.bad_files == [str(files[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second failure of the same file is silent
        ds[1]
    strict = AudioFolder(tmp_path, crop_samples=1000, verify="none", strict=True)
    with pytest.raises(ValueError, match="cannot decode audio .*strict=True"):
        strict[1]


def test_missing_root_or_speakers_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*<root>/<speaker>/<chapter>/<utterance>.flac"):
        AudioFolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.wav").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no speaker folders"):
        AudioFolder(tmp_path / "flat")
    (tmp_path / "only_bad" / "spk").mkdir(parents=True)
    (tmp_path / "only_bad" / "spk" / "x.txt").write_text("x")
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="no readable audio"):
        AudioFolder(tmp_path / "only_bad")
    with pytest.raises(FileNotFoundError, match="speaker folder"):
        AudioFolder(tmp_path / "only_bad", speakers=["spk", "ghost"])
    with pytest.raises(ValueError, match="verify must be"):
        AudioFolder(tmp_path, verify="sometimes")


def test_datamodule_batches_and_labeled_loaders(tmp_path):
    write_tree(tmp_path / "train", speakers=3, utterances=4)
    write_tree(tmp_path / "test", speakers=2, utterances=3, layout="flat", first_speaker=5)
    dm = AudioFolderDataModule(
        str(tmp_path / "train"), val_root=str(tmp_path / "test"), crop_samples=3200, eval_crop_samples=4800,
        batch_size=4, eval_batch_size=5, num_workers=0,
    )  # fmt: skip
    views, speakers = next(iter(dm.train_dataloader()))
    assert len(views) == 1 and views[0].shape == (4, 1, 3200) and speakers.shape == (4,)
    assert len(dm.train_dataloader()) == 3  # 12 utterances, drop_last
    x, y = next(iter(dm.labeled_dataloader("val")))
    assert x.shape == (5, 1, 4800) and y.tolist() == [0, 0, 0, 1, 1]
    assert len(dm.labeled_dataloader("train").dataset) == 12
    whole = AudioFolderDataModule(str(tmp_path / "train"), eval_crop_samples=None, num_workers=0)
    x, _ = next(iter(whole.labeled_dataloader("train")))
    assert x.shape == (1, 1, 16000)  # whole utterances, one per batch
    with pytest.raises(ValueError, match="needs val_root"):
        whole.labeled_dataloader("val")
    with pytest.raises(ValueError, match="split must be"):
        dm.labeled_dataloader("test")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        AudioFolderDataModule(str(tmp_path), batch_size=0)


def test_max_per_speaker_keeps_the_first_utterances(tmp_path):
    write_tree(tmp_path, speakers=2, utterances=4)
    ds = AudioFolder(tmp_path, max_per_speaker=2)
    assert ds.targets == [0, 0, 1, 1] and ds.relative_paths[1] == "0/00/0-00-0002.flac"  # sorted paths


# ----------------------------------------------------------------------------- synthetic corpus
def test_synthetic_speakers_are_distinct_and_deterministic():
    speakers = make_speakers(30, 10, seed=0)
    assert speakers == make_speakers(30, 10, seed=0)
    assert len({(s.accent, s.variant, s.pitch, s.rate) for s in speakers}) == 40
    assert [s.split for s in speakers].count("test") == 10 and speakers[-1].split == "test"


@pytest.mark.skipif(not espeak_available(), reason="the espeak-ng program is not installed")
def test_synthetic_corpus_is_written_in_the_librispeech_layout(tmp_path):
    generate_corpus(tmp_path, train_speakers=2, test_speakers=1, utterances=2, seed=0)
    files = sorted(tmp_path.rglob("*.flac"))
    assert len(files) == 6 and "SYNTHETIC" in (tmp_path / "SPEAKERS.TXT").read_text()
    assert {f.relative_to(tmp_path).parts[0] for f in files} == {"train", "test"}
    info = soundfile.info(str(files[0]))
    assert info.samplerate == 16000 and info.channels == 1 and info.frames > 8000
    ds = AudioFolder(tmp_path / "train", crop_samples=None)
    assert len(ds) == 4 and ds.speakers == ["1000", "1001"]
    again = tmp_path / "again"
    generate_corpus(again, train_speakers=2, test_speakers=1, utterances=2, seed=0)
    assert np.array_equal(load_audio(files[0]), load_audio(again / files[0].relative_to(tmp_path)))
    shutil.rmtree(again)


def test_pretraining_loader_resumes_mid_epoch_with_the_same_crops(tmp_path):
    """The loader's checkpointed position (``ResumableDataLoader``) restarts a killed epoch at the next
    batch, and each crop depends on (seed, epoch, utterance) only, also with worker processes."""
    write_tree(tmp_path, speakers=3, utterances=4, seconds=1.5)

    def loader(workers: int):
        dm = AudioFolderDataModule(str(tmp_path), crop_samples=4000, batch_size=3, num_workers=workers)
        train = dm.train_dataloader()
        train.sampler.seed = 7
        return train

    straight = loader(0)
    straight.sampler.set_epoch(1)
    batches = [views[0] for views, _ in straight]
    assert len(batches) == 4
    interrupted = loader(0)
    interrupted.sampler.set_epoch(1)
    first = iter(interrupted)
    next(first), next(first)
    state = interrupted.state_dict()
    assert state["batches"] == 2 and state["epoch"] == 1
    resumed = loader(2)
    resumed.load_state_dict(state)
    rest = [views[0] for views, _ in resumed]
    assert len(rest) == 2
    for a, b in zip(rest, batches[2:]):
        assert torch.equal(a, b)
    other_epoch = loader(0)
    other_epoch.sampler.set_epoch(2)
    assert not torch.equal(next(iter(other_epoch))[0][0], batches[0])
