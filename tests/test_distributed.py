"""Distributed correctness with real processes (gloo on CPU, 127.0.0.1): every method under DDP.

What each test would catch is said in its docstring: negatives not gathered, keys enqueued per
process, EMA diverging across ranks, wrong learning-rate scaling, broken checkpoint resume, a CLI
that ignores the launcher. Inputs follow each entry's modality (``MethodEntry.modality``): image
methods get random images, audio methods random waveforms (``MethodEntry.example_views``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from audio_helpers import ExampleViewsDataModule
from conftest import TinyConvNet, small_backbone
from dist_utils import LOOPBACK, RandomTwoViewDataModule, free_port, run_distributed
from helpers import quiet_trainer
from test_dino import center_on_half, center_teacher
from test_swav import sinkhorn_on_half, sinkhorn_scores
from torch import nn

from lightning_ssl import REGISTRY, MoCoV2, SimCLR
from lightning_ssl.distributed import batch_shuffle, batch_unshuffle, launcher_trainer_flags
from lightning_ssl.losses import dino_center, sinkhorn_knopp

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:You are trying to .self.log"),  # training_step called outside a Trainer
]

WORLD = 2
B = 4  # per-process batch
TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


# ----------------------------------------------------------------------------- model factories
SIZE = 16  # image side of the distributed runs


def _simclr() -> SimCLR:
    return SimCLR(
        TinyConvNet(), projection_hidden_dim=32, projection_dim=8, temperature=0.5, base_lr=0.3, warmup_epochs=0
    )


def _is_image(name: str) -> bool:
    return REGISTRY[name].modality == "image"


def _registered(name: str, **kwargs):
    """Every registered method, small (the MoCo queue of 64 is a multiple of the global batch 16 =
    4 per process x 2 processes x accumulation 2); image methods on the tiny conv net, the others
    on their own small backbone; ``kwargs`` on top."""
    if not _is_image(name):
        return REGISTRY[name].build(size="small", warmup_epochs=0, **kwargs)
    return REGISTRY[name].build(size="small", backbone=small_backbone(REGISTRY[name]), warmup_epochs=0, **kwargs)


NAMES = sorted(REGISTRY)


def _flat(modules) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for m in modules for p in m.parameters()])


def _views(seed: int, n: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def _method_views(name: str, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of ``n`` inputs of the method's modality."""
    if _is_image(name):
        return _views(seed, n)
    return tuple(REGISTRY[name].example_views(n, seed=seed, size=SIZE))


# ----------------------------------------------------------------------------- collective checks
class _StepModule(nn.Module):
    """Lets DDP wrap a method's training_step (DDP averages the gradients as in real training)."""

    def __init__(self, method: pl.LightningModule):
        super().__init__()
        self.method = method

    def forward(self, x1, x2):
        out = self.method.training_step(([x1, x2], None), 0)
        return out["loss"] if isinstance(out, dict) else out


# terms a method computes per process by design (so that 2 x B is not 1 x 2B), off in the comparison:
# DINOv2's KoLeo regularizer is over each process's batch, as in DINOv2's code
_PER_PROCESS_OFF = {"dinov2": {"koleo_weight": 0.0}}


