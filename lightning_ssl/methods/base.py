"""What every method shares: the backbone, the representation used for evaluation, and the
optimizer with its warmup/cosine (or step) schedule, scaled by the global batch size.

A method subclasses ``SSLMethod``, declares its own arguments with the paper's defaults (and the
shared ones whose paper default differs from the base's), passes the rest on with ``**kwargs``,
builds its heads and writes its own ``training_step`` on batches ``(views, target)`` where ``views``
is a list of image tensors (the target is ignored). ``lightning-ssl fit --model <Method> --help``
lists every argument, its own and the shared ones, with its default.
"""

from __future__ import annotations

import importlib
import io
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import nn

from lightning_ssl.backbones import build_backbone, reset_parameters, vit_depth, vit_parameter_groups
from lightning_ssl.callbacks import (
    DivergenceGuard,
    EmbeddingWriter,
    PreemptionCheckpoint,
    RunSummary,
    SSLProgressBar,
    ViewGridLogger,
)
from lightning_ssl.checkpoints import read_checkpoint
from lightning_ssl.contracts import HasEMATargets, LabeledDataModule, require
from lightning_ssl.evaluation.baselines import calibrate_norm_statistics
from lightning_ssl.evaluation.knn import extract_features, knn_accuracy
from lightning_ssl.mask_sampling import MaskSampler
from lightning_ssl.optim import (
    LR_SCALING,
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    lr_lambda,
    scaled_lr,
    split_weight_decay,
)
from lightning_ssl.rng import capture_rng_states, restore_rng_states

# validation_step serves `lightning-ssl validate` (kNN); a fit without a validation loader is the normal case
warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
# pytorch-lightning's own use of a deprecated torch.utils._pytree API, printed at every fit; nothing a user can act on
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

__all__ = ["SSLMethod", "checkpoint_method", "VIEW_BATCHING"]

VIEW_BATCHING = ("auto", "concat", "per_view")

# Names of earlier releases: EMA copies were `*_momentum` (MoCo) and `*_target` (BYOL); the EMA rate was
# `momentum_tau` (MoCo) and `tau_base`/`tau_final` (BYOL); MoCo chose its head with `version`.
_LEGACY_STATE_PREFIXES = {
    "backbone_momentum.": "backbone_ema.",
    "projector_momentum.": "projector_ema.",
    "backbone_target.": "backbone_ema.",
    "projector_target.": "projector_ema.",
}
_LEGACY_HPARAMS = {"momentum_tau": "ema_tau", "tau_base": "ema_tau", "tau_final": "ema_tau_final"}


def _rename_legacy_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: checkpoints with the EMA copies' earlier names still load."""
    for key in list(state_dict):
        for old, new in _LEGACY_STATE_PREFIXES.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)


def checkpoint_method(checkpoint: dict) -> type[SSLMethod] | None:
    """The method class that wrote ``checkpoint`` (``None`` when it does not say)."""
    path = checkpoint.get("method") or (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, SSLMethod) else None


def _migrate_hparams(hparams: dict) -> dict:
    """Hyperparameters of an earlier release with today's names."""
    hparams = {_LEGACY_HPARAMS.get(k, k): v for k, v in hparams.items()}
    version = hparams.pop("version", None)
    if version == 1:
        hparams["projection_hidden_dim"] = None  # MoCo v1's linear head
    return hparams


