"""What every method shares: the backbone, the representation used for evaluation, and the
optimizer with its warmup/cosine (or step) schedule, scaled by the global batch size.

A method subclasses ``SSLMethod``, builds its heads, and writes its own ``training_step`` on batches
``(views, target)`` where ``views`` is a list of image tensors (the target is ignored).
"""
from __future__ import annotations

import inspect

import torch
import pytorch_lightning as pl
from torch import nn

from lightning_ssl.backbones import build_backbone, reset_parameters
from lightning_ssl.optim import build_optimizer, lr_lambda, scaled_lr, split_weight_decay

__all__ = ["SSLMethod"]


class SSLMethod(pl.LightningModule):
    """Base class of the methods. Subclasses pass their (typed, paper-default) arguments through.

    Args:
        backbone: torchvision model name or ``nn.Module`` (see ``build_backbone``).
        small_image: CIFAR stem for 32x32 inputs.
        optimizer: ``lars``, ``sgd`` or ``adamw``.
        base_lr: learning rate for a global batch of 256; the peak lr is ``base_lr * B / 256`` with
            ``B = batch size x processes x gradient accumulation``.
        lr: the peak learning rate itself, overriding the scaling rule when given.
        weight_decay: applied to weights only; biases and norm parameters are excluded.
        momentum: SGD/LARS momentum.
        warmup_epochs: linear warmup length (fractions allowed).
        schedule: ``cosine``, ``step`` (x0.1 at 60% and 80%) or ``constant``.

    Fast-path options (none changes what is computed; see ``docs/speed.md``):
        channels_last: keep 4-d weights (hence conv activations) in NHWC memory format, applied in
            ``setup``; faster convolutions with tensor cores and oneDNN.
        compile_backbone: ``torch.compile`` the backbone (and its momentum copy) in place, in ``setup``;
            the state_dict keys are unchanged.
        fused_optimizer: one fused kernel per parameter group for the optimizer step (``fused=True``
            for SGD/AdamW; LARS scales the gradients by the trust ratio with foreach ops, then takes a
            fused SGD step). Off: foreach (multi-tensor) steps, LARS included.
    Mixed precision is the Trainer's ``precision="bf16-mixed"``; the losses compute in float32.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        small_image: bool,
        optimizer: str,
        base_lr: float,
        lr: float | None,
        weight_decay: float,
        momentum: float,
        warmup_epochs: float,
        schedule: str,
        channels_last: bool = False,
        compile_backbone: bool = False,
        fused_optimizer: bool = False,
    ):
        super().__init__()
        # Collects the arguments of the subclass's __init__ too. A module given as backbone is not a
        # hyperparameter: pass it again to ``load_from_checkpoint``.
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        # Keep exactly the most-derived class's arguments (so ``load_from_checkpoint`` can call it).
        accepted = inspect.signature(type(self).__init__).parameters
        for key in [k for k in self.hparams if k not in accepted]:
            del self.hparams[key]
        if optimizer not in ("lars", "sgd", "adamw"):
            raise ValueError(f"optimizer must be 'lars', 'sgd' or 'adamw', got {optimizer!r}")
        if schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {schedule!r}")
        self.backbone, self.feature_dim = build_backbone(backbone, small_image=small_image)
        self.small_image = small_image
        self.optim_config = dict(
            optimizer=optimizer, base_lr=base_lr, lr=lr, weight_decay=weight_decay, momentum=momentum,
            warmup_epochs=warmup_epochs, schedule=schedule, fused=fused_optimizer,
        )
        self.channels_last, self.compile_backbone = channels_last, compile_backbone
        self._compiled = False

    # ------------------------------------------------------------------- fast path
    def setup(self, stage: str) -> None:
        """Apply ``channels_last`` and ``compile_backbone`` once every submodule exists (targets included)."""
        if self.channels_last:
            # Weights in NHWC make every convolution (and the BN/ReLU after it) run channels-last;
            # the first convolution converts the NCHW input itself.
            self.to(memory_format=torch.channels_last)
        if self.compile_backbone and not self._compiled:
            for module in self._backbone_modules():
                module.compile()  # in place: parameter names (checkpoint keys) do not change
            self._compiled = True

    def _backbone_modules(self) -> list[nn.Module]:
        """The backbone and the momentum copies paired with it (``momentum_pairs``), if any."""
        modules = [self.backbone]
        pairs = getattr(self, "momentum_pairs", None)
        if callable(pairs):
            modules += [target for online, target in pairs() if online is self.backbone]
        return modules

    # ----------------------------------------------------------------- representation
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The representation used for evaluation (kNN, linear probe): backbone features."""
        return self.representation(images)

    def representation(self, images: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """Features of ``images`` from this method's backbone, or from ``backbone`` of the same architecture."""
        return (self.backbone if backbone is None else backbone)(images)

    def random_init_backbone(self, seed: int = 0) -> nn.Module:
        """A freshly initialised backbone of the same architecture (the random-init baseline)."""
        name = self.hparams.get("backbone")
        if isinstance(name, str):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module, _ = build_backbone(name, small_image=self.small_image)
            return module.to(self.device)
        return reset_parameters(self.backbone, seed)

    # ------------------------------------------------------------------ optimization
    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes: batch x processes x accumulation."""
        if self.trainer.train_dataloader is None:  # not loaded yet (e.g. max_steps set)
            self.trainer.fit_loop.setup_data()
        loader = self.trainer.train_dataloader
        batch = getattr(loader, "batch_size", None)
        if batch is None:
            batch = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if batch is None:
            raise ValueError(
                "cannot read the batch size from the train dataloader; pass lr= explicitly "
                "instead of relying on base_lr x batch / 256"
            )
        return int(batch) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        cfg = self.optim_config
        total_steps = int(self.trainer.estimated_stepping_batches)  # loads the train dataloader
        lr = cfg["lr"] if cfg["lr"] is not None else scaled_lr(cfg["base_lr"], self.global_batch_size())
        max_epochs = self.trainer.max_epochs
        steps_per_epoch = total_steps / max_epochs if max_epochs and max_epochs > 0 else total_steps
        warmup_steps = int(round(cfg["warmup_epochs"] * steps_per_epoch))
        groups = split_weight_decay([self], cfg["weight_decay"])
        optimizer = build_optimizer(cfg["optimizer"], groups, lr=lr, momentum=cfg["momentum"], fused=cfg["fused"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, total_steps, warmup_steps, cfg["schedule"])
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