def _collectives_worker(rank: int, world: int) -> dict:
    """One set of processes for the checks that need no Trainer (saves process start-ups)."""
    import warnings

    import lightning_ssl.methods.moco as moco_module

    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    out: dict = {}
    local = slice(rank * B, (rank + 1) * B)
    # the library's DistributedSampler deals a shuffled epoch out in turn: row j of this process's batch
    # is row j * world + rank of the batch one process holds (what the masked methods' masks follow)
    dealt = slice(rank, None, world)

    # Every registered method under DDP, eval mode (BN uses running statistics, so the batch split
    # cannot matter; no random augmentation). float64, so that the comparison is elementwise to 1e-5
    # and not limited by float32 summation order.
    out["steps"] = {}
    for name in NAMES:
        x1, x2 = (v.double() for v in _method_views(name, 1, WORLD * B))
        torch.manual_seed(0)
        model = _registered(name, **_PER_PROCESS_OFF.get(name, {})).double().eval()
        ddp = nn.parallel.DistributedDataParallel(_StepModule(model))
        loss = ddp(x1[dealt], x2[dealt])
        loss.backward()
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out["steps"][name] = {"loss": mean_loss / world, "grads": grads}

    # batch_shuffle / batch_unshuffle on rank-specific rows.
    torch.manual_seed(1)
    x = torch.arange(B, dtype=torch.float32).unsqueeze(1) + 100 * rank
    shuffled, idx = batch_shuffle(x)
    out["shuffle"] = {"x": x, "shuffled": shuffled, "idx": idx, "restored": batch_unshuffle(shuffled, idx)}

    # MoCo v2 keys with shuffle-BN (train mode: the key encoder's BN uses batch statistics).
    torch.manual_seed(0)
    moco = MoCoV2(TinyConvNet(), projection_hidden_dim=32, projection_dim=8, queue_size=64).train()
    recorded = {}
    real_shuffle = moco_module.batch_shuffle

    def recording_shuffle(x_k):
        recorded["shuffled"], recorded["idx"] = real_shuffle(x_k)
        return recorded["shuffled"], recorded["idx"]

    moco_module.batch_shuffle = recording_shuffle
    try:
        xq, xk = _views(2, WORLD * B)
        keys = moco.training_step(([xq[local], xk[local]], None), 0)["keys"]
    finally:
        moco_module.batch_shuffle = real_shuffle
    out["moco"] = {"keys": keys, **recorded}
    # SwAV's Sinkhorn codes and DINO's center, each process holding half of a global batch
    out["sinkhorn"], out["dino_center"] = sinkhorn_on_half(rank), center_on_half(rank)
    if rank == 0:
        out["moco"]["key_encoder"] = {
            "backbone": moco.backbone_ema.state_dict(),
            "projector": moco.projector_ema.state_dict(),
        }
    return out


@pytest.fixture(scope="module")
def collectives() -> list[dict]:
    return run_distributed(_collectives_worker, WORLD)


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_equal_one_process_with_the_global_batch(collectives, name):
    """Loss and DDP-averaged gradients of 2 processes x B equal 1 process x 2B, for every registered
    method (negatives, queues and statistics gathered across processes, positives at the right global
    index on rank 1)."""
    torch.manual_seed(0)
    model = _registered(name, **_PER_PROCESS_OFF.get(name, {})).double().eval()
    x1, x2 = (v.double() for v in _method_views(name, 1, WORLD * B))
    out = model.training_step(([x1, x2], None), 0)
    loss = out["loss"] if isinstance(out, dict) else out
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(expected) > 0
    for r in range(WORLD):
        step = collectives[r]["steps"][name]
        torch.testing.assert_close(step["loss"], loss.detach(), rtol=1e-5, atol=0)
        assert step["grads"].keys() == expected.keys()
        for key, grad in expected.items():
            torch.testing.assert_close(
                step["grads"][key],
                grad,
                rtol=1e-5,
                atol=1e-12 * grad.abs().max().item(),
                msg=lambda m, k=key: f"{k}: {m}",
            )


def test_swav_sinkhorn_over_two_processes_equals_one_process_with_the_global_batch(collectives):
    """The codes of each process's half equal the rows of the one-process codes of the whole batch (the
    sums are all-reduced); a Sinkhorn over the local half alone would differ."""
    expected = sinkhorn_knopp(sinkhorn_scores(), 0.05, 3)
    torch.testing.assert_close(torch.cat([c["sinkhorn"] for c in collectives]), expected)
    assert not torch.allclose(collectives[0]["sinkhorn"], sinkhorn_knopp(sinkhorn_scores()[:B], 0.05, 3))


def test_dino_center_over_two_processes_equals_one_process_with_the_global_batch(collectives):
    """Both processes hold the center of the whole batch; a per-process mean would differ."""
    teacher = center_teacher()
    expected = dino_center(torch.zeros(1, 5, dtype=torch.float64), teacher, 0.9)
    for c in collectives:
        torch.testing.assert_close(c["dino_center"], expected)
    local = dino_center(torch.zeros(1, 5, dtype=torch.float64), [t[:B] for t in teacher], 0.9)
    assert not torch.allclose(collectives[0]["dino_center"], local)


