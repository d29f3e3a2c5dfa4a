"""Pretrain ``CPCAudio`` on the synthetic speech corpus on the CPU, then evaluate speakers it never saw:
speaker identification (linear probe) and verification (EER, minDCF), for the pretrained encoder,
the same encoder at random initialization (its batch-norm statistics recalibrated on training
audio) and MFCCs.

The corpus is ``lightning_ssl.datamodules.synthetic_speech`` (SYNTHETIC speech from espeak-ng, in
the LibriSpeech layout): pretraining on ``ROOT/train`` (random windows of ``--crop`` samples, the
speaker labels unused), evaluation on ``ROOT/test`` (disjoint speakers), centered windows of
``--eval-crop`` samples:

* embeddings: c averaged over time (``embedding="context"``, the paper's speaker features) and z
  averaged over time (``"frames"``); MFCC: mean and standard deviation over frames of 13 MFCCs
  (python_speech_features, 25 ms Hamming frames every 10 ms, 26 filters);
* speaker ID: logistic regression on half of each held-out speaker's utterances, accuracy on the
  other half (``split_per_speaker``, seed 0);
* verification: every pair of held-out utterances is a trial; cosine scores after subtracting the
  mean embedding of (up to ``--center-per-speaker`` utterances per speaker of) the training audio;
  EER and minDCF (P_target 0.01).

    python -m benchmarks.cpc_audio --generate --max-minutes 20
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.common import add_common_args, header, quiet_trainer, write_json
from lightning_ssl import CPCAudio
from lightning_ssl.datamodules.audio import AudioFolderDataModule
from lightning_ssl.datamodules.synthetic_speech import generate_corpus
from lightning_ssl.evaluation.speaker import (
    make_trials,
    mfcc_embeddings,
    speaker_id_accuracy,
    split_per_speaker,
    utterance_embeddings,
    verification_metrics,
)

DEFAULT_ROOT = Path.home() / ".cache" / "lightning-ssl" / "synthetic-speech"


class LossLog(pl.Callback):
    """Loss of every step, and the wall time of the training loop."""

    def __init__(self):
        self.losses: list[float] = []
        self.start = self.seconds = 0.0

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def both_embeddings(backbone):
    """``[mean of c, mean of z]`` in one pass."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        z = backbone.frames(x)
        return torch.cat([backbone.contexts(z).mean(1), z.mean(1)], dim=1)

    return encode


def evaluate(name: str, val: tuple, train: tuple, trials: tuple, seed: int) -> dict:
    (x, y), (x_train, _) = val, train
    tr, te = split_per_speaker(y, 0.5, seed)
    row = {"encoder": name, "dim": x.shape[1]}
    row["speaker_id"] = speaker_id_accuracy(x[tr], y[tr], x[te], y[te])
    row.update(verification_metrics(x, trials, center=x_train.mean(0)))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="corpus with train/ and test/")
    parser.add_argument("--generate", action="store_true", help="make the synthetic corpus at --root if missing")
    parser.add_argument("--train-speakers", type=int, default=80)
    parser.add_argument("--test-speakers", type=int, default=20)
    parser.add_argument("--utterances", type=int, default=24)
    parser.add_argument("--encoder-dim", type=int, default=128)
    parser.add_argument("--context-dim", type=int, default=128)
    parser.add_argument("--prediction-steps", type=int, default=12)
    parser.add_argument("--negatives", default="batch")
    parser.add_argument("--crop", type=int, default=20480, help="pretraining window (samples)")
    parser.add_argument("--eval-crop", type=int, default=48000, help="evaluation window (samples)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--max-minutes", type=float, default=20.0, help="pretraining wall-time budget")
    parser.add_argument("--calibration-batches", type=int, default=50)
    parser.add_argument("--center-per-speaker", type=int, default=8)
    add_common_args(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or 1)  # one thread: faster than two on a small shared machine
    if not (args.root / "train").is_dir():
        if not args.generate:
            raise SystemExit(f"no corpus at {args.root}; pass --generate (needs espeak-ng) or --root")
        generate_corpus(args.root, args.train_speakers, args.test_speakers, args.utterances, seed=args.seed)
    print(header(f"CPCAudio on synthetic speech ({args.root})"), flush=True)

    dm = AudioFolderDataModule(
        str(args.root / "train"),
        val_root=str(args.root / "test"),
        crop_samples=args.crop,
        eval_crop_samples=args.eval_crop,
        batch_size=args.batch_size,
        eval_batch_size=16,
        num_workers=0,
    )
    pl.seed_everything(args.seed, verbose=False)
    model = CPCAudio(
        encoder_dim=args.encoder_dim,
        context_dim=args.context_dim,
        prediction_steps=args.prediction_steps,
        negatives=args.negatives,
        lr=args.lr,
    )
    log = LossLog()
    trainer = quiet_trainer(max_steps=args.steps, max_time=timedelta(minutes=args.max_minutes), callbacks=[log])
    trainer.fit(model, dm)
    steps, n = trainer.global_step, max(1, min(50, len(log.losses) // 5))
    first, last = sum(log.losses[:n]) / n, sum(log.losses[-n:]) / n
    print(
        f"pretraining: {steps} steps of {args.batch_size} x {args.crop} samples in {log.seconds / 60:.1f} min; "
        f"loss {first:.3f} (first {n} steps) -> {last:.3f} (last {n})",
        flush=True,
    )

    t0 = time.perf_counter()
    val_loader = dm.labeled_dataloader("val")
    train_set = dm.dataset("train")
    per_speaker: dict[int, int] = {}
    center_idx = []
    for i, y in enumerate(train_set.targets):
        per_speaker[y] = per_speaker.get(y, 0) + 1
        if per_speaker[y] <= args.center_per_speaker:
            center_idx.append(i)
    center_loader = DataLoader(Subset(train_set, center_idx), batch_size=16)
    calibration = [(views[0], y) for _, (views, y) in zip(range(args.calibration_batches), dm.train_dataloader())]
    random_init = model.random_init_backbone(args.seed, calibrate_on=calibration, max_images=None)
    model.eval()
    y_val = torch.tensor(dm.dataset("val").targets)
    trials = make_trials(y_val)
    rows = []
    for name, backbone in (("CPC pretrained", model.backbone), ("random init (BN recalibrated)", random_init)):
        backbone.eval()
        x_val, y = utterance_embeddings(both_embeddings(backbone), val_loader)
        x_train, _ = utterance_embeddings(both_embeddings(backbone), center_loader)
        c = args.context_dim
        rows.append(evaluate(f"{name}, c mean", (x_val[:, :c], y), (x_train[:, :c], None), trials, args.seed))
        rows.append(evaluate(f"{name}, z mean", (x_val[:, c:], y), (x_train[:, c:], None), trials, args.seed))
    rows.append(
        evaluate("MFCC mean+std", mfcc_embeddings(val_loader), mfcc_embeddings(center_loader), trials, args.seed)
    )
    print(
        f"held-out: {len(y_val)} utterances of {len(y_val.unique())} unseen speakers, {trials[0].numel()} trials "
        f"({int(trials[2].sum())} target); evaluation {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    print("| encoder | dim | speaker-ID accuracy | EER | minDCF (0.01) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['encoder']} | {r['dim']} | {r['speaker_id']:.3f} | {r['eer']:.3f} | {r['min_dcf']:.3f} |", flush=True
        )
    summary = {"steps": steps, "pretrain_minutes": log.seconds / 60, "loss_first": first, "loss_last": last}
    write_json(args.json, args, [summary, *rows])


if __name__ == "__main__":
    main()
