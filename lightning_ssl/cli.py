"""The ``lightning-ssl`` command: LightningCLI over every method and datamodule.

    lightning-ssl fit --config configs/quickstart.yaml
    lightning-ssl fit --config configs/simclr_cifar10.yaml --trainer.max_epochs 10
    lightning-ssl fit --config configs/simclr_cifar10.yaml --ckpt_path last     # resume
    lightning-ssl fit --model MoCoV2 --help      # every argument of a method, with its default
    lightning-ssl validate --config ... --ckpt_path last   # kNN top-1 of the checkpoint's encoder
    lightning-ssl predict --config ... --ckpt_path last    # embeddings to <default_root_dir>/embeddings.pt
    lightning-ssl export CKPT OUT.pt             # encoder as a torchvision state_dict

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

import difflib
import importlib
import inspect
import os
import re
import shutil
import sys
from pathlib import Path

import pytorch_lightning as pl
import yaml
from jsonargparse import ArgumentParser
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import lightning_ssl.datamodules  # noqa: F401  (registers the datamodules for short class names)
from lightning_ssl.callbacks import DivergenceError, Preempted
from lightning_ssl.distributed import launcher_trainer_flags
from lightning_ssl.evaluation.export import export_main
from lightning_ssl.methods import SSLMethod

__all__ = ["main", "SSLCLI"]

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


def _remove_empty_log_dir(trainer: pl.Trainer | None) -> None:
    """A failed run leaves no ``version_N`` folder holding only its config."""
    logger = getattr(trainer, "logger", None)
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    if not log_dir or not Path(log_dir).is_dir():
        return
    if all(p.name in ("config.yaml", "hparams.yaml") for p in Path(log_dir).iterdir()):
        shutil.rmtree(log_dir, ignore_errors=True)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    SSLCLI.trainer_instance = None
    try:
        SSLCLI(
            SSLMethod,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
        )
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


if __name__ == "__main__":
    main()
