"""The ``lightning-ssl`` command: LightningCLI over every method and datamodule.

    lightning-ssl fit --config configs/quickstart.yaml
    lightning-ssl fit --config configs/simclr_cifar10.yaml --trainer.max_epochs 10
    lightning-ssl fit --config configs/simclr_cifar10.yaml --ckpt_path last     # resume
    lightning-ssl fit --model MoCoV2 --help      # every argument of a method, with its default
    lightning-ssl validate --config ... --ckpt_path last   # kNN top-1 of the checkpoint's encoder
    lightning-ssl predict --config ... --ckpt_path last    # embeddings to <default_root_dir>/embeddings.pt
    lightning-ssl export CKPT OUT.pt             # encoder as a torchvision state_dict
    lightning-ssl speaker-eval CKPT ROOT [--trials FILE]   # CPCAudio: EER and minDCF (e.g. VoxCeleb1-O)
    lightning-ssl prepare image-folder ROOT OUT  # a dataset tree as litdata shards (train with shards=OUT)

``--model`` takes any ``SSLMethod`` subclass (every entry of ``lightning_ssl.REGISTRY``) and ``--data``
any ``LightningDataModule`` (``lightning_ssl.datamodules.*`` are registered by their short names).

Under ``torchrun``, ``fabric run`` or SLURM ``srun`` the trainer's ``devices`` and ``num_nodes``
(and ``fabric run``'s accelerator/strategy/precision) are taken from the launcher's environment
(``lightning_ssl.distributed.launcher_trainer_flags``), so the same config runs unchanged.

A configuration error ends with a one-paragraph message (no traceback; set ``LIGHTNING_SSL_DEBUG=1``
to see it) and exit status 1; a run stopped by SIGTERM/SIGUSR1 ends with status 143 after its
checkpoint is written.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentParser
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import lightning_ssl.datamodules  # noqa: F401  (registers the datamodules for short class names)
import lightning_ssl.methods
from lightning_ssl.callbacks import DivergenceError, Preempted
from lightning_ssl.checkpoints import method_mismatch, read_checkpoint
from lightning_ssl.datamodules.audio import AudioFolder
from lightning_ssl.datamodules.prepare import prepare_main
from lightning_ssl.distributed import launcher_trainer_flags
from lightning_ssl.evaluation.export import export_main, load_encoder
from lightning_ssl.evaluation.speaker import (
    make_trials,
    read_trials,
    speaker_id_accuracy,
    split_per_speaker,
    utterance_embeddings,
    verification_metrics,
)
from lightning_ssl.global_batch_norm import GlobalBatchNormSync
from lightning_ssl.methods import SSLMethod
from lightning_ssl.methods.base import checkpoint_method

__all__ = ["main", "SSLCLI", "speaker_eval_main"]

# errors that describe the user's configuration or data: a message is enough, no traceback
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, DivergenceError)
USER_ERRORS += (MisconfigurationException,)


class _Parser(LightningArgumentParser):
    """Parse errors as one message and a pointer to ``--help`` (no 50-line usage block)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("LIGHTNING_SSL_DEBUG") or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser: ArgumentParser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {short_message(message)}\nRun '{prog} --help' for the accepted options.\n")
        self.exit(2)


def short_message(message: str) -> str:
    """jsonargparse's message about a subclass option or constructor error, without the Union bookkeeping
    (the other union member is ``None``), with close matches for a misspelled option."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    first = re.search(r"Errors:\s*- (.*?)(?:\n\s*- Expected a <class 'NoneType'>|\Z)", message, re.S)
    problem = " ".join(first.group(1).split()) if first else message
    given = re.search(r"Problem with given class_path '([\w.]+)':\s*(.*)", problem)
    if not given:
        return problem
    class_path, problem = given.group(1), given.group(2)
    option = re.search(r"Option '(\w+)' is not accepted", problem)
    if option:
        close = difflib.get_close_matches(option.group(1), sorted(accepted_arguments(class_path)), n=3)
        if close:
            problem += f" (did you mean {' or '.join(close)}?)"
    return f"{class_path}: {problem}"


def accepted_arguments(class_path: str) -> set[str]:
    """Constructor arguments of a class, those its ``**kwargs`` pass on to its bases included."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return set()
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters)
    return names - {"self", "args", "kwargs"}