class SSLMethod(pl.LightningModule):
    """Base class of the methods: the arguments every method shares.

    Args:
        backbone: torchvision model name or ``nn.Module`` (see ``build_backbone``). A module is not a
            hyperparameter: pass it again to ``load_from_checkpoint``.
        small_image: CIFAR stem for 32x32 inputs.
        optimizer: ``lars``, ``sgd`` or ``adamw``.
        base_lr: the learning rate before scaling by the global batch ``B = batch size x processes x
            gradient accumulation``: the peak lr is ``base_lr * B / 256`` (``lr_scaling="linear"``) or
            ``base_lr * sqrt(B)`` (``"sqrt"``).
        lr: the peak learning rate itself, overriding the scaling rule when given.
        lr_scaling: ``linear`` (Goyal et al. 2017; the methods' papers) or ``sqrt`` (SimCLR, Chen et al.
            2020, appendix B.1, recommended for small batches with ``base_lr=0.075``).
        weight_decay: applied to weights only; biases and norm parameters are excluded (a method may
            override ``parameter_groups``: MoCo decays every parameter).
        momentum: the optimizer's (SGD/LARS) momentum.
        lars_eta: LARS's trust coefficient (SimCLR and BYOL: 0.001).
        lars_clip: clip LARS's per-layer lr at the global lr (solo-learn's ``clip_lr``; off in the papers).
        warmup_epochs: linear warmup length (fractions allowed).
        schedule: ``cosine``, ``step`` (x0.1 at 60% and 80%) or ``constant``.
        final_lr: where the cosine ends, as a learning rate (SwAV's ``final_lr``, DINO's ``min_lr``), scaled
            with the peak lr by the global batch like ``base_lr`` (so ``final_lr / base_lr`` is kept); 0 by default.
        layer_decay: ViT backbones only: layer-wise lr decay (``backbones.vit_parameter_groups``; 1.0, the
            default, is none). ViTs' position embeddings and class token get no weight decay.

    Fast-path options (none changes what is computed; see ``docs/performance.md``):
        channels_last: keep 4-d weights (hence conv activations) in NHWC memory format, applied in
            ``setup``; faster convolutions with tensor cores and oneDNN.
        compile_backbone: ``torch.compile`` the backbone (and its EMA copy) in place, in ``setup``;
            the state_dict keys are unchanged.
        fused_optimizer: one fused kernel per parameter group for the optimizer step (``fused=True``
            for SGD/AdamW; LARS scales the gradients by the trust ratio with foreach ops, then takes a
            fused SGD step). Off: foreach (multi-tensor) steps, LARS included.
        view_batching: how a network sees several views of a batch (``forward_views``): ``"concat"``, one
            forward over the concatenated views (batch norm's statistics over all the views, the papers'
            form); ``"per_view"``, one forward per view (statistics per view); ``"auto"``, ``per_view`` on
            the CPU (measured faster there: the concatenated batch falls out of cache) and ``concat`` on
            accelerators.
    Mixed precision is the Trainer's ``precision="bf16-mixed"``; the losses compute in float32.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        small_image: bool = False,
        optimizer: str = "sgd",
        base_lr: float = 0.1,
        lr: float | None = None,
        lr_scaling: str = "linear",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lars_eta: float = 0.001,
        lars_clip: bool = False,
        warmup_epochs: float = 0.0,
        schedule: str = "cosine",
        final_lr: float = 0.0,
        channels_last: bool = False,
        compile_backbone: bool = False,
        fused_optimizer: bool = False,
        view_batching: str = "auto",
        layer_decay: float = 1.0,
    ):
        super().__init__()
        # Collects the arguments of every __init__ of the class chain (a thin variant passes its
        # parents' arguments on through **kwargs), so ``type(self)(**hparams)`` rebuilds the model;
        # under LightningCLI the config's values and ``_class_path`` are kept as they are.
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
        if not base_lr > 0:
            raise ValueError(f"base_lr must be positive, got {base_lr} (the lr for a global batch of 256)")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0 or warmup_epochs < 0:
            raise ValueError(f"weight_decay and warmup_epochs must be >= 0, got {weight_decay} and {warmup_epochs}")
        peak = lr if lr is not None else base_lr
        if not 0 <= final_lr <= peak:
            name = "lr" if lr is not None else "base_lr"
            raise ValueError(f"final_lr must lie in [0, {name}={peak}], got {final_lr}")
        if lr_scaling not in LR_SCALING:
            raise ValueError(f"lr_scaling must be one of {', '.join(LR_SCALING)}; got {lr_scaling!r}")
        if lars_eta <= 0:
            raise ValueError(f"lars_eta must be positive, got {lars_eta}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
        if view_batching not in VIEW_BATCHING:
            raise ValueError(f"view_batching must be one of {', '.join(VIEW_BATCHING)}; got {view_batching!r}")
        self.view_batching = view_batching
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
        self.layer_decay = layer_decay
        self.backbone, self.feature_dim = self.build_encoder(backbone, small_image)
        self.small_image = small_image
        self.optim_config = dict(
            optimizer=optimizer,
            base_lr=base_lr,
            lr=lr,
            lr_scaling=lr_scaling,
            weight_decay=weight_decay,
            momentum=momentum,
            lars_eta=lars_eta,
            lars_clip=lars_clip,
            warmup_epochs=warmup_epochs,
            schedule=schedule,
            final_lr=final_lr,
            fused=fused_optimizer,
        )
        self.channels_last, self.compile_backbone = channels_last, compile_backbone
        self._compiled = False
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    # A named ResNet starts with zero-initialized residual batch norms (build_backbone); methods whose
    # reference code builds it so set this (SimSiam, Barlow Twins, VICReg)
    zero_init_residual: bool = False

    def build_encoder(self, backbone: str | nn.Module, small_image: bool) -> tuple[nn.Module, int]:
        """``(module, feature_dim)`` for the ``backbone`` argument: a torchvision image encoder
        (``build_backbone``). A method on another modality (``CPCAudio``) overrides it; it runs in
        ``__init__`` after ``save_hyperparameters``, so ``self.hparams`` holds every argument."""
        return build_backbone(backbone, small_image=small_image, zero_init_residual_bn=self.zero_init_residual)

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ):
        """``LightningModule.load_from_checkpoint``, plus: ``SSLMethod.load_from_checkpoint(path)`` builds
        whichever method wrote the checkpoint; a checkpoint of another method is a clear error; checkpoints
        of earlier releases are migrated to today's argument names."""
        if isinstance(checkpoint_path, (str, Path)):
            checkpoint = read_checkpoint(checkpoint_path)
        else:
            checkpoint = torch.load(checkpoint_path, map_location=map_location or "cpu", weights_only=False)
        method = checkpoint_method(checkpoint)
        if cls is SSLMethod and method is None:
            raise ValueError(f"{checkpoint_path} does not say which method wrote it: load it with that class")
        if cls is SSLMethod:
            cls = method
        elif method is not None and not issubclass(method, cls):
            raise TypeError(
                f"{checkpoint_path} is a checkpoint of {method.__name__}, not of {cls.__name__}: load it with "
                f"{method.__name__}.load_from_checkpoint(...) or SSLMethod.load_from_checkpoint(...)"
            )
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            checkpoint["hyper_parameters"] = _migrate_hparams(hparams)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        # super(SSLMethod, cls): cls may have become the subclass named by the checkpoint
        return super(SSLMethod, cls).load_from_checkpoint(  # noqa: UP008
            buffer, map_location, hparams_file, strict, **kwargs
        )

    # ------------------------------------------------------------------- fast path
    def setup(self, stage: str) -> None:
        """Apply ``channels_last`` and ``compile_backbone`` once every submodule exists (EMA copies included);
        every process takes rank 0's mask seeds (``MaskSampler``: masked methods draw the same masks on any
        number of processes)."""
        for module in self.modules():
            if isinstance(module, MaskSampler):
                module.broadcast()
        if self.channels_last:
            # Weights in NHWC make every convolution (and the BN/ReLU after it) run channels-last;
            # the first convolution converts the NCHW input itself.
            self.to(memory_format=torch.channels_last)
        if self.compile_backbone and not self._compiled:
            for module in self.backbone_modules():
                module.compile()  # in place: parameter names (checkpoint keys) do not change
            self._compiled = True

    def backbone_modules(self) -> list[nn.Module]:
        """The backbone and its EMA copy (from ``ema_pairs``), if the method has one."""
        modules = [self.backbone]
        if isinstance(self, HasEMATargets):
            modules += [target for online, target in self.ema_pairs() if online is self.backbone]
        return modules

    def _view_mode(self, views: list[torch.Tensor]) -> str:
        if self.view_batching == "auto":
            return "per_view" if views[0].device.type == "cpu" else "concat"
        return self.view_batching

    def forward_crops(self, backbone: nn.Module, head: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Multi-crop (SwAV, DINO): ``backbone`` through ``forward_views`` (one pass per resolution for
        ``"concat"``), then ``head`` once on the features of all crops concatenated, so a head with batch
        norm normalizes over every crop, as the reference codes' ``forward_head`` (SwAV's ``resnet50.py``,
        DINO's ``MultiCropWrapper``); per view for ``"per_view"``."""
        features = self.forward_views(backbone, views)
        if self._view_mode(views) == "per_view" or len(views) == 1:
            return [head(f) for f in features]
        return list(head(torch.cat(features)).split([f.shape[0] for f in features]))

    def forward_views(self, network: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """``network`` applied to each view, as ``view_batching`` says (views of one size are concatenated
        for ``"concat"``; views of other sizes, as multi-crop makes, get their own forward)."""
        mode = self._view_mode(views)
        if mode == "per_view" or len(views) == 1:
            return [network(v) for v in views]
        outputs: list[torch.Tensor | None] = [None] * len(views)
        start = 0
        while start < len(views):  # runs of consecutive views of one shape
            end = start + 1
            while end < len(views) and views[end].shape[1:] == views[start].shape[1:]:
                end += 1
            for i, out in zip(range(start, end), network(torch.cat(views[start:end])).chunk(end - start)):
                outputs[i] = out
            start = end
        return outputs

    # ----------------------------------------------------------------- representation
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen-encoder representation (kNN, linear probe): ``representation`` run with every
        submodule in eval mode, so batch norm uses its running statistics and no module state changes;
        each submodule's mode is restored afterwards. Gradients flow as usual (wrap in ``torch.no_grad()``)."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            return self.representation(images)
        finally:
            for module, mode in modes:
                module.training = mode

    def representation(self, images: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """Features of ``images`` from this method's backbone, or from ``backbone`` of the same architecture."""
        return (self.backbone if backbone is None else backbone)(images)

    def encoder_spec(self) -> dict:
        """How ``lightning_ssl.evaluation.load_encoder`` rebuilds this method's evaluation encoder from a
        checkpoint (``on_save_checkpoint`` stores it): the torchvision backbone name (``None`` for a
        module), its stem, layer norm in place of batch norm, and CPC's patch grid."""
        name = self.hparams.get("backbone")
        return {
            "backbone": name if isinstance(name, str) else None,
            "small_image": self.small_image,
            "layer_norm": False,
            "patch_grid": None,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["method"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["encoder_spec"] = self.encoder_spec()
        checkpoint["rng_states"] = capture_rng_states()  # every process's (a collective under DDP)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        method = checkpoint_method(checkpoint)
        if method is not None and not isinstance(self, method):
            raise TypeError(
                f"the checkpoint was written by {method.__name__}, but the model is {type(self).__name__}: "
                f"use --model {method.__name__} (or {method.__name__}(...)) to resume it"
            )
        # Restored before the training loop draws anything, so the resumed run continues the
        # uninterrupted run's random streams (MoCo's shuffle, CPC's patch crops, device augmentation).
        # Only when a fit resumes: loading weights (load_from_checkpoint) leaves the generators alone.
        if self._trainer is not None and self.trainer.state.fn == "fit":
            restore_rng_states(checkpoint.get("rng_states", []))

    def prepare_backbone(self, module: nn.Module) -> nn.Module:
        """The method's own changes to a freshly built backbone, in place (none here; MAE's initialization and
        fixed sin-cos positions, MoCo v3's frozen patch projection, ...). A method applies it to its backbone in
        ``__init__``; ``random_init_backbone`` applies it too, so the random-init baseline starts where training
        started."""
        return module

    def random_init_backbone(
        self, seed: int = 0, calibrate_on: Iterable | None = None, max_images: int | None = 5000
    ) -> nn.Module:
        """A freshly initialized backbone of the same architecture, through ``prepare_backbone`` (the random-init
        baseline). With
        ``calibrate_on`` (a loader of ``(images, labels)``, e.g. un-augmented training images), its batch-norm
        statistics are recomputed on up to ``max_images`` of them through this method's representation, with
        no weight change (``lightning_ssl.evaluation.calibrate_norm_statistics``): the honest baseline."""
        name = self.hparams.get("backbone")
        with torch.random.fork_rng(devices=[]):  # the global streams are left as they were
            torch.manual_seed(seed)
            if isinstance(name, str):
                module, _ = build_backbone(
                    name, small_image=self.small_image, zero_init_residual_bn=self.zero_init_residual
                )
            else:
                module = reset_parameters(self.backbone, seed)
            module = self.prepare_backbone(module).to(self.device, self.dtype)
        if calibrate_on is not None:
            encode = lambda x: self.representation(x, backbone=module)  # noqa: E731
            calibrate_norm_statistics(module, calibrate_on, encode, max_images, self.device)
        return module

    # ------------------------------------------------------------------ optimization
    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes: batch x processes x accumulation."""
        if self.trainer.train_dataloader is None:  # not loaded yet (e.g. max_epochs=-1)
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

    def configure_callbacks(self) -> list[pl.Callback]:
        """The callbacks every run needs, unless the trainer has its own of the same kind: a
        ``DivergenceGuard`` (stop at a non-finite loss), a ``PreemptionCheckpoint`` (checkpoint and exit
        143 on SIGTERM/SIGUSR1), a ``ViewGridLogger`` (the augmented views, to the loggers), a ``RunSummary``
        (the run's settings to the loggers, and what ran and where it is at the end), an ``SSLProgressBar``
        in place of Lightning's default bar, and, for ``predict``, an ``EmbeddingWriter``. Methods add
        theirs (EMA, queue) to this list."""
        if self._trainer is None:
            return []
        trainer = self.trainer
        have = {type(c) for c in trainer.callbacks}
        defaults: list[pl.Callback] = [DivergenceGuard(), PreemptionCheckpoint(), ViewGridLogger(), RunSummary()]
        if trainer.state.fn == "predict":
            defaults.append(EmbeddingWriter())
        if type(trainer.progress_bar_callback) is TQDMProgressBar:  # Lightning's default: ours shows the loss
            defaults.append(SSLProgressBar(refresh_rate=trainer.progress_bar_callback.refresh_rate))
        return [c for c in defaults if not any(issubclass(h, type(c)) for h in have)]

    def on_train_start(self) -> None:
        # configure_optimizers loads the train dataloader (the schedule needs its length) before Lightning
        # restores the loops, so Lightning's own setup_data never hands a resumed loader its position;
        # hand it over here, before the first batch (ResumableDataLoader creates its iterator lazily).
        self.trainer.fit_loop._load_combined_loader_states()

    def check_training_data(self) -> None:
        """Fail early, with what to do, when the training data cannot train this method."""
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        batch = getattr(loader, "batch_size", None)
        if size == 0:
            raise ValueError("the training set is empty: check the dataset path and its layout")
        if self.trainer.num_training_batches == 0:
            raise ValueError(
                f"the training set has {size} image(s), fewer than one batch of {batch} with drop_last=True: "
                "use a smaller batch_size (or more data)"
            )
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())
        if batch == 1 or (size is not None and batch and not getattr(loader, "drop_last", True) and size % batch == 1):
            where = "every batch" if batch == 1 else "the last batch of every epoch"
            raise ValueError(
                f"{where} holds a single image ({size} images, batch {batch}): contrastive and batch-statistics "
                f"losses need at least 2{' and batch norm fails' if has_bn else ''}; "
                "use batch_size >= 2 and drop_last=True"
            )

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of the training loader (whatever max_steps/max_epochs say)."""
        batches = self.trainer.num_training_batches
        if batches == float("inf"):  # an iterable of unknown length: the epoch is the run
            return int(self.trainer.estimated_stepping_batches)
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def configure_optimizers(self):
        cfg = self.optim_config
        if self.trainer.train_dataloader is None:  # estimated_stepping_batches skips it when max_epochs=-1
            self.trainer.fit_loop.setup_data()
        total_steps = int(self.trainer.estimated_stepping_batches)
        self.check_training_data()
        batch = self.global_batch_size() if cfg["lr"] is None else None
        warmup_steps = int(round(cfg["warmup_epochs"] * self.steps_per_epoch()))
        optimizer, scheduler = self.optimizer_and_schedule(batch, total_steps, warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_and_schedule(
        self, global_batch_size: int | None, total_steps: int, warmup_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The optimizer over ``parameter_groups`` and its per-step schedule (what ``configure_optimizers``
        returns, usable outside a Trainer): the peak lr is ``lr``, or ``base_lr`` scaled to the global
        batch; each group's own ``lr_scale``; ``fixed_lr`` groups keep their lr."""
        cfg = self.optim_config
        lr = cfg["lr"] if cfg["lr"] is not None else scaled_lr(cfg["base_lr"], global_batch_size, cfg["lr_scaling"])
        groups = [g for g in self.parameter_groups(cfg["weight_decay"]) if g["params"]]
        for group in groups:  # a group's own peak lr: the scaled lr times its lr_scale
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer = build_optimizer(
            cfg["optimizer"],
            groups,
            lr=lr,
            momentum=cfg["momentum"],
            fused=cfg["fused"],
            lars_eta=cfg["lars_eta"],
            lars_clip=cfg["lars_clip"],
        )
        # LambdaLR keeps a multiplier per group (scheduler checkpoints store no functions, only the step)
        final = cfg["final_lr"] / (cfg["lr"] if cfg["lr"] is not None else cfg["base_lr"])
        scheduled = lambda step: lr_lambda(step, total_steps, warmup_steps, cfg["schedule"], final)  # noqa: E731
        lambdas = [(lambda step: 1.0) if g.get("fixed_lr") else scheduled for g in groups]
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """The optimizer's parameter groups; a method overrides this to treat some parameters apart.

        Each group is a dict with ``params`` and ``weight_decay``, and optionally ``lars_exclude`` (no
        LARS trust ratio), ``lr_scale`` (its peak lr is the method's lr times this) and ``fixed_lr``
        (no warmup or decay: SimSiam's predictor). The default: weights with decay; biases and norm
        parameters without decay or LARS adaptation (the LARS papers' and SimCLR's choice); with a ViT
        backbone, also position embeddings and class token, and layer-wise lr decay (``layer_decay``).
        """
        if vit_depth(self.backbone) is not None:
            return vit_parameter_groups(self, self.backbone, weight_decay, self.layer_decay)
        return split_weight_decay([self], weight_decay)

    # ------------------------------------------------------------------ validate / predict
    def on_validation_epoch_start(self) -> None:
        """``lightning-ssl validate`` (``trainer.validate``): weighted kNN of the validation images against
        the datamodule's labeled training images (the bank is encoded here, sharded over processes)."""
        require(self.trainer.datamodule, LabeledDataModule, "validate", "a datamodule with labeled_dataloader()")
        bank = self.trainer.datamodule.labeled_dataloader("train")
        self._knn_bank = extract_features(self.representation, bank, self.device)
        self._val_features: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self._val_features.append(self.representation(images).float())
        self._val_labels.append(torch.as_tensor(labels, device=self.device))

    def on_validation_epoch_end(self) -> None:
        features, labels = torch.cat(self._val_features), torch.cat(self._val_labels)
        if self.trainer.world_size > 1:
            features = self.all_gather(features).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        scores = knn_accuracy(*self._knn_bank, features.cpu(), labels.cpu())
        self.log("val/knn_top1", scores["all"], sync_dist=False)
        self._knn_bank, self._val_features, self._val_labels = None, [], []

    def predict_step(self, batch, batch_idx):
        """``lightning-ssl predict`` (``trainer.predict``): the representation of every image of the
        datamodule's predict split, returned with its label (``EmbeddingWriter`` saves them)."""
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        return {"features": self(images).float().cpu(), "labels": None if labels is None else torch.as_tensor(labels)}
