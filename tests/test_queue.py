"""MoCo's queue: FIFO order, pointer wrap-around, and the last K keys after training steps."""

import pytorch_lightning as pl
import torch
from helpers import RandomTwoViews, quiet_trainer

from lightning_ssl import MoCo
from lightning_ssl.queue import enqueue_


def test_fifo_and_wrap_around():
    queue, ptr = torch.zeros(6, 2), torch.zeros(1, dtype=torch.long)
    batches = [torch.full((2, 2), float(i)) for i in range(1, 6)]
    enqueue_(queue, ptr, batches[0])
    assert queue[:, 0].tolist() == [1, 1, 0, 0, 0, 0] and int(ptr) == 2
    enqueue_(queue, ptr, batches[1])
    enqueue_(queue, ptr, batches[2])
    assert queue[:, 0].tolist() == [1, 1, 2, 2, 3, 3] and int(ptr) == 0
    enqueue_(queue, ptr, batches[3])  # the oldest (1) leave first
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3] and int(ptr) == 2


def test_wrap_around_within_one_batch_and_oversized_batch():
    queue, ptr = torch.zeros(5, 1), torch.tensor([3])
    enqueue_(queue, ptr, torch.arange(4.0).unsqueeze(1))  # rows 3, 4, 0, 1
    assert queue[:, 0].tolist() == [2, 3, 0, 0, 1] and int(ptr) == 2
    enqueue_(queue, ptr, torch.arange(10.0, 17.0).unsqueeze(1))  # 7 keys > K: the newest 5 stay
    assert sorted(queue[:, 0].tolist()) == [12, 13, 14, 15, 16] and int(ptr) == (2 + 5) % 5


class KeyRecorder(pl.Callback):
    def __init__(self):
        self.keys = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.keys.append(outputs["keys"].clone())


def test_queue_holds_the_last_k_keys_after_training(tmp_path, tiny_backbone):
    model = MoCo(tiny_backbone, projection_dim=8, queue_size=16, optimizer="sgd", lr=0.1, split_bn_groups=2)
    rec = KeyRecorder()
    trainer = quiet_trainer(
        max_steps=5,
        callbacks=[rec],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, RandomTwoViews(num_samples=40, batch_size=4))
    keys = torch.cat(rec.keys)  # 20 keys in order; the queue holds the last 16 starting at the pointer
    assert int(model.queue_ptr) == 20 % 16
    order = torch.roll(model.queue, -int(model.queue_ptr), dims=0)
    torch.testing.assert_close(order, keys[-16:])
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(16))