def test_simclr_local_negatives_would_differ():
    """Guards the previous test: without gathering, the 1-process loss on B differs from the 2B loss."""
    torch.manual_seed(0)
    model = _simclr().eval()
    x1, x2 = _views(1, WORLD * B)
    with torch.no_grad():
        full = model.training_step(([x1, x2], None), 0)
        half = model.training_step(([x1[:B], x2[:B]], None), 0)
    assert not torch.allclose(full, half, rtol=1e-3)


def test_batch_shuffle_then_unshuffle_is_identity(collectives):
    """Shuffle crosses processes (one permutation shared by all ranks) and unshuffle restores each row."""
    everything = torch.cat([c["shuffle"]["x"] for c in collectives])
    idx = collectives[0]["shuffle"]["idx"]
    perm = torch.argsort(idx)
    for r, c in enumerate(collectives):
        torch.testing.assert_close(c["shuffle"]["idx"], idx)  # same permutation on every rank
        torch.testing.assert_close(c["shuffle"]["restored"], c["shuffle"]["x"], rtol=0, atol=0)
        torch.testing.assert_close(c["shuffle"]["shuffled"], everything[perm[r * B : (r + 1) * B]], rtol=0, atol=0)
    origin_of_rank0_rows = collectives[0]["shuffle"]["shuffled"].squeeze(1) // 100
    assert (origin_of_rank0_rows == 1).any(), "rank 0 received no row of rank 1: the shuffle stays local"


def test_batch_shuffle_is_identity_in_one_process():
    x = torch.randn(5, 3)
    shuffled, idx = batch_shuffle(x)
    assert torch.equal(shuffled, x) and torch.equal(batch_unshuffle(shuffled, idx), x)


def test_moco_shuffle_bn_keys_equal_single_process_keys_per_sub_batch(collectives):
    """With shuffle-BN, each key equals the key encoder (BN in train mode) applied in one process to
    the shuffled sub-batch that held its image, returned to its original row."""
    torch.manual_seed(0)
    moco = MoCoV2(TinyConvNet(), projection_hidden_dim=32, projection_dim=8, queue_size=64).train()
    state = collectives[0]["moco"]["key_encoder"]
    moco.backbone_ema.load_state_dict(state["backbone"])
    moco.projector_ema.load_state_dict(state["projector"])
    _, xk = _views(2, WORLD * B)
    idx = collectives[0]["moco"]["idx"]
    perm = torch.argsort(idx)
    with torch.no_grad():
        encode = lambda x: F.normalize(moco.projector_ema(moco.backbone_ema(x)), dim=1)  # noqa: E731
        sub_batches = [xk[perm[r * B : (r + 1) * B]] for r in range(WORLD)]
        for r in range(WORLD):
            torch.testing.assert_close(collectives[r]["moco"]["shuffled"], sub_batches[r], rtol=0, atol=0)
        expected = torch.cat([encode(s) for s in sub_batches])[idx]
        unshuffled = torch.cat([encode(xk[r * B : (r + 1) * B]) for r in range(WORLD)])
    got = torch.cat([c["moco"]["keys"] for c in collectives])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, unshuffled, atol=1e-4), (
        "keys do not depend on the shuffle: BN statistics not shuffled"
    )


