"""Weighted kNN and the monitor callback's report (pretrained vs random init)."""

import pytest
import torch
from helpers import RandomTwoViews, quiet_trainer

from lightning_ssl import SimCLR
from lightning_ssl.callbacks import KNNMonitor
from lightning_ssl.evaluation.knn import few_labels_subset, weighted_knn_predict


def test_weighted_knn_matches_naive_votes():
    train = torch.randn(30, 5)
    labels = torch.randint(0, 3, (30,))
    test = torch.randn(7, 5)
    pred = weighted_knn_predict(train, labels, test, num_classes=3, k=4, temperature=0.1)
    tn, qn = torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(test, dim=1)
    for i in range(7):
        sims = qn[i] @ tn.T
        top = sims.argsort(descending=True)[:4]
        votes = torch.zeros(3)
        for j in top:
            votes[labels[j]] += torch.exp(sims[j] / 0.1)
        assert pred[i] == votes.argmax()


def test_knn_k_larger_than_train_set_and_clusters():
    centers = torch.eye(4) * 10
    train = centers.repeat_interleave(5, 0) + 0.01 * torch.randn(20, 4)
    labels = torch.arange(4).repeat_interleave(5)
    test = centers + 0.01 * torch.randn(4, 4)
    assert weighted_knn_predict(train, labels, test, 4, k=200).tolist() == [0, 1, 2, 3]


def test_few_labels_subset_is_balanced_and_deterministic():
    labels = torch.arange(5).repeat(20)
    idx = few_labels_subset(labels, 3, seed=1)
    assert labels[idx].bincount().tolist() == [3] * 5
    assert torch.equal(idx, few_labels_subset(labels, 3, seed=1))


def test_monitor_logs_and_reports(tmp_path, capsys):
    model = SimCLR(backbone="resnet18", projection_dim=8, warmup_epochs=0)
    monitor = KNNMonitor(every_n_epochs=1, k=5, labels_per_class=[2])
    trainer = quiet_trainer(
        max_epochs=1,
        callbacks=[monitor],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, RandomTwoViews(num_samples=16, batch_size=8))
    assert "val/knn_top1" in trainer.callback_metrics and "val/knn_top1_2_per_class" in trainer.callback_metrics
    assert set(monitor.results) == {"pretrained", "random_init"}
    out = capsys.readouterr().out
    assert "pretrained" in out and "random init" in out and "2 per class" in out
    assert model.training  # evaluation restored train mode


def test_monitor_needs_labeled_dataloader(tmp_path):
    class NoLabels(RandomTwoViews):
        labeled_dataloader = None

    trainer = quiet_trainer(
        max_steps=1,
        callbacks=[KNNMonitor(every_n_epochs=1)],
        default_root_dir=tmp_path,
    )
    with pytest.raises(TypeError, match="labeled_dataloader"):
        trainer.fit(SimCLR(backbone="resnet18", warmup_epochs=0), NoLabels(num_samples=8, batch_size=8))
