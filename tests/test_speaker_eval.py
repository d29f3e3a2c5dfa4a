"""Speaker evaluation: EER and minDCF against hand computations and independent implementations,
trials (generated and VoxCeleb1-O lists), the speaker-ID probe, batch-norm recalibration, MFCCs and
the online verification callback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from audio_trees import speaker_signal
from torch import nn

from lightning_ssl.evaluation.baselines import calibrate_norm_statistics
from lightning_ssl.evaluation.speaker import (
    cosine_scores,
    equal_error_rate,
    make_trials,
    mfcc_embeddings,
    min_dcf,
    read_trials,
    speaker_id_accuracy,
    split_per_speaker,
    verification_metrics,
)


# ------------------------------------------------------------------------------------------- EER
def test_eer_equals_the_hand_computation_with_a_tie():
    # targets 0.9 0.7 0.5 0.3, non-targets 0.6 0.5 0.2 0.1 (one tie at 0.5). Accepting scores >= 0.5
    # misses 1/4 targets (0.3) and accepts 2/4 non-targets (0.6, 0.5); at >= 0.6 both tied trials are
    # rejected at once: misses 2/4, false alarms 1/4. The segment between the two points crosses
    # miss = false alarm half way: EER = (1/4 + 2/4) / 2 = 0.375.
    scores = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.6, 0.5, 0.2, 0.1])
    targets = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    assert equal_error_rate(scores, targets) == pytest.approx(0.375, abs=1e-12)
    # without the tie (non-target 0.5 -> 0.4) a threshold of 0.5 gives 1/4 misses and 1/4 false alarms
    assert equal_error_rate(torch.tensor([0.9, 0.7, 0.5, 0.3, 0.6, 0.4, 0.2, 0.1]), targets) == pytest.approx(0.25)
    # all scores tied: the only segment runs from (miss 0, fa 1) to (miss 1, fa 0)
    assert equal_error_rate(torch.zeros(8), targets) == pytest.approx(0.5)


def test_eer_is_zero_for_separable_scores_and_about_half_for_random_ones():
    gen = torch.Generator().manual_seed(0)
    targets = torch.rand(4000, generator=gen) < 0.3
    separable = torch.where(targets, 1.0 + torch.rand(4000, generator=gen), torch.rand(4000, generator=gen))
    assert equal_error_rate(separable, targets) == 0.0
    random = torch.randn(4000, generator=gen)
    assert abs(equal_error_rate(random, targets) - 0.5) < 0.03


@pytest.mark.parametrize("seed", range(4))
def test_eer_matches_the_interpolated_roc_of_scikit_learn(seed):
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(seed)
    targets = rng.random(300) < 0.4
    scores = np.round(rng.normal(targets * 1.0, 1.0), 1)  # rounded: many ties
    fpr, tpr, _ = roc_curve(targets, scores)
    expected = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    assert equal_error_rate(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(expected, abs=1e-9)


def _naive_min_dcf(scores, targets, p, c_miss=1.0, c_fa=1.0):
    n_target, n_non = int(targets.sum()), int((~targets).sum())
    best = math.inf
    for threshold in [*sorted(set(scores.tolist())), math.inf]:
        p_miss = sum(1 for s, t in zip(scores.tolist(), targets.tolist()) if t and s < threshold) / n_target
        p_fa = sum(1 for s, t in zip(scores.tolist(), targets.tolist()) if not t and s >= threshold) / n_non
        best = min(best, c_miss * p_miss * p + c_fa * p_fa * (1 - p))
    return float(best / min(c_miss * p, c_fa * (1 - p)))


@pytest.mark.parametrize("p_target,c_miss,c_fa", [(0.01, 1, 1), (0.05, 1, 1), (0.5, 2, 1)])
def test_min_dcf_equals_a_loop_over_thresholds(p_target, c_miss, c_fa):
    rng = np.random.default_rng(1)
    targets = torch.tensor(rng.random(200) < 0.3)
    scores = torch.tensor(np.round(rng.normal(targets.numpy() * 1.5, 1.0), 1))
    got = min_dcf(scores, targets, p_target, c_miss, c_fa)
    assert got == pytest.approx(_naive_min_dcf(scores, targets, p_target, c_miss, c_fa), abs=1e-12)
    assert 0 <= got <= 1.0 + 1e-12  # never worse than always rejecting / always accepting


def test_error_rates_reject_bad_inputs():
    with pytest.raises(ValueError, match="both target and non-target"):
        equal_error_rate(torch.ones(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 scores but 2 target flags"):
        equal_error_rate(torch.ones(3), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="finite"):
        equal_error_rate(torch.tensor([0.0, float("nan")]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="p_target"):
        min_dcf(torch.tensor([0.0, 1.0]), torch.tensor([True, False]), p_target=1.0)


# ---------------------------------------------------------------------------------------- trials
def test_make_trials_all_pairs_and_a_deterministic_balanced_sample():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    i, j, target = make_trials(labels)
    assert i.numel() == 15 and bool((i < j).all())
    assert target.tolist() == [bool(labels[a] == labels[b]) for a, b in zip(i.tolist(), j.tolist())]
    assert int(target.sum()) == 1 + 3  # pairs within speaker 0 and speaker 1
    many = torch.arange(40) // 4  # 10 speakers x 4 utterances: 60 target, 720 non-target pairs
    a = make_trials(many, max_trials=100, seed=3)
    b = make_trials(many, max_trials=100, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert int(a[2].sum()) == 50 and a[2].numel() == 100
    assert not torch.equal(a[0], make_trials(many, max_trials=100, seed=4)[0])
    with pytest.raises(ValueError, match="two speakers"):
        make_trials(torch.zeros(4, dtype=torch.long))


def test_read_trials_in_the_voxceleb1_format(tmp_path):
    names = ["id10270/x6uYqmx31kE/00001.wav", "id10270/8jEAjG6SegY/00008.wav", "id10300/ize_eiCFEg0/00003.wav"]
    path = tmp_path / "veri_test.txt"
    path.write_text(
        "1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav\n"
        "0 id10270/x6uYqmx31kE/00001.wav id10300/ize_eiCFEg0/00003.wav\n\n"
    )
    i, j, target = read_trials(path, names)
    assert i.tolist() == [0, 0] and j.tolist() == [1, 2] and target.tolist() == [True, False]
    path.write_text("1 id10270/x6uYqmx31kE/00001.wav id10999/nothere/00001.wav\n")
    with pytest.raises(ValueError, match="id10999/nothere/00001.wav"):
        read_trials(path, names)
    path.write_text("yes a b\n")
    with pytest.raises(ValueError, match=r"veri_test.txt:1: expected '<0\|1> <path1> <path2>'"):
        read_trials(path, names)


def test_cosine_scores_and_centering():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    i, j = torch.tensor([0, 0]), torch.tensor([1, 2])
    torch.testing.assert_close(cosine_scores(x, i, j), torch.tensor([1.0, 0.0], dtype=torch.float64))
    centered = cosine_scores(x, i, j, center=torch.tensor([1.0, 0.0]))  # x0 becomes 0: cosine 0 by convention
    torch.testing.assert_close(centered, torch.tensor([0.0, 0.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------ speaker ID
def test_split_per_speaker_is_disjoint_and_covers_every_speaker():
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 7)
    train, test = split_per_speaker(labels, 0.5, seed=0)
    assert set(train.tolist()) & set(test.tolist()) == set()
    assert sorted(train.tolist() + test.tolist()) == list(range(14))
    for s in range(3):
        assert (labels[train] == s).any() and (labels[test] == s).any()
    assert torch.equal(split_per_speaker(labels, 0.5, seed=0)[0], train)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_per_speaker(labels, 1.0)


def test_speaker_id_probe_separates_clusters_and_needs_seen_speakers():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=gen) * 5
    labels = torch.arange(100) % 5
    x = centers[labels] + torch.randn(100, 8, generator=gen)
    train, test = split_per_speaker(labels, 0.5)
    assert speaker_id_accuracy(x[train], labels[train], x[test], labels[test]) == 1.0
    noise = torch.randn(100, 8, generator=gen)
    assert speaker_id_accuracy(noise[train], labels[train], noise[test], labels[test]) < 0.5
    with pytest.raises(ValueError, match="no training utterance"):
        speaker_id_accuracy(x[:10], labels[:10] * 0, x[10:20], labels[10:20])


def test_verification_metrics_of_clustered_embeddings():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 6
    x = torch.randn(6, 16, generator=gen)[labels] * 3 + torch.randn(60, 16, generator=gen)
    good = verification_metrics(x, make_trials(labels))
    bad = verification_metrics(torch.randn(60, 16, generator=gen), make_trials(labels))
    assert good["trials"] == 60 * 59 // 2 and good["eer"] < 0.02 and bad["eer"] > 0.35
    assert good["min_dcf"] < bad["min_dcf"]


# ---------------------------------------------------------------------------- random-init baseline
def test_recalibrated_batch_norm_holds_the_average_batch_statistics_and_the_same_weights():
    net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU())
    weights = [p.detach().clone() for p in net.parameters()]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 1, 50, generator=gen) * (k + 1) + k for k in range(4)]
    calibrate_norm_statistics(net, [(b, None) for b in batches], max_images=None)
    conv_out = [net[0](b).detach() for b in batches]
    mean = torch.stack([o.mean(dim=(0, 2)) for o in conv_out]).mean(0)
    var = torch.stack([o.var(dim=(0, 2), unbiased=True) for o in conv_out]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-6)
    assert not net.training and net[1].momentum == 0.1
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))


# -------------------------------------------------------------------------------------------- MFCC
def test_mfcc_embeddings_tell_speakers_apart():
    pytest.importorskip("python_speech_features")
    waves = torch.stack([torch.from_numpy(speaker_signal(s, u)) for s in range(3) for u in range(4)]).unsqueeze(1)
    labels = torch.arange(3).repeat_interleave(4)
    x, y = mfcc_embeddings([(waves[:5], labels[:5]), (waves[5:], labels[5:])])
    assert x.shape == (12, 26) and torch.equal(y, labels) and torch.isfinite(x).all()
    metrics = verification_metrics(x, make_trials(labels), center=x.mean(0))
    assert metrics["eer"] < 0.1
