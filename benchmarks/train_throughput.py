"""Training throughput of each method: a bare PyTorch loop against our ``Trainer`` run.

For every method, backbone, image size and batch size this prints two-view images per second
(source images per second, two augmented views each) and peak memory for

(a) ``bare``: a hand-written PyTorch loop doing exactly the same computation as the method's
    training step: forward of every view through the online and target networks, the loss,
    backward, the optimizer step (the same optimizer and LR schedule), the EMA update and the queue
    update; and
(b) ``trainer``: ``pl.Trainer.fit`` with the method and the callbacks it brings
    (``configure_callbacks``), a CSV logger (default ``log_every_n_steps``) and no progress bar,

plus the ratio b/a. The same in-memory batches feed both (a ``DataLoader`` over ready-made views).
Warm-up steps are excluded; the per-step time is the median over the measured steps (on CUDA, the
mean over the measured window, bracketed by synchronisations, since per-step host times of an
asynchronous device are not step times). Each measurement runs in a fresh subprocess so that peak
memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set) is its own.

Example (the CPU target of the speed issue)::

    python benchmarks/train_throughput.py --methods simclr mocov2 byol --backbone resnet18 \\
        --image-size 32 --batch-size 128 --warmup 2 --steps 5

A new method is one entry in ``METHODS`` (its constructor with benchmark settings); without an entry
in ``BARE_STEPS`` the bare loop calls the method's own ``training_step`` outside Lightning (logging
disabled) and applies ``momentum_pairs()``/``enqueue()`` if the method has them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_ssl import BYOL, MoCoV2, SimCLR  # noqa: E402
from lightning_ssl.losses import byol_loss, moco_info_nce, nt_xent  # noqa: E402
from lightning_ssl.momentum import cosine_tau  # noqa: E402
from lightning_ssl.optim import build_optimizer, lr_lambda, scaled_lr, split_weight_decay  # noqa: E402

# ----------------------------------------------------------------------------------- methods
# Paper defaults, except warmup_epochs=0 (the schedule is irrelevant to speed; both loops use the same).
METHODS = {
    "simclr": lambda **kw: SimCLR(warmup_epochs=0, **kw),
    "mocov2": lambda **kw: MoCoV2(warmup_epochs=0, **kw),
    "byol": lambda **kw: BYOL(warmup_epochs=0, **kw),
    # CPC, once merged: "cpc": lambda **kw: CPC(**kw),   (the bare loop then uses its training_step)
}


def _simclr_step(model, views, step, total):
    z = model.projector(model.backbone(torch.cat([views[0], views[1]])))
    z1, z2 = z.chunk(2)
    return nt_xent(z1, z2, model.temperature, gather=False), None


def _moco_step(model, views, step, total):
    q = model.projector(model.backbone(views[0]))
    with torch.no_grad():
        k = F.normalize(model.projector_momentum(model.backbone_momentum(views[1])), dim=1)
    return moco_info_nce(q, k, model.queue, model.temperature), k


def _moco_after(model, keys, step, total):
    tau = model.momentum_tau
    _ema(model, tau)
    _enqueue(model.queue, model.queue_ptr, keys)


def _byol_step(model, views, step, total):
    x1, x2 = views[0], views[1]
    p1 = model.predictor(model.projector(model.backbone(x1)))
    p2 = model.predictor(model.projector(model.backbone(x2)))
    with torch.no_grad():
        z1 = model.projector_target(model.backbone_target(x1))
        z2 = model.projector_target(model.backbone_target(x2))
    return byol_loss(p1, z2) + byol_loss(p2, z1), None


def _byol_after(model, _, step, total):
    _ema(model, cosine_tau(step, total, model.tau_base, model.tau_final))


@torch.no_grad()
def _ema(model, tau):
    targets, onlines = [], []
    for online, target in model.momentum_pairs():
        targets += list(target.parameters())
        onlines += list(online.parameters())
    torch._foreach_lerp_(targets, onlines, 1.0 - tau)


@torch.no_grad()
def _enqueue(queue, ptr, keys):
    idx = (torch.arange(keys.shape[0], device=queue.device) + ptr) % queue.shape[0]
    queue.index_copy_(0, idx, keys.to(queue.dtype))
    ptr.copy_((ptr + keys.shape[0]) % queue.shape[0])


# name -> (forward+loss returning (loss, extra), update after the optimizer step or None)
BARE_STEPS = {
    "simclr": (_simclr_step, None),
    "mocov2": (_moco_step, _moco_after),
    "byol": (_byol_step, _byol_after),
}


def _generic_step(model, views, step, total):
    """Fallback for a method without a hand-written bare step: its training_step outside Lightning."""
    model.log = lambda *a, **k: None
    out = model.training_step((views, None), step)
    return (out["loss"], out.get("keys")) if isinstance(out, dict) else (out, None)


def _generic_after(model, keys, step, total):
    if callable(getattr(model, "momentum_pairs", None)):
        cb = [c for c in (model.configure_callbacks() or []) if hasattr(c, "tau")]
        tau = cb[0].tau(step, total) if cb else 0.999
        _ema(model, tau)
    if keys is not None and callable(getattr(model, "enqueue", None)):
        model.enqueue(keys)


# ------------------------------------------------------------------------------------- data
class _Views(torch.utils.data.Dataset):
    """``length`` samples cycling over a small pool of ready-made view pairs (normalised floats)."""

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


def _loader(args, total_steps):
    data = _Views(args.batch_size * total_steps, pool=args.batch_size, image_size=args.image_size)
    return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False, drop_last=True,
                                       num_workers=0, pin_memory=args.device == "cuda")


def build_model(args):
    kw = dict(backbone=args.backbone, small_image=args.image_size <= 64, channels_last=args.channels_last,
              compile_backbone=args.compile, fused_optimizer=args.fused)
    return METHODS[args.method](**kw)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------- workers
def bare_loop(model, loader, device, total, precision="32-true", channels_last=False, compile=False, warmup=0):
    """The bare loop: ``model``'s submodules, the same optimizer, schedule, loss, EMA and queue updates,
    no Lightning. Returns the time stamps at the start of every step, the end time and the window start."""
    device = torch.device(device)
    model = model.to(device)
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        for module in model._backbone_modules():
            module.compile()
    step_fn, after_fn = BARE_STEPS.get(model_name(model), (_generic_step, _generic_after))
    cfg = model.optim_config
    lr = cfg["lr"] if cfg["lr"] is not None else scaled_lr(cfg["base_lr"], loader.batch_size)
    optimizer = build_optimizer(cfg["optimizer"], split_weight_decay([model], cfg["weight_decay"]), lr=lr,
                                momentum=cfg["momentum"], fused=cfg["fused"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total, 0, cfg["schedule"]))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    stamps, window_start = [], None
    for step, (views, _) in enumerate(loader):
        if step == total:
            break
        if step == warmup:
            _sync(device.type)
            window_start = time.perf_counter()
        stamps.append(time.perf_counter())
        views = [v.to(device, non_blocking=True) for v in views]
        with autocast:
            loss, extra = step_fn(model, views, step, total)
        # Lightning's order (forward, zero_grad, backward): on CPU, freeing the old gradients before the
        # forward instead changes the allocation pattern enough to cost about 8% (page faults).
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_fn is not None:
            after_fn(model, extra, step + 1, total)
    _sync(device.type)
    return stamps, time.perf_counter(), window_start


def model_name(model) -> str:
    """The ``METHODS``/``BARE_STEPS`` key of a method instance (e.g. ``MoCoV2`` -> ``mocov2``)."""
    cls = type(model).__name__.lower()
    return "mocov2" if cls == "moco" and getattr(model, "version", 2) == 2 else cls


def run_bare(args):
    """(a): the same computation as the method's step, written as a plain PyTorch loop."""
    total = args.warmup + args.steps
    stamps, end, window_start = bare_loop(
        build_model(args), _loader(args, total), args.device, total, args.precision, args.channels_last,
        args.compile, args.warmup,
    )
    return _times(stamps + [end], args, end - window_start)