class LoggedConfig(SaveConfigCallback):
    """Writes ``config.yaml`` next to the logs, as LightningCLI does, and sends the whole resolved config
    (model, data, trainer, seed) to every logger's run configuration (W&B's config, TensorBoard's hparams)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class SSLCLI(LightningCLI):
    """LightningCLI with the methods as subclasses of ``SSLMethod`` and the subcommands an SSL run has."""

    trainer_instance: pl.Trainer | None = None  # of the current invocation (for cleanup after an error)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_class", _Parser)
        kwargs.setdefault("parser_kwargs", {"prog": "lightning-ssl"})  # also under `python -m lightning_ssl`
        kwargs.setdefault("save_config_callback", LoggedConfig)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # fit trains; validate reports kNN top-1; predict writes embeddings. No `test`: an SSL method has
        # no labeled test split of its own (validate scores the datamodule's held-out split).
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
            "predict": {"model", "dataloaders", "datamodule"},
        }

    def before_instantiate_classes(self) -> None:
        # The launcher decides how many processes run where; the config's values would only conflict.
        config = self.config[self.subcommand] if self.subcommand else self.config
        for flag, value in launcher_trainer_flags().items():
            config.trainer[flag] = value

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        SSLCLI.trainer_instance = super().instantiate_trainer(**kwargs)
        return SSLCLI.trainer_instance

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        # Lightning's sync_batchnorm is torch's SyncBatchNorm, GPUs only: elsewhere, the same global
        # statistics from GlobalBatchNorm (lightning_ssl/global_batch_norm.py)
        if config.get("sync_batchnorm") and not _on_gpus(config.get("accelerator")):
            plugins = config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
            config = {**config, "sync_batchnorm": False, "plugins": [*plugins, GlobalBatchNormSync()]}
        return super()._instantiate_trainer(config, callbacks)

    def _config_model_class(self) -> type | None:
        model = self.config[self.config.subcommand].get("model")
        path = getattr(model, "class_path", None)
        if not isinstance(path, str) or "." not in path:
            return None
        module, _, name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the config's model by the one the checkpoint names: a BYOL checkpoint
        # given to a SimCLR config would silently train BYOL into the SimCLR run's folder. Stop first.
        if self.config.get("subcommand"):
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            if ckpt_path and Path(ckpt_path).is_file():
                _check_checkpoint_method(ckpt_path, self._config_model_class())
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        # "last"/"hpc"/"best" name a file only once the trainer exists: check it before anything is written
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if isinstance(ckpt_path, str) and not Path(ckpt_path).is_file():
            try:
                resolved = self.trainer._checkpoint_connector._parse_ckpt_path(
                    TrainerFn(subcommand), ckpt_path, model_provided=True, model_connected=False
                )
            except (AttributeError, TypeError, ValueError):
                resolved = None  # Lightning reports an unknown or unavailable value itself
            if resolved and Path(resolved).is_file():
                _check_checkpoint_method(resolved, type(self.model))
        super()._run_subcommand(subcommand)


def _on_gpus(accelerator) -> bool:
    if isinstance(accelerator, str):
        return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return accelerator is not None and "cuda" in type(accelerator).__name__.lower()


def _check_checkpoint_method(ckpt_path: str | Path, model: type | None) -> None:
    """Raise (one line) when ``ckpt_path`` cannot be read or was written by another method than ``model``."""
    ckpt = read_checkpoint(ckpt_path)
    if model is not None and isinstance(model, type) and issubclass(model, SSLMethod):
        message = method_mismatch(ckpt_path, checkpoint_method(ckpt), model)
        if message:
            raise TypeError(message)


def _check_named_method(ckpt_path: str, name: str) -> None:
    """``export --model NAME``: stop (one line) when ``ckpt_path`` is not a checkpoint of method ``NAME``."""
    model = getattr(lightning_ssl.methods, name.rpartition(".")[2], None)
    if not isinstance(model, type) or not issubclass(model, SSLMethod):
        raise ValueError(f"--model {name} is not a method of lightning_ssl (e.g. SimCLR, BYOL, DINO)")
    _check_checkpoint_method(ckpt_path, model)


def _remove_empty_log_dir(trainer: pl.Trainer | None) -> None:
    """A failed run leaves no ``version_N`` folder holding only its config."""
    logger = getattr(trainer, "logger", None)
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    if not log_dir or not Path(log_dir).is_dir():
        return
    if all(p.name in ("config.yaml", "hparams.yaml") for p in Path(log_dir).iterdir()):
        shutil.rmtree(log_dir, ignore_errors=True)


def speaker_eval_main(argv: list[str]) -> dict[str, float]:
    """``lightning-ssl speaker-eval CKPT ROOT``: speaker verification (EER, minDCF) of a ``CPCAudio``
    checkpoint's utterance embeddings on the speaker folders of ``ROOT``, with the trials of a list
    file (VoxCeleb1-O: ``ROOT`` is VoxCeleb1's test ``wav`` folder, ``--trials`` its ``veri_test2.txt``)
    or every pair of ``ROOT``'s utterances; ``--speaker-id`` adds the linear speaker-ID probe."""
    parser = argparse.ArgumentParser(
        prog="lightning-ssl speaker-eval", description="Speaker verification (EER, minDCF) of a CPCAudio checkpoint"
    )
    parser.add_argument("checkpoint", help="Lightning checkpoint of CPCAudio")
    parser.add_argument("root", help="folder of speaker folders holding the evaluation utterances")
    parser.add_argument("--trials", help="trial list, lines '<0|1> <path1> <path2>' relative to ROOT (VoxCeleb1-O)")
    parser.add_argument("--center-root", help="training audio whose mean embedding is subtracted before scoring")
    parser.add_argument("--crop", type=int, default=None, help="centered window in samples (default: whole files)")
    parser.add_argument("--max-trials", type=int, default=None, help="without --trials: sample this many pairs")
    parser.add_argument("--p-target", type=float, default=0.01)
    parser.add_argument("--speaker-id", action="store_true", help="also the linear speaker-ID probe")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    encoder, _ = load_encoder(args.checkpoint)
    encoder = encoder.to(args.device).eval()

    def embed(root: str):
        data = AudioFolder(root, crop_samples=args.crop, random_crop=False)
        loader = torch.utils.data.DataLoader(data, batch_size=1 if args.crop is None else 32)
        return (*utterance_embeddings(encoder, loader, args.device), data)

    x, labels, data = embed(args.root)
    trials = read_trials(args.trials, data.relative_paths) if args.trials else make_trials(labels, args.max_trials)
    center = embed(args.center_root)[0].mean(0) if args.center_root else None
    results = verification_metrics(x, trials, center=center, p_target=args.p_target)
    if args.speaker_id:
        train, test = split_per_speaker(labels)
        results["speaker_id"] = speaker_id_accuracy(x[train], labels[train], x[test], labels[test])
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()), flush=True)
    return results


