"""lightning-ssl: self-supervised learning methods for computer vision as PyTorch Lightning modules."""
from lightning_ssl.backbones import build_backbone
from lightning_ssl.methods import BYOL, MoCo, MoCoV2, SimCLR, SSLMethod
from lightning_ssl.methods import CPC, CPCv2

__version__ = "0.1.0"
__all__ = ["SSLMethod", "SimCLR", "MoCo", "MoCoV2", "BYOL", "build_backbone", "__version__"]
__all__ += ["CPC", "CPCv2"]
