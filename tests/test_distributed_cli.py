"""Every method of the registry through the documented multi-process command: ``torchrun
--standalone --nproc-per-node 2 -m lightning_ssl fit --config configs/<method>_cifar10.yaml`` (gloo on
the CPU) for 5 optimizer steps, with the config's logger (CSV, a row every step), its callbacks
(checkpoints, learning-rate monitor, the kNN monitor's final report) and the methods' own (the view
grid logged by rank 0 alone: what made the second step fail with "Empty bucket specified"), on a
generated CIFAR-10 tree.

Each run is then compared with one process on the global batch (same config, batch 2B). They are equal
because the epoch order and every sample's augmentation depend only on the seed, the epoch and the
index (``datamodules/resumable.py``), the global batch of a step is the same set of samples in both,
``--trainer.sync_batchnorm true`` normalizes over the global batch (``GlobalBatchNorm`` on the CPU)
and the runs are in float64 (``64-true``). Where a method draws randomness of its own per process,
the comparison is left out and the test says why (``_NOT_EQUAL``); both ranks must still end with
identical weights. Stochastic depth (the ViT students of DINO, iBOT and DINOv2) drops blocks per
sample from each process's generator, and DINOv2's KoLeo term is over each process's batch by design
(as its code): the runs here set ``drop_path: 0`` and ``koleo_weight: 0`` (``_PER_PROCESS_TERMS``), so
that what is compared is the rest, masks included. MoCo runs with ``shuffle_bn: false`` here:
shuffling BN normalizes per-process sub-batches by design, which one process only simulates with other
sub-batches.

The default suite runs SimCLR (gathered negatives, the quickstart's method) and BYOL (EMA target,
batch-norm heads); the other methods are under ``-m slow``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from audio_trees import write_tree
from image_trees import make_tree

from lightning_ssl import REGISTRY
from lightning_ssl.cli import main

pytestmark = [pytest.mark.distributed]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STEPS = 5
BATCH = 4  # per process
CLASSES = [f"c{i}" for i in range(10)]
DEFAULT = {"simclr", "byol"}
_NOT_EQUAL = {
    "cpcv2": "its per-patch augmentation is drawn in the training step from each process's generator, "
    "not keyed by sample as the datamodule's views are",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    cifar = make_tree(root / "cifar10", {"train": 8, "test": 4}, CLASSES, size=(16, 16))
    write_tree(root / "speech" / "train", speakers=4, utterances=6, seconds=1.4)
    write_tree(root / "speech" / "test", speakers=4, utterances=3, seconds=3.2, first_speaker=4)
    return {"cifar10": cifar, "speech": root / "speech"}


def _config(name: str, run: Path, data: dict[str, Path], batch: int) -> Path:
    """The method's CIFAR-10 config (audio: the synthetic-speech config), shrunk to a few seconds."""
    entry = REGISTRY[name]
    source = f"{name}_cifar10.yaml" if entry.modality == "image" else "cpc_audio_synthetic.yaml"
    config = yaml.safe_load((REPO / "configs" / source).read_text())
    trainer = config["trainer"]
    trainer.update(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        max_time=None,
        log_every_n_steps=1,
        precision="64-true",
        sync_batchnorm=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run),
    )
    trainer["logger"]["init_args"]["save_dir"] = str(run)
    callbacks = []
    for callback in trainer.get("callbacks") or []:
        args = callback.setdefault("init_args", {})
        kind = callback["class_path"].rpartition(".")[2]
        if kind == "ModelCheckpoint":
            args.update(dirpath=str(run / "checkpoints"), every_n_train_steps=STEPS)
        elif kind == "KNNMonitor":
            args.update(every_n_epochs=0, labels_per_class=[2], max_report_images=40)
        elif kind == "SpeakerVerificationMonitor":
            args.update(every_n_epochs=0)
        callbacks.append(callback)
    callbacks.append({"class_path": "cli_recorder.StepRecorder", "init_args": {"path": str(run)}})
    trainer["callbacks"] = callbacks
    model = config["model"]["init_args"]
    model.update(entry.small)
    model.update({k: v for k, v in _PER_PROCESS_TERMS.items() if k in model})
    if name in ("moco", "mocov2"):
        model.update(shuffle_bn=False, split_bn_groups=1)
    data_args = config["data"]["init_args"]
    data_args.update(batch_size=batch, num_workers=0)
    if entry.modality == "image":
        data_args.update(root=str(data["cifar10"]), image_size=16)
        if "local_size" in data_args:
            data_args["local_size"] = 8
    else:
        data_args.update(root=str(data["speech"] / "train"), val_root=str(data["speech"] / "test"))
    path = run / "config.yaml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "lightning_ssl", "fit", "--config", str(config)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# terms drawn or computed per process by design, switched off for the comparison (module docstring)
_PER_PROCESS_TERMS = {"drop_path": 0.0, "koleo_weight": 0.0}


# Queues of keys (MoCo, NNCLR's support set) hold the same entries as one process on the global batch,
# but each step's block in the gathered order (rank 0's samples, then rank 1's) rather than the global
# batch's (the distributed sampler deals the samples out in turn): compared as sets of rows
_QUEUES = {"queue"}


def _metrics_rows(run: Path) -> list[dict]:
    files = list(run.rglob("metrics.csv"))
    assert len(files) == 1, files
    with files[0].open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in REGISTRY])
def test_torchrun_two_processes_through_the_cli_equal_one_process(name, data, tmp_path, monkeypatch):
    two = tmp_path / "two"
    done = _torchrun(_config(name, two, data, BATCH), tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "Empty bucket" not in log and "Traceback" not in log
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for report in ranks:
        assert report["global_step"] == STEPS and len(report["losses"]) == STEPS
    for key, value in ranks[0]["state"].items():  # DDP keeps the processes identical (EMA targets too)
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    rows = _metrics_rows(two)
    logged = [r for r in rows if r.get("train/loss")]
    assert len(logged) == STEPS, "a train/loss row at every step"
    callbacks = yaml.safe_load((two / "config.yaml").read_text())["trainer"]["callbacks"]
    if any(c["class_path"].endswith("ModelCheckpoint") for c in callbacks):
        assert (two / "checkpoints" / "last.ckpt").is_file()
    if REGISTRY[name].modality == "image":
        assert "Final report" in done.stdout and any(r.get("final/knn_top1_pretrained") for r in rows)

    one = tmp_path / "one"
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(_config(name, one, data, 2 * BATCH))])
    single = torch.load(one / "rank0.pt", weights_only=False)
    if name in _NOT_EQUAL:
        pytest.skip(f"{name}: {_NOT_EQUAL[name]}")
    mean_loss = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    torch.testing.assert_close(torch.tensor(mean_loss), torch.tensor(single["losses"]), rtol=1e-7, atol=1e-9)
    for key, value in single["state"].items():
        ours = ranks[0]["state"][key]
        if key in _QUEUES:
            ours, value = _rows_in_order(ours), _rows_in_order(value)
        torch.testing.assert_close(ours, value, rtol=1e-6, atol=1e-9, msg=lambda m, k=key: f"{k}: {m}")


def _rows_in_order(queue: torch.Tensor) -> torch.Tensor:
    return queue[queue[:, 0].argsort()]
