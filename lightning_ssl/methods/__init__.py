"""One file per method; each is a LightningModule with its own ``training_step``."""
from lightning_ssl.methods.base import SSLMethod
from lightning_ssl.methods.byol import BYOL
from lightning_ssl.methods.cpc import CPC, CPCv2
from lightning_ssl.methods.moco import MoCo, MoCoV2
from lightning_ssl.methods.simclr import SimCLR

__all__ = ["SSLMethod", "SimCLR", "MoCo", "MoCoV2", "BYOL"]
__all__ += ["CPC", "CPCv2"]
