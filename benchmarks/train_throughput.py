"""Training throughput of each method: a bare PyTorch loop against our ``Trainer`` run.

For every method, backbone, image size and batch size this prints two-view images per second
(source images per second, two augmented views each) and peak memory for

(a) ``bare``: a plain PyTorch loop around the method's own ``training_step`` (logging off): the same
    optimizer and LR schedule (``optimizer_and_schedule``), then the EMA update (``ema_pairs``) and
    the queue update (``enqueue``) the method's callbacks would do. Methods with per-step hooks that
    read the Trainer's step (SwAV's prototype freeze, DINO's weight-decay schedule, last-layer freeze
    and clipping) have no bare loop: measure them with ``--modes trainer``; and
(b) ``trainer``: ``pl.Trainer.fit`` with the method and the callbacks it brings
    (``configure_callbacks``), a CSV logger (default ``log_every_n_steps``) and no progress bar,

plus the ratio b/a. The same in-memory batches feed both (a ``DataLoader`` over ready-made views).
Warm-up steps are excluded; the per-step time is the median over the measured steps (on CUDA, the
mean over the measured window, bracketed by synchronizations). Each measurement runs in a fresh
subprocess so that peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident
set) is its own. ``--verify`` instead checks that both loops do the same thing: two steps of each
from the same initialization must leave identical weights, EMA targets and queues.

    python -m benchmarks.train_throughput --methods simclr mocov2 byol --backbone resnet18 \\
        --image-size 32 --batch-size 128 --warmup 2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import pytorch_lightning as pl
import torch

from benchmarks.common import IMAGE_METHODS, add_common_args, apply_threads, header, print_table, write_json
from lightning_ssl import REGISTRY
from lightning_ssl.callbacks import EMAUpdate
from lightning_ssl.contracts import HasEMATargets, HasQueue
from lightning_ssl.ema import ema_update_


# ------------------------------------------------------------------------------------- data
class ReadyViews(torch.utils.data.Dataset):
    """``length`` samples cycling over a small pool of ready-made view pairs (normalized floats)."""

    def __init__(self, length: int, pool: int, image_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.v1 = torch.randn(pool, 3, image_size, image_size, generator=gen)
        self.v2 = torch.randn(pool, 3, image_size, image_size, generator=gen)
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        j = i % self.v1.shape[0]
        return [self.v1[j], self.v2[j]], 0


def make_loader(batch_size: int, steps: int, image_size: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    data = ReadyViews(batch_size * steps, pool=batch_size, image_size=image_size)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, drop_last=True, pin_memory=pin_memory)


def build_model(args, method: str):
    torch.manual_seed(args.seed)
    kwargs = dict(
        backbone=args.backbone,
        small_image=args.image_size <= 64,
        channels_last=args.channels_last,
        compile_backbone=args.compile,
        fused_optimizer=args.fused,
        warmup_epochs=0,
        view_batching=args.view_batching,
    )
    return REGISTRY[method].build(
        size="small" if args.small else ("cifar" if args.image_size <= 64 else "paper"), **kwargs
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------- the loops
def bare_loop(model, loader, device, total, precision="32-true", warmup=0):
    """The bare loop; returns the time stamps at the start of every step, the end time and the start of
    the timed window."""
    device = torch.device(device)
    model = model.to(device).train()
    model.setup("fit")  # channels_last / compile, as the Trainer would
    model.log = lambda *a, **k: None  # outside a Trainer
    ema = next((c for c in model.configure_callbacks() if isinstance(c, EMAUpdate)), None)
    # as configure_optimizers: the method's parameter groups, lr scaling and per-group schedules
    optimizer, scheduler = model.optimizer_and_schedule(loader.batch_size, total, warmup_steps=0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    stamps, window_start = [], None
    for step, (views, target) in enumerate(loader):
        if step == total:
            break
        if step == warmup:
            _sync(device.type)
            window_start = time.perf_counter()
        stamps.append(time.perf_counter())
        views = [v.to(device, non_blocking=True) for v in views]
        with autocast:
            out = model.training_step((views, target), step)
        loss, keys = (out["loss"], out.get("keys")) if isinstance(out, dict) else (out, None)
        # Lightning's order: forward, zero_grad, backward, optimizer step, scheduler step, callbacks
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None and isinstance(model, HasEMATargets):
            ema_update_(model.ema_pairs(), ema.tau_at(step + 1, total))
        if keys is not None and isinstance(model, HasQueue):
            model.enqueue(keys)
    _sync(device.type)
    return stamps, time.perf_counter(), window_start


class StepTimer(pl.Callback):
    """Time stamps at the start of every training batch (covers data, hooks, step, callbacks)."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device = warmup, device
        self.stamps: list[float] = []
        self.window_start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if len(self.stamps) == self.warmup:
            _sync(self.device)
            self.window_start = time.perf_counter()
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        _sync(self.device)
        self.end = time.perf_counter()