# ----------------------------------------------------------------------------- full DDP fits
class _Recorder(pl.Callback):
    """Records what the checks need: state at train start/end, keys of every batch, lr and batch size."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.start: dict = {}

    @staticmethod
    def state(pl_module) -> dict:
        s = {"online": torch.cat([p.detach().flatten().clone() for p in pl_module.parameters() if p.requires_grad])}
        if hasattr(pl_module, "ema_pairs"):
            s["target"] = _flat([t for _, t in pl_module.ema_pairs()])
        if hasattr(pl_module, "queue"):
            s["queue"], s["queue_ptr"] = pl_module.queue.clone(), pl_module.queue_ptr.clone()
        return s

    def on_train_start(self, trainer, pl_module):
        self.start = self.state(pl_module)
        self.global_batch = pl_module.global_batch_size()
        self.lr = trainer.optimizers[0].param_groups[0]["initial_lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(outputs, dict) and "keys" in outputs:
            self.keys.append(outputs["keys"].detach().clone())


FIT_STEPS, RESUME_STEPS = 3, 2


def _fit_worker(rank: int, world: int, root: str) -> dict:
    """For each method: ``Trainer(strategy="ddp", accelerator="cpu", devices=world)`` fit, checkpoint,
    resume (all methods in one set of processes, to pay the process start-up once)."""
    return {name: _fit_and_resume(name, world, str(Path(root) / name), FIT_STEPS, RESUME_STEPS) for name in NAMES}


def _fit_and_resume(name: str, world: int, root: str, steps: int, more_steps: int) -> dict:
    results = {}
    ckpt = Path(root) / "last.ckpt"
    for phase, max_steps in (("first", steps), ("resumed", steps + more_steps)):
        pl.seed_everything(0, verbose=False)
        model, recorder = _registered(name), _Recorder()
        trainer = quiet_trainer(
            strategy="ddp",
            devices=world,
            max_steps=max_steps,
            accumulate_grad_batches=2,
            default_root_dir=root,
            callbacks=[recorder],
        )
        if _is_image(name):
            datamodule = RandomTwoViewDataModule(batch_size=B, image_size=SIZE)
        else:
            datamodule = ExampleViewsDataModule(REGISTRY[name], num_samples=64, batch_size=B, shuffle=True)
        trainer.fit(
            model,
            datamodule=datamodule,
            ckpt_path=ckpt if phase == "resumed" else None,
        )
        if phase == "first":
            trainer.save_checkpoint(ckpt)
        results[phase] = {
            "start": recorder.start,
            "end": _Recorder.state(model),
            "keys": recorder.keys,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "global_batch": recorder.global_batch,
            "lr": recorder.lr,
            "base_lr": model.optim_config["base_lr"],  # resolved (MoCo v3's None: the paper's for the backbone)
            "lr_scaling": model.optim_config["lr_scaling"],
            "loss": float(trainer.callback_metrics["train/loss"]),
        }
    return results


def _expected_queue(queue: torch.Tensor, ptr: int, keys_per_batch: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The FIFO written independently of the library: key i of the stream goes to slot (ptr + i) % K."""
    queue = queue.clone()
    stream = torch.cat(keys_per_batch)
    for i, key in enumerate(stream):
        queue[(ptr + i) % queue.shape[0]] = key
    return queue, (ptr + stream.shape[0]) % queue.shape[0]


@pytest.fixture(scope="module")
def ddp_fits(tmp_path_factory) -> list[dict]:
    return run_distributed(_fit_worker, WORLD, str(tmp_path_factory.mktemp("ddp_fits")), init_group=False)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_fit_checkpoint_resume(name, ddp_fits):
    """A 2-process DDP fit: lr scaled by the global batch (4 x 2 processes x 2 accumulation = 16);
    online and target networks and MoCo's queue identical on both ranks; the queue holds both
    ranks' keys in rank order; a resumed run starts from exactly the saved state and continues."""
    steps, more = FIT_STEPS, RESUME_STEPS
    ranks = [results[name] for results in ddp_fits]
    for phase, n_steps in (("first", steps), ("resumed", steps + more)):
        r0, r1 = ranks[0][phase], ranks[1][phase]
        for rec in (r0, r1):
            assert rec["world_size"] == WORLD and rec["global_step"] == n_steps
            assert rec["global_batch"] == B * WORLD * 2
            scale = rec["global_batch"] / 256 if rec["lr_scaling"] == "linear" else rec["global_batch"] ** 0.5
            assert rec["lr"] == pytest.approx(rec["base_lr"] * scale)
            assert torch.isfinite(torch.tensor(rec["loss"]))
        for key in r0["end"]:
            assert torch.equal(r0["end"][key], r1["end"][key]), f"{phase}: {key} differs between ranks"
        assert not torch.equal(r0["start"]["online"], r0["end"]["online"]), "no training happened"
        if "target" in r0["end"]:
            assert not torch.equal(r0["start"]["target"], r0["end"]["target"]), "the EMA never ran"
        if "queue" in r0["end"]:
            assert len(r0["keys"]) == len(r1["keys"]) == 2 * (n_steps - (steps if phase == "resumed" else 0))
            gathered = [torch.cat([k0, k1]) for k0, k1 in zip(r0["keys"], r1["keys"])]
            queue, ptr = _expected_queue(r0["start"]["queue"], int(r0["start"]["queue_ptr"]), gathered)
            torch.testing.assert_close(r0["end"]["queue"], queue, rtol=0, atol=0)
            assert int(r0["end"]["queue_ptr"]) == ptr
    first, resumed = ranks[0]["first"], ranks[0]["resumed"]
    for key in first["end"]:
        assert torch.equal(resumed["start"][key], first["end"][key]), f"resume did not restore {key}"


