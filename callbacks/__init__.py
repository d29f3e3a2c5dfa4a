"""Callbacks: EMA targets, MoCo's queue, kNN monitoring, online linear probe.

Installed as ``lightning_ssl.callbacks`` (the repository keeps the folder at its top level).
"""

from lightning_ssl.callbacks.ema_update import EMAUpdate
from lightning_ssl.callbacks.knn_monitor import KNNMonitor
from lightning_ssl.callbacks.online_probe import OnlineLinearProbe
from lightning_ssl.callbacks.queue_update import QueueUpdate

__all__ = ["EMAUpdate", "QueueUpdate", "KNNMonitor", "OnlineLinearProbe"]
