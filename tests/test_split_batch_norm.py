"""MoCo's one-process shuffling BN (the authors' CIFAR-10 demo): split batch norm simulating several
devices and the in-batch key shuffle that puts every key in another sub-batch than its query."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lightning_ssl.methods.moco as moco_module
from lightning_ssl import MoCo
from lightning_ssl.distributed import split_shuffle
from lightning_ssl.split_batch_norm import SplitBatchNorm, convert_split_batch_norm, split_batch_norms
from tests.conftest import TinyConvNet

G = 4  # simulated devices


@pytest.mark.parametrize("n", [G, 3 * G, 8 * G])
def test_split_shuffle_sends_every_sample_to_another_sub_batch(n):
    torch.manual_seed(n)
    perm = split_shuffle(n, G)
    assert sorted(perm.tolist()) == list(range(n))  # a permutation
    positions = torch.arange(n)
    assert (perm % G != positions % G).all(), "a sample stays in its own sub-batch"
    # the key of sample i sits at position argsort(perm)[i]: another sub-batch than i's
    assert (torch.argsort(perm) % G != positions % G).all()


def test_split_shuffle_mixes_sub_batches_and_rejects_bad_sizes():
    torch.manual_seed(0)
    perm = split_shuffle(64, G)
    sources = {int(s) for s in perm[0::G] % G}  # where sub-batch 0 of the shuffled batch comes from
    assert len(sources) > 1, "each sub-batch comes whole from one other sub-batch: no mixing"
    with pytest.raises(ValueError, match="equal sub-batches"):
        split_shuffle(10, G)
    with pytest.raises(ValueError, match="at least 2"):
        split_shuffle(8, 1)


def test_split_batch_norm_normalizes_each_interleaved_sub_batch_alone():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 5, 5) * 3 + 1
    plain = nn.BatchNorm2d(3)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    split = convert_split_batch_norm(nn.Sequential(plain))[0]
    assert isinstance(split, SplitBatchNorm) and split.weight is plain.weight
    split.num_splits = G
    out = split(x)
    means, variances = [], []
    for s in range(G):  # sub-batch s: samples s, s + G, s + 2G
        ref = nn.BatchNorm2d(3)
        ref.weight.data, ref.bias.data = plain.weight.data.clone(), plain.bias.data.clone()
        torch.testing.assert_close(out[s::G], ref(x[s::G]))
        means.append(ref.running_mean)
        variances.append(ref.running_var)
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0))
    split.num_splits = 1  # plain batch norm again
    torch.testing.assert_close(split(x), nn.functional.batch_norm(x, None, None, split.weight, split.bias, True))
    split.eval()
    split.num_splits = G  # evaluation: running statistics, whatever the splits
    torch.testing.assert_close(split(x), plain.eval()(x))


def test_moco_one_process_normalizes_keys_in_other_sub_batches_than_their_queries(monkeypatch):
    """Key i is normalized with the statistics of a sub-batch of shuffled keys that is not query i's
    sub-batch (and holds another set of images); the keys equal the key encoder run with plain batch
    norm on each shuffled sub-batch alone."""
    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.manual_seed(0)
    n = 4 * G
    moco = MoCo(TinyConvNet(), projection_dim=8, queue_size=64, split_bn_groups=G).train()
    assert split_batch_norms(moco.backbone_ema) and split_batch_norms(moco.backbone)
    recorded = {}

    def recording(n_, groups, device=None):
        recorded["perm"] = split_shuffle(n_, groups, device)
        return recorded["perm"]

    monkeypatch.setattr(moco_module, "split_shuffle", recording)
    x_q, x_k = torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8)
    reference = MoCo(TinyConvNet(), projection_dim=8, queue_size=64, split_bn_groups=1).train()
    reference.load_state_dict(moco.state_dict())
    keys = moco.training_step(([x_q, x_k], None), 0)["keys"]
    perm = recorded["perm"]
    where = torch.argsort(perm)  # position of key i in the shuffled batch
    for i in range(n):
        key_group, query_group = int(where[i]) % G, i % G
        assert key_group != query_group
        key_images = set(perm[key_group::G].tolist())
        query_images = set(range(query_group, n, G))
        assert key_images != query_images
    expected = torch.empty_like(keys)
    with torch.no_grad():
        for s in range(G):
            sub = perm[s::G]
            expected[sub] = nn.functional.normalize(reference.projector_ema(reference.backbone_ema(x_k[sub])), dim=1)
    torch.testing.assert_close(keys, expected)
    # outside the step the layers are plain batch norm again (any batch size)
    assert all(layer.num_splits == 1 for layer in split_batch_norms(moco))


def test_moco_split_bn_off_and_batch_size_check():
    warnings.filterwarnings("ignore", message=".*self.log.*")
    plain = MoCo(TinyConvNet(), projection_dim=8, queue_size=64, shuffle_bn=False)
    assert not split_batch_norms(plain)
    moco = MoCo(TinyConvNet(), projection_dim=8, queue_size=64, split_bn_groups=G).train()
    with pytest.raises(ValueError, match="equal sub-batches"):
        moco.training_step(([torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)], None), 0)