# ----------------------------------------------------------------------------- launchers and the CLI
def test_launcher_trainer_flags_from_environment():
    """torchrun / fabric run / SLURM environments map to devices and num_nodes; no launcher: nothing."""
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}
    assert launcher_trainer_flags(torchrun) == {"devices": 4, "num_nodes": 2}
    fabric = {**torchrun, "LT_ACCELERATOR": "cuda", "LT_PRECISION": "bf16-mixed"}
    assert launcher_trainer_flags(fabric) == {
        "devices": 4,
        "num_nodes": 2,
        "accelerator": "cuda",
        "precision": "bf16-mixed",
    }
    slurm = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "ssl"}
    assert launcher_trainer_flags(slurm) == {"devices": 4, "num_nodes": 2}
    assert launcher_trainer_flags({**slurm, "SLURM_JOB_NAME": "interactive"}) == {}
    assert launcher_trainer_flags({}) == {}
    with pytest.raises(ValueError, match="not a multiple"):
        launcher_trainer_flags({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "3", "WORLD_SIZE": "4"})


_RECORDER_CALLBACK = '''
import json, os
import pytorch_lightning as pl


class LaunchReport(pl.Callback):
    """Writes what each rank saw of the launch (used by the two-node CLI test)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        report = {
            "global_rank": trainer.global_rank, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "node_rank": trainer.node_rank, "global_step": trainer.global_step,
            "global_batch": pl_module.global_batch_size(),
        }
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)
'''


def _two_node_command(launcher: str, node_rank: int, port: int, config: Path, script: Path) -> list[str]:
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node_rank),
            "--master-addr",
            LOOPBACK,
            "--master-port",
            str(port),
            "-m",
            "lightning_ssl",
            "fit",
            "--config",
            str(config),
        ]
    return [  # `fabric run` is `python -m lightning_fabric.cli` (the console script needs lightning-fabric)
        sys.executable,
        "-m",
        "lightning_fabric.cli",
        "--accelerator",
        "cpu",
        "--devices",
        "1",
        "--num-nodes",
        "2",
        "--node-rank",
        str(node_rank),
        "--main-address",
        LOOPBACK,
        "--main-port",
        str(port),
        str(script),
        "fit",
        "--config",
        str(config),
    ]


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("fabric", marks=pytest.mark.slow)])
def test_two_node_launch_over_loopback_runs_cli_fit(launcher, tmp_path):
    """Two launcher invocations (node ranks 0 and 1, one process each) on 127.0.0.1 run
    ``lightning_ssl fit`` to completion; the config says ``devices: 1`` and no ``num_nodes``:
    the CLI takes both from the launcher's environment."""
    import json

    (tmp_path / "launch_report.py").write_text(_RECORDER_CALLBACK)
    script = tmp_path / "lightning_ssl_main.py"
    script.write_text("from lightning_ssl.cli import main\n\nmain()\n")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: 2
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          enable_checkpointing: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: launch_report.LaunchReport
              init_args:
                path: {tmp_path}
        model:
          class_path: lightning_ssl.MoCo
          init_args:
            backbone: resnet18
            small_image: true
            projection_dim: 16
            queue_size: 32
        data:
          class_path: datamodules.DigitsDataModule
          init_args:
            batch_size: 8
            image_size: 16
    """)
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MASTER_ADDR": LOOPBACK,
    }
    port = free_port()
    procs = [
        subprocess.Popen(
            _two_node_command(launcher, node, port, config, script),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node} failed:\n{log[-4000:]}"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert rep == {
            "global_rank": r,
            "world_size": 2,
            "num_nodes": 2,
            "node_rank": r,
            "global_step": 2,
            "global_batch": 16,
        }