def trainer_loop(model, loader, device, total, precision="32-true", warmup=0, progress_bar=0):
    from pytorch_lightning.loggers import CSVLogger

    timer = StepTimer(warmup, device)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [timer] + ([pl.callbacks.TQDMProgressBar(refresh_rate=progress_bar)] if progress_bar else [])
        trainer = pl.Trainer(
            accelerator=device,
            devices=1,
            max_steps=total,
            precision=precision,
            logger=CSVLogger(tmp),
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=bool(progress_bar),
            callbacks=callbacks,
            default_root_dir=tmp,
        )
        trainer.fit(model, train_dataloaders=loader)
    return timer.stamps, timer.end, timer.window_start


# ---------------------------------------------------------------------------------- workers
def worker(args) -> None:
    apply_threads(args)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    total = args.warmup + args.steps
    loader = make_loader(args.batch_size, total, args.image_size, pin_memory=args.device == "cuda")
    model = build_model(args, args.methods[0])
    run = bare_loop if args.worker == "bare" else trainer_loop
    extra = {"progress_bar": args.progress_bar} if args.worker == "trainer" else {}
    stamps, end, window_start = run(model, loader, args.device, total, args.precision, args.warmup, **extra)
    stamps = stamps + [end]
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])][args.warmup :]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    )
    print("RESULT " + json.dumps({"step_times": steps, "window": end - window_start, "peak_mb": peak}), flush=True)


