"""The ``lightning-ssl`` command: LightningCLI over every method and datamodule.

    lightning-ssl fit --config configs/quickstart.yaml
    lightning-ssl fit --config configs/simclr_cifar10.yaml --trainer.max_epochs 10
    lightning-ssl fit --model MoCoV2 --help      # every argument of a method, with its default
    lightning-ssl export CKPT OUT.pt             # encoder as a torchvision state_dict

``--model`` takes any ``SSLMethod`` subclass (``lightning_ssl.SimCLR``, ``MoCo``, ``MoCoV2``,
``BYOL``, ``CPC``, ``CPCv2``; every entry of ``lightning_ssl.REGISTRY``) and ``--data`` any
``LightningDataModule`` (``lightning_ssl.datamodules.*`` are registered by their short names).

Under ``torchrun``, ``fabric run`` or SLURM ``srun`` the trainer's ``devices`` and ``num_nodes``
(and ``fabric run``'s accelerator/strategy/precision) are taken from the launcher's environment
(``lightning_ssl.distributed.launcher_trainer_flags``), so the same config runs unchanged.
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

import lightning_ssl.callbacks  # noqa: F401  (registers the callbacks for short class names)
import lightning_ssl.datamodules  # noqa: F401  (registers the datamodules for short class names)
from lightning_ssl.distributed import launcher_trainer_flags
from lightning_ssl.evaluation.export import export_main
from lightning_ssl.methods import SSLMethod

__all__ = ["main", "SSLCLI"]


class SSLCLI(LightningCLI):
    """LightningCLI with the methods as subclasses of ``SSLMethod``."""

    def before_instantiate_classes(self) -> None:
        # The launcher decides how many processes run where; the config's values would only conflict.
        config = self.config[self.subcommand] if self.subcommand else self.config
        for flag, value in launcher_trainer_flags().items():
            config.trainer[flag] = value


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
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
