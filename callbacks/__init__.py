"""Callbacks: momentum-encoder EMA, MoCo queue maintenance, kNN monitoring, online linear probe."""
from callbacks.knn_monitor import KNNMonitor
from callbacks.momentum_update import MomentumUpdate
from callbacks.online_probe import OnlineLinearProbe
from callbacks.queue_update import QueueUpdate

__all__ = ["MomentumUpdate", "QueueUpdate", "KNNMonitor", "OnlineLinearProbe"]