def measure(args, method: str, mode: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--worker", mode, "--methods", method]
    for key in (
        "backbone",
        "image_size",
        "batch_size",
        "warmup",
        "steps",
        "device",
        "precision",
        "threads",
        "progress_bar",
        "seed",
        "view_batching",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += [f"--{k.replace('_', '-')}" for k in ("channels_last", "compile", "fused", "small") if getattr(args, k)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method}/{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    per_step = statistics.median(result["step_times"]) if args.device == "cpu" else result["window"] / args.steps
    result.update(method=method, mode=mode, step_s=per_step, images_per_s=args.batch_size / per_step)
    return result


def verify(args) -> bool:
    """Two steps of the bare loop and of ``Trainer.fit`` from the same initialization leave identical
    weights, EMA targets and queues (to 1e-6)."""
    apply_threads(args)
    ok = True
    for method in args.methods:
        loader = make_loader(args.batch_size, 2, args.image_size)
        bare, lit = build_model(args, method), build_model(args, method)
        torch.manual_seed(args.seed)
        bare_loop(bare, loader, "cpu", total=2)
        torch.manual_seed(args.seed)
        trainer_loop(lit, loader, "cpu", total=2)
        initial = build_model(args, method).state_dict()
        different = [
            k
            for k, v in bare.state_dict().items()
            if not torch.allclose(v.float(), lit.state_dict()[k].float(), atol=1e-6)
        ]
        ema = [k for k, v in bare.named_parameters() if "_ema." in k]
        ema_stale = bool(ema) and all(torch.equal(bare.state_dict()[k], initial[k]) for k in ema)
        print(
            f"{method}: {'identical' if not different else 'DIFFERENT: ' + ', '.join(different[:5])}"
            f"{'; EMA targets never moved' if ema_stale else ''}",
            flush=True,
        )
        ok = ok and not different and not ema_stale
    return ok


STEP_HOOKS = ("on_train_batch_start", "on_after_backward", "configure_gradient_clipping")


def needs_trainer(method: str) -> bool:
    """Whether the method (or a class it inherits from) overrides a per-step hook that reads the Trainer's
    step, which a bare loop cannot run."""
    cls = REGISTRY[method].cls
    return any(getattr(cls, hook) is not getattr(pl.LightningModule, hook) for hook in STEP_HOOKS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["simclr", "mocov2", "byol"], choices=IMAGE_METHODS)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=32, help="<= 64 uses the CIFAR stem (small_image=True)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--repeats", type=int, default=1, help="alternate bare/trainer this many times; report medians")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", dest="channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone(s)")
    p.add_argument("--fused", action="store_true", help="fused optimizer steps (default: foreach)")
    p.add_argument("--small", action="store_true", help="the registry's small heads (smoke runs)")
    p.add_argument("--view-batching", default="auto", choices=["auto", "concat", "per_view"])
    p.add_argument("--progress-bar", type=int, default=0, help="trainer: TQDM refresh rate (0: no bar)")
    p.add_argument("--modes", nargs="+", default=["bare", "trainer"], choices=["bare", "trainer"])
    p.add_argument("--verify", action="store_true", help="check that both loops compute the same (CPU, 2 steps)")
    p.add_argument("--worker", choices=["bare", "trainer"], help=argparse.SUPPRESS)
    args = add_common_args(p).parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the first step is never timed)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    unsupported = [m for m in args.methods if needs_trainer(m)] if args.verify or "bare" in args.modes else []
    if unsupported:
        p.error(
            f"{', '.join(unsupported)}: per-step hooks that read the Trainer's step ({', '.join(STEP_HOOKS)}) "
            "have no bare loop; use --modes trainer"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.verify:
        sys.exit(0 if verify(args) else 1)
    apply_threads(args)  # the header reports the thread count the workers use
    opts = [o for o in ("channels_last", "compile", "fused") if getattr(args, o)]
    print(
        header(
            f"{args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.device}, "
            f"{args.precision}, view_batching {args.view_batching}, options: {', '.join(opts) or 'none'}; "
            f"{args.warmup} warm-up + {args.steps} "
            f"measured steps, {args.repeats} repeat(s)"
        ),
        flush=True,
    )
    rows = []
    for method in args.methods:
        runs = {mode: [] for mode in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:
                runs[mode].append(measure(args, method, mode))
        nan = float("nan")
        a, b = (
            statistics.median(r["images_per_s"] for r in runs[m]) if runs.get(m) else nan for m in ("bare", "trainer")
        )
        ma, mb = (max(r["peak_mb"] for r in runs[m]) if runs.get(m) else nan for m in ("bare", "trainer"))
        rows.append(
            dict(
                method=method,
                bare_images_per_s=a,
                trainer_images_per_s=b,
                ratio=b / a,
                bare_peak_mb=ma,
                trainer_peak_mb=mb,
                runs=runs,
            )
        )
    print_table(
        rows,
        [
            ("method", "method", ""),
            ("bare_images_per_s", "bare img/s", ".1f"),
            ("trainer_images_per_s", "trainer img/s", ".1f"),
            ("ratio", "ratio b/a", ".3f"),
            ("bare_peak_mb", "bare peak MB", ".0f"),
            ("trainer_peak_mb", "trainer peak MB", ".0f"),
        ],
    )
    write_json(args.json, args, rows)
    return rows


if __name__ == "__main__":
    main()