def _quiet_lightning_tips() -> None:
    """Drops pytorch-lightning's advertisements ("💡 Tip: ... try installing litlogger") from the terminal."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(getattr(f, "lightning_ssl_tips", False) for f in logger.filters):
        tip_filter = logging.Filter()
        tip_filter.filter = lambda record: not str(record.msg).startswith("💡 Tip")
        tip_filter.lightning_ssl_tips = True
        logger.addFilter(tip_filter)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    try:
        _run(argv, args)
    except Preempted as stop:
        sys.stderr.write(f"lightning-ssl: stopped by a signal; checkpoint {stop.path}. Resume with --ckpt_path last\n")
        raise
    except USER_ERRORS as err:
        _remove_empty_log_dir(SSLCLI.trainer_instance)
        if os.environ.get("LIGHTNING_SSL_DEBUG"):
            raise
        message = short_message(str(err)).strip()
        sys.stderr.write(f"lightning-ssl: error: {message}\n(set LIGHTNING_SSL_DEBUG=1 to see the traceback)\n")
        sys.exit(1)


def _run(argv: list[str], args: list[str] | None) -> None:
    SSLCLI.trainer_instance = None
    if argv[:1] == ["export"]:
        export_main(argv[1:], check_model=_check_named_method)
        return
    if argv[:1] == ["speaker-eval"]:
        speaker_eval_main(argv[1:])
        return
    if argv[:1] == ["prepare"]:
        prepare_main(argv[1:])
        return
    _quiet_lightning_tips()
    if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv):
        # resuming writes into the run's own checkpoint folder, which is meant to be non-empty
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    SSLCLI(
        SSLMethod,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