class _StepTimer:
    """Time stamps at the start of every training batch (covers data, hooks, step, callbacks)."""

    def __init__(self, warmup, device):
        import pytorch_lightning as pl

        timer = self

        class Callback(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if len(timer.stamps) == warmup:
                    _sync(device)
                    timer.window_start = time.perf_counter()
                timer.stamps.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module):
                _sync(device)
                timer.end = time.perf_counter()

        self.stamps, self.window_start, self.end = [], None, None
        self.callback = Callback()


def run_trainer(args) -> list[float]:
    """(b): ``Trainer.fit`` with the method and its callbacks."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    total = args.warmup + args.steps
    model = build_model(args)
    timer = _StepTimer(args.warmup, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [timer.callback]
        if args.progress_bar:
            callbacks.append(pl.callbacks.TQDMProgressBar(refresh_rate=args.progress_bar))
        trainer = pl.Trainer(
            accelerator=args.device, devices=1, max_steps=total, precision=args.precision,
            logger=CSVLogger(tmp), enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=bool(args.progress_bar), callbacks=callbacks, default_root_dir=tmp,
        )
        trainer.fit(model, train_dataloaders=_loader(args, total))
    # the last step's end is on_train_end (after the last callbacks ran)
    return _times(timer.stamps + [timer.end], args, timer.end - timer.window_start)


def _times(stamps, args, window):
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])][args.warmup:]
    return {"step_times": steps, "window": window}


def worker(args):
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    result = (run_bare if args.mode == "bare" else run_trainer)(args)
    result["peak_mb"] = _peak_memory_mb(args.device)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------- driver
def measure(args, method: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--methods", method]
    for key in ("backbone", "image_size", "batch_size", "warmup", "steps", "device", "precision", "threads", "progress_bar"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += [f"--{k.replace('_', '-')}" for k in ("channels_last", "compile", "fused") if getattr(args, k)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method}/{mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    per_step = statistics.median(result["step_times"]) if args.device == "cpu" else result["window"] / args.steps
    result.update(method=method, mode=mode, step_s=per_step, images_per_s=args.batch_size / per_step)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["simclr", "mocov2", "byol"], choices=sorted(METHODS))
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
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--progress-bar", type=int, default=0, help="trainer: TQDM refresh rate (0: no bar)")
    p.add_argument("--modes", nargs="+", default=["bare", "trainer"], choices=["bare", "trainer"])
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=["bare", "trainer"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the first step is never timed)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        args.mode, args.method = args.worker, args.methods[0]
        return worker(args)
    opts = [o for o in ("channels_last", "compile", "fused") if getattr(args, o)]
    print(f"# {args.backbone} {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.device}, "
          f"{args.precision}, options: {', '.join(opts) or 'none'}; {args.warmup} warm-up + {args.steps} "
          f"measured steps, {args.repeats} repeat(s); torch {torch.__version__}, threads "
          f"{args.threads or torch.get_num_threads()}", flush=True)
    header = f"{'method':<8} {'bare img/s':>11} {'trainer img/s':>14} {'ratio b/a':>10} {'bare peak MB':>13} {'trainer peak MB':>16}"
    print(header, flush=True)
    rows = []
    for method in args.methods:
        runs = {mode: [] for mode in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:
                runs[mode].append(measure(args, method, mode))
        nan = float("nan")
        a, b = (statistics.median(r["images_per_s"] for r in runs[m]) if runs.get(m) else nan for m in ("bare", "trainer"))
        ma, mb = (max(r["peak_mb"] for r in runs[m]) if runs.get(m) else nan for m in ("bare", "trainer"))
        row = dict(method=method, bare_images_per_s=a, trainer_images_per_s=b, ratio=b / a, bare_peak_mb=ma,
                   trainer_peak_mb=mb, runs=runs)
        rows.append(row)
        print(f"{method:<8} {a:>11.1f} {b:>14.1f} {b / a:>10.3f} {ma:>13.0f} {mb:>16.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
