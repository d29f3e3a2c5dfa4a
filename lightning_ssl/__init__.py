"""lightning-ssl: self-supervised learning methods for computer vision (and CPC on raw audio) as PyTorch
Lightning modules.

One namespace: ``lightning_ssl`` (methods, backbones, losses), ``lightning_ssl.datamodules``,
``lightning_ssl.callbacks`` and ``lightning_ssl.evaluation``.
"""

from lightning_ssl.backbones import build_backbone
from lightning_ssl.methods import *  # noqa: F403  (every method of the registry, SSLMethod, REGISTRY)
from lightning_ssl.methods import __all__ as _methods

__version__ = "0.1.0"
__all__ = ["build_backbone", "__version__", *_methods]
